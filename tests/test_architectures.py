"""Causal LMs whose forward changes the output embeddings' product (Gemma 2 / 3 soft-capping, Cohere's
``logit_scale``, Granite's ``logits_scaling``): the bank's losses and label scores use the model's own logits, so
training, ranking and sampling see the distribution the model (and a PEFT export of the task) defines. Tiny
config-built models, no downloads."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_tokenizer

from promptbank import causal
from promptbank.inject import prompt_kv

V = len(make_tiny_tokenizer())
SIZES = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def _model(arch: str):
    import transformers

    extra = {
        "Gemma2": dict(head_dim=8, final_logit_softcapping=2.0),  # a low cap, so that it bites
        "Cohere": dict(logit_scale=0.25),
        "Granite": dict(logits_scaling=4.0),
        "Llama": {},
    }[arch]
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**SIZES, **extra)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.mark.parametrize("arch", ["Gemma2", "Cohere", "Granite", "Llama"])
def test_logits_and_target_logprobs_are_the_models_own(arch):
    model = _model(arch)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        hidden = model.base_model(input_ids=ids).last_hidden_state
        raw = model.get_output_embeddings()(hidden)
        got = causal.lm_logits(model, hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if arch != "Llama":  # the check can fail: the plain product is not the model's logits here
        assert not torch.allclose(raw, want, atol=1e-3)
    # behind a soft prompt: target log-probabilities = the model's own log-softmax over [prompt; tokens]
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(3, 32, generator=gen) * 0.1
    inputs, targets = [10, 11, 12, 13], [14, 15]
    with torch.no_grad():
        (logp,) = causal.target_logprobs(
            model, make_tiny_tokenizer(), [prompt_kv(model, {0: prompt})], [inputs], [targets], pack=False
        )
        emb = model.get_input_embeddings()(torch.tensor([inputs + targets]))
        full = model(inputs_embeds=torch.cat([prompt[None], emb], 1)).logits[0].log_softmax(-1)
    p = 3 + len(inputs) - 1  # the position predicting the first target token
    torch.testing.assert_close(logp, full[[p, p + 1], targets], atol=1e-4, rtol=1e-4)


def test_an_unknown_change_of_the_logits_warns_and_keeps_the_plain_product(monkeypatch):
    model = _model("Llama")
    real = type(model).forward

    def shifted(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        out.logits = out.logits * 3.0 + 1.0  # an affine change no candidate explains
        return out

    monkeypatch.setattr(type(model), "forward", shifted)
    hidden = torch.randn(1, 2, 32)
    with pytest.warns(UserWarning, match="changes its logits in a way promptbank does not know"):
        got = causal.lm_logits(model, hidden)
    torch.testing.assert_close(got, model.get_output_embeddings()(hidden))


# ---------------------------------------------------------------- sliding-window attention (Mistral, Gemma 2 / 3)


def _windowed(arch: str, window: int):
    import transformers

    extra = {"head_dim": 8} if arch == "Gemma2" else {}
    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**SIZES, sliding_window=window, **extra)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _reference_loglik(model, prompt, inp, lab) -> float:
    """log p(label | prompt, input) from the model's own forward over [prompt; input; label] (no cache, no batch)."""
    emb = model.get_input_embeddings()(torch.tensor([inp + lab]))
    logp = model(inputs_embeds=torch.cat([prompt[None], emb], 1)).logits[0].log_softmax(-1)
    first = prompt.shape[0] + len(inp) - 1
    return sum(logp[first + j, t].item() for j, t in enumerate(lab))


@pytest.mark.parametrize("arch", ["Mistral", "Gemma2"])
def test_a_short_row_batched_with_a_long_one_sees_what_it_sees_alone(arch):
    """A sliding window counts cache slots: in a left-padded batch a short row's padding would push its soft prompt
    out of the window (it did: label scores off by 0.02-0.2, other generated tokens). Rows are now grouped by length
    where that happens: batched label scores, target log-probabilities and greedy tokens equal each row alone and
    the model's own uncached forward."""
    window = 16
    model, tok = _windowed(arch, window), make_tiny_tokenizer()
    prompt = torch.randn(3, 32, generator=torch.Generator().manual_seed(2)) * 0.5
    kv = prompt_kv(model, {0: prompt})
    short, long_ = list(range(5, 12)), list(range(5, 5 + 3 * window))
    labels = [[20, 21, 22], [23]]
    with torch.no_grad():
        batch = causal.label_scores(model, tok, [kv, kv], [short, long_], [labels, labels], pack=False)
        for row, scores in zip((short, long_), batch):
            want = torch.tensor([_reference_loglik(model, prompt, row, lab) for lab in labels])
            torch.testing.assert_close(scores, want, atol=1e-4, rtol=1e-4)
        lp = causal.target_logprobs(model, tok, [kv, kv], [short, long_], [[30, 31], [32, 33]], pack=False)
        for row, tgt, got in zip((short, long_), ([30, 31], [32, 33]), lp):
            assert got.sum().item() == pytest.approx(_reference_loglik(model, prompt, row, tgt), abs=1e-4)
        together = causal.generate(model, tok, [kv, None, kv], [short, short, long_], max_new_tokens=6)
        alone = [
            causal.generate(model, tok, [k], [r], max_new_tokens=6)[0]
            for k, r in ((kv, short), (None, short), (kv, long_))
        ]
    assert together == alone


def test_rows_are_grouped_only_where_the_window_needs_it():
    from promptbank.inject import sliding_window, window_groups

    llama, mistral = _model("Llama"), _windowed("Mistral", 16)
    assert sliding_window(llama) is None and sliding_window(mistral) == 16
    assert window_groups(llama, [3, 40], [5, 5], 10) is None  # no window
    assert window_groups(mistral, [3, 8], [3, 3], 4) is None  # prompt + width + extra = 15: within it
    assert window_groups(mistral, [9, 9], [3, 3], 10) is None  # equal lengths: no padding
    assert window_groups(mistral, [3, 9, 3, 5], [3, 0, 3, 3], 4) is None  # 3 + 9 + 4 = 16: just within
    assert window_groups(mistral, [3, 9, 3, 5], [3, 0, 3, 3], 5) == [[0, 2], [1], [3]]


# ---------------------------------------------------------------- the whole bank on other layouts

LAYOUTS = {
    "GPTNeoX": dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "OPT": dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4),
    "Phi3": dict(SIZES, pad_token_id=V - 1),
    "Gemma2": dict(SIZES, head_dim=8),
    "Falcon": dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
    "GPTBigCode": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=256),
}
ROWS = [
    {"text": f"the weather is {w} {i}", "label": lab} for i in range(6) for w, lab in (("wet", "rain"), ("warm", "sun"))
]
ECHO = [{"input": f"repeat {w}", "target": w} for w in ("cat", "dog", "sky", "sea", "sun", "car", "hat", "pen")]


@pytest.mark.parametrize("arch", list(LAYOUTS))
def test_learn_predict_generate_and_peft_export_on_other_layouts(arch, tmp_path):
    """Each method learns, a mixed batch predicts and generates as its rows alone, and the deep prompt's PEFT
    export gives the bank's logits, on decoder layouts other than Llama / Qwen2 / Mistral / GPT-2."""
    import transformers
    from conftest import fast_options

    from promptbank import PromptBank
    from promptbank.backbone import from_model
    from promptbank.embed import HashingEmbedder
    from promptbank.inject import forward_hidden

    peft = pytest.importorskip("peft")
    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, f"{arch}Config")(**LAYOUTS[arch]))
    bank = PromptBank(from_model(model, tok, name=f"tiny-{arch}"), HashingEmbedder(64))
    bank.learn_task("w", ROWS, num_virtual_tokens=3, **fast_options(max_steps=2))
    bank.learn_task("d", ROWS, method="deep", num_virtual_tokens=4, **fast_options(max_steps=2))
    bank.learn_task("g", ECHO, method="ptuning_mlp", num_virtual_tokens=3, **fast_options(max_steps=2))
    texts, tasks = (
        ["the weather is grey", "a long sentence about the weather being cold and wet", "warm"],
        ["w", "d", "w"],
    )
    mixed = bank.predict(texts, task=tasks)
    for text, task, got in zip(texts, tasks, mixed):
        alone = bank.predict([text], task=task)[0]
        assert got.output == alone.output and got.label_scores == pytest.approx(alone.label_scores, abs=1e-4)
    gen_texts, gen_tasks = ["repeat cat", "hello", "repeat a dog"], ["g", None, "g"]
    together = bank.generate(gen_texts, gen_tasks, max_new_tokens=4)
    assert together == [bank.generate([t], [k], max_new_tokens=4)[0] for t, k in zip(gen_texts, gen_tasks)]
    bank.save(tmp_path / "bank")
    ids = causal.encode_input(tok, "the weather is cold")
    mask = torch.ones(1, len(ids), dtype=torch.long)
    with torch.no_grad():
        hidden, _, _ = forward_hidden(model, torch.tensor([ids]), mask, [bank.prompt_prefix("d")])
        ours = causal.lm_logits(model, hidden)[0]
        theirs = peft.PeftModel.from_pretrained(model, str(tmp_path / "bank" / "tasks" / "d"))
        theirs = theirs(input_ids=torch.tensor([ids]), attention_mask=mask).logits[0, -len(ids) :]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- encoders: positions as the model numbers them

ENC_SIZES = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
ENCODERS = {
    "Bert": ENC_SIZES,
    "Roberta": dict(ENC_SIZES, pad_token_id=1),  # positions from padding_idx + 1 = 2
    "MPNet": dict(ENC_SIZES, pad_token_id=1),  # likewise (all-mpnet-base-v2's family)
    "Electra": dict(ENC_SIZES, embedding_size=32),
    "DistilBert": dict(vocab_size=V, dim=32, n_layers=2, n_heads=4, hidden_dim=64),  # transformer.layer
    # layers, rotary positions, local attention in every other layer
    "ModernBert": dict(
        ENC_SIZES, num_hidden_layers=3, global_attn_every_n_layers=2, local_attention=8, pad_token_id=V - 1
    ),
}


def _encoder(arch: str, **kw):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{arch}Config")(**{"max_position_embeddings": 64, **ENCODERS[arch], **kw})
    return getattr(transformers, f"{arch}Model")(config).eval()


@pytest.mark.parametrize("arch", list(ENCODERS))
def test_encoder_rows_get_the_positions_of_the_models_own_forward(arch):
    """pooled() passes position ids itself (soft-prompt positions come first); they start where the model's own
    forward starts them (RoBERTa, MPNet: after the padding index; before, at 0, so every token read the position
    embedding of another place). A row without a prompt is the model's own mean-pooled output; prompted rows in a
    mixed batch equal each row alone."""
    from promptbank.backbone import from_model
    from promptbank.encoder import pooled, position_offset

    model, tok = _encoder(arch), make_tiny_tokenizer()
    assert from_model(model, tok, name=arch).kind == "encoder"  # DistilBERT and ModernBERT too, by model type
    assert position_offset(model) == (2 if arch in ("Roberta", "MPNet") else 0)
    seq = list(range(10, 30))  # longer than ModernBERT's local window
    prompts = [{0: torch.randn(3, 32), 1: torch.randn(3, 32)}, None, {0: torch.randn(2, 32)}]
    seqs = [seq, seq, [7, 8]]
    with torch.no_grad():
        native = model(input_ids=torch.tensor([seq])).last_hidden_state[0].mean(0)
        batch = pooled(model, tok, seqs, prompts)
        alone = torch.cat([pooled(model, tok, [s], [p]) for s, p in zip(seqs, prompts)])
    torch.testing.assert_close(batch[1], native, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)


def test_an_encoder_numbering_positions_from_an_offset_caps_inputs_to_what_is_left(tmp_path):
    """A RoBERTa-style table of 24 positions starting at 2 holds 22 tokens: longer inputs are cut there (an
    IndexError before, once the offset was applied) with the training warning naming the 22."""
    from conftest import fast_options

    from promptbank import PromptBank
    from promptbank.backbone import from_model
    from promptbank.embed import HashingEmbedder

    tok = make_tiny_tokenizer()
    tok.model_max_length = 10**30  # no tokenizer limit: the position table is what binds
    bank = PromptBank(from_model(_encoder("Roberta", max_position_embeddings=24), tok, name="r"), HashingEmbedder(64))
    rows = [{"text": "word " * 30 + str(i), "label": "ab"[i % 2]} for i in range(8)]
    with pytest.warns(UserWarning, match="more than the encoder's 22 positions"):
        bank.learn_task("t", rows, num_virtual_tokens=2, max_input_tokens=64, **fast_options(max_steps=2))
    assert bank.predict(["word " * 40], task="t")[0].output in ("a", "b")


def test_a_model_without_attention_in_every_layer_is_refused_clearly():
    """State-space layers (Mamba) keep a recurrent state, not keys/values: no soft-prompt prefix fits them. Refused
    when the backbone is made (an AttributeError deep in the first training step before)."""
    import transformers

    from promptbank.backbone import from_model
    from promptbank.errors import PromptBankError

    model = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2))
    with pytest.raises(PromptBankError, match="MambaForCausalLM keeps a recurrent or linear-attention state"):
        from_model(model, make_tiny_tokenizer(), name="mamba")


# ---------------------------------------------------------------- tokenizers that start every text with BOS


def _bos_tokenizer():
    """The tiny byte-level tokenizer, but starting every text with <s> by default (as Llama's, Gemma's, Mistral's)."""
    from tokenizers import processors

    tok = make_tiny_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    return tok


def test_task_inputs_start_with_bos_where_the_tokenizer_starts_texts_with_it(hashing_embedder):
    """Such models were trained with BOS first; a task's input now starts with it right after the soft prompt, as a
    PEFT prompt goes before the tokenizer's ids (BOS included). Stored in the task's template, so banks made
    before keep their inputs; tokenizers that add nothing (SmolLM2's, GPT-2's) are unchanged."""
    from conftest import fast_options, make_tiny_model

    from promptbank import PromptBank
    from promptbank.backbone import from_model

    plain, bos_tok = make_tiny_tokenizer(), _bos_tokenizer()
    assert causal.bos_text(plain) is None and causal.bos_text(bos_tok) == "<s>"
    assert causal.with_bos(plain, "{input}") == "{input}" and causal.with_bos(bos_tok, "<s>{input}") == "<s>{input}"
    bank = PromptBank(from_model(make_tiny_model(len(bos_tok)), bos_tok, name="bos"), hashing_embedder)
    rec = bank.learn_task("w", ROWS, num_virtual_tokens=3, **fast_options(max_steps=2))
    assert rec.template == "<s>" + causal.DEFAULT_TEMPLATE
    ids = causal.encode_input(bos_tok, "the weather is wet", rec.template)
    assert ids[0] == bos_tok.bos_token_id and ids.count(bos_tok.bos_token_id) == 1
    # what a PEFT user feeds: the tokenizer's own ids of the templated text, BOS included
    assert ids == bos_tok(causal.DEFAULT_TEMPLATE.format(input="the weather is wet"))["input_ids"]
    assert bank.predict(["the weather is wet"], task="w")[0].output in ("rain", "sun")
    assert bank._plain_input("hello")[0] == bos_tok.bos_token_id  # the plain backbone too (no chat template)
    other = PromptBank(from_model(make_tiny_model(len(plain)), plain, name="plain"), hashing_embedder)
    assert (
        other.learn_task("w", ROWS, num_virtual_tokens=3, **fast_options(max_steps=2)).template
        == causal.DEFAULT_TEMPLATE
    )


def test_generation_ends_at_the_models_own_end_of_turn_token(tiny_bank):
    """Chat models often end a turn with a token other than the tokenizer's EOS (Gemma's <end_of_turn>, Llama 3's
    <|eot_id|>), listed in their generation config: bank.generate now stops there too (it ran on to the token
    limit before), as PTunedLLM did."""
    model, tok = tiny_bank.backbone.model, tiny_bank.backbone.tokenizer
    ids = causal.encode_input(tok, "the weather today")
    first = causal.generate(model, tok, [None], [ids], max_new_tokens=12)[0]
    k = next(i for i in range(1, len(first)) if first[i] not in first[:i])  # a token not generated before it
    model.generation_config.eos_token_id = [tok.eos_token_id, first[k]]  # it ends a turn
    try:
        assert causal.generate(model, tok, [None], [ids], max_new_tokens=12)[0] == first[:k]
        assert causal.end_token_ids(model, tok) == {tok.eos_token_id, first[k]}
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id


@pytest.mark.parametrize("arch", ["DistilBert", "ModernBert", "Roberta"])
def test_encoder_banks_learn_predict_and_round_trip_on_other_families(arch, tmp_path, hashing_embedder):
    from conftest import fast_options

    from promptbank import PromptBank
    from promptbank.backbone import from_model

    tok = make_tiny_tokenizer()
    bank = PromptBank(from_model(_encoder(arch), tok, name=f"tiny-{arch}"), hashing_embedder)
    bank.learn_task("d", ROWS, method="deep", num_virtual_tokens=3, **fast_options(max_steps=3))
    bank.learn_task("p", ROWS, method="prompt_tuning", num_virtual_tokens=2, **fast_options(max_steps=3))
    texts = ["the weather is wet today", "warm", "the weather is " + "very " * 20 + "warm"]
    before = bank.predict(texts, task=["d", "p", "d"])
    bank.save(tmp_path / "b")
    loaded = PromptBank.load(tmp_path / "b", backbone=bank.backbone, embedder=hashing_embedder)
    after = loaded.predict(texts, task=["d", "p", "d"])
    assert [p.label_scores for p in after] == [p.label_scores for p in before]


def test_a_template_with_other_fields_is_refused_before_training(tiny_bank):
    """Only {input} may be a field (a manifest refuses others); literal braces are written doubled."""
    from conftest import fast_options

    for bad in ("Q: {input} {x}", "no field", "{input.__class__}", "{input:>10}"):
        with pytest.raises(ValueError, match="only field"):
            tiny_bank.learn_task("t", ROWS, template=bad, **fast_options(max_steps=1))
    assert "t" not in tiny_bank.tasks
    rec = tiny_bank.learn_task(
        "t", ROWS, template='{{"text": "{input}"}}', num_virtual_tokens=2, **fast_options(max_steps=1)
    )
    assert causal.encode_input(tiny_bank.backbone.tokenizer, "hi", rec.template) == causal.encode_input(
        tiny_bank.backbone.tokenizer, '{"text": "hi"}', "{input}"
    )


def test_an_encoder_whose_layers_cannot_be_found_is_refused_when_made():
    """ALBERT shares its layers in groups (no encoder.layer stack): refused with a message when the backbone is made,
    not with a TypeError at the first training step."""
    import transformers

    from promptbank.backbone import from_model
    from promptbank.errors import PromptBankError

    config = transformers.AlbertConfig(**ENC_SIZES, embedding_size=16, max_position_embeddings=64)
    with pytest.raises(PromptBankError, match="AlbertModel is an encoder whose layer stack promptbank does not know"):
        from_model(transformers.AlbertModel(config), make_tiny_tokenizer(), name="albert")

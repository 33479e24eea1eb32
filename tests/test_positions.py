"""Inference inputs are cut as training cut them: a classification task's input longer than its
``max_input_tokens`` is cut to it, silently, to the same string as ``truncate_inputs`` makes of a training input
(label ranking, generation, the vLLM export); a generation task's input is used whole (its question may follow a
long context). Inputs still longer than the backbone's positions (GPT-2's learned position table: an IndexError before):
the text is cut to its first tokens until soft prompt + input + label or answer tokens fit, the template's own
tokens kept, with one warning; inputs that fit are untouched; no room at all is a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import fast_options, make_tiny_gpt2_bank

from promptbank import causal
from promptbank.tasks import cut_to_tokens, load_task_data, truncate_inputs

LIMIT = 96
ROWS = [{"text": f"short text {i}", "label": ["yes", "no"][i % 2]} for i in range(12)]
LONG = "a long input " * 60  # ~780 byte-level tokens
CAP = 8


@pytest.fixture(scope="module")
def gpt2_bank():
    bank = make_tiny_gpt2_bank(LIMIT)
    gen_rows = [{"input": r["text"], "target": r["label"]} for r in ROWS]
    # caps above the position limit, so that the position limit is what cuts LONG
    bank.learn_task("yn", ROWS, num_virtual_tokens=4, max_input_tokens=1000, **fast_options(max_steps=2))
    bank.learn_task("g", gen_rows, num_virtual_tokens=4, max_input_tokens=1000, **fast_options(max_steps=2))
    # and tasks whose own cap (8 tokens) binds first (no embedding probe: it embeds the whole text, whatever the cut)
    bank.learn_task("yn8", ROWS, num_virtual_tokens=4, max_input_tokens=CAP, probe=False, **fast_options(max_steps=2))
    bank.learn_task("g8", gen_rows, num_virtual_tokens=4, max_input_tokens=CAP, **fast_options(max_steps=2))
    return bank


def _spy(monkeypatch, name: str) -> list:
    calls, real = [], getattr(causal, name)

    def spy(model, tok, kvs, inputs, *args, **kw):
        calls.append(([0 if kv is None else kv[0][0].shape[-2] for kv in kvs], [list(x) for x in inputs]))
        return real(model, tok, kvs, inputs, *args, **kw)

    monkeypatch.setattr(causal, name, spy)
    return calls


def test_label_ranking_cuts_only_what_does_not_fit(gpt2_bank, monkeypatch):
    tok, template = gpt2_bank.backbone.tokenizer, gpt2_bank.tasks["yn"].template
    short = ROWS[0]["text"]
    alone = gpt2_bank.predict([short], task="yn")[0].label_scores
    calls = _spy(monkeypatch, "rank_labels")
    with pytest.warns(UserWarning, match=rf"cut 1 of 2 inputs to fit the backbone's {LIMIT} positions"):
        preds = gpt2_bank.predict([LONG, short], task="yn")
    # the input that fits is untouched (equal up to float noise: batched with a padded row, sums run in another order)
    assert preds[1].label_scores == pytest.approx(alone, abs=1e-4)
    (prompt_lens, inputs) = calls[0]
    reserve = max(len(causal.encode_target(tok, lab)) for lab in ("yes", "no"))
    full = causal.encode_input(tok, LONG, template)
    tail = causal.encode_input(tok, "", template)
    assert prompt_lens[0] + len(inputs[0]) + reserve <= LIMIT
    assert len(inputs[0]) >= LIMIT - prompt_lens[0] - reserve - 2  # cut to fit, not much shorter
    assert inputs[0][: len(inputs[0]) - len(tail)] == full[: len(inputs[0]) - len(tail)]  # the text's first tokens
    assert inputs[0][-len(tail) :] == tail  # the template's "Answer:" stays
    assert inputs[1] == causal.encode_input(tok, short, template)


def test_generation_cuts_task_and_plain_rows(gpt2_bank, monkeypatch):
    calls = _spy(monkeypatch, "generate")
    with pytest.warns(UserWarning, match=r"cut 2 of 2 inputs .* up to 5 tokens of the answer"):
        out = gpt2_bank.generate([LONG, LONG], task=["g", None], max_new_tokens=5)
    assert len(out) == 2
    prompt_lens, inputs = calls[0]
    assert prompt_lens == [4, 0]
    assert all(p + len(x) + 5 <= LIMIT for p, x in zip(prompt_lens, inputs))


def test_inputs_that_fit_raise_no_warning(gpt2_bank):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpt2_bank.predict([r["text"] for r in ROWS[:3]], task="yn")
        gpt2_bank.generate([ROWS[0]["text"]], task="g", max_new_tokens=5)


def test_no_room_for_any_input_is_a_clear_error(gpt2_bank):
    with pytest.raises(ValueError, match=rf"backbone's {LIMIT} positions leave no room for an input"):
        gpt2_bank.generate(["hi"], task="g", max_new_tokens=LIMIT)


def test_encoder_inputs_are_capped_at_its_positions(enc_bank):
    """An encoder task asked for more input tokens than the encoder has positions (tiny BERT: 256) trains and
    predicts on long inputs, cut to the position limit, with a warning at training (an IndexError before)."""
    rows = [{"text": "long words here " * 40, "label": "ab"[i % 2]} for i in range(8)]
    with pytest.warns(UserWarning, match="max_input_tokens=400 is more than the encoder's 256 positions"):
        rec = enc_bank.learn_task("t", rows, max_input_tokens=400, num_virtual_tokens=4, **fast_options(max_steps=2))
    pred = enc_bank.predict([LONG], task="t")[0]
    assert pred.output in rec.labels


def test_task_inputs_are_cut_to_its_max_input_tokens_as_in_training(gpt2_bank, monkeypatch):
    tok = gpt2_bank.backbone.tokenizer
    cut = cut_to_tokens(tok, LONG, CAP)
    assert len(tok(cut, add_special_tokens=False)["input_ids"]) <= CAP < len(tok(LONG)["input_ids"])
    # the same string training made of this input
    with pytest.warns(UserWarning, match="truncated 1 of 1 inputs to 8 tokens"):
        trained = truncate_inputs(load_task_data([{"text": LONG, "label": "yes"}], labels=["yes", "no"]), tok, CAP)
    assert trained.examples[0].input == cut
    assert cut_to_tokens(tok, "short", CAP) == "short"

    ranks, gens = _spy(monkeypatch, "rank_labels"), _spy(monkeypatch, "generate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the task's own cap: no warning
        got = gpt2_bank.predict([LONG], task="yn8")[0]
        out = gpt2_bank.generate([LONG], task="yn8", max_new_tokens=3)  # a classification task's prompt, generating
    template = gpt2_bank.tasks["yn8"].template
    assert ranks[0][1] == gens[0][1] == [causal.encode_input(tok, cut, template)]
    assert got.label_scores == pytest.approx(gpt2_bank.predict([cut], task="yn8")[0].label_scores)
    assert out == gpt2_bank.generate([cut], task="yn8", max_new_tokens=3)


def test_generation_task_inputs_are_used_whole(gpt2_bank, monkeypatch):
    """A generation task's cap (8) is not applied at inference: only the position fit cuts LONG."""
    tok = gpt2_bank.backbone.tokenizer
    gens = _spy(monkeypatch, "generate")
    mid = "word " * 6  # longer than the cap, fits the positions (~30 byte-level tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gpt2_bank.generate([mid], task="g8", max_new_tokens=3)
    assert gens[0][1] == [causal.encode_input(tok, mid, gpt2_bank.tasks["g8"].template)]
    assert len(tok(mid)["input_ids"]) > CAP


def test_rows_with_other_caps_or_no_task_in_one_batch(gpt2_bank, monkeypatch):
    """Each row gets its own task's cap; rows of a generation task or of no task are only fitted to the positions."""
    tok = gpt2_bank.backbone.tokenizer
    gens = _spy(monkeypatch, "generate")
    with pytest.warns(UserWarning, match=r"cut 3 of 4 inputs to fit the backbone's"):
        gpt2_bank.generate([LONG] * 4, task=["yn8", "g8", "g", None], max_new_tokens=3)
    prompt_lens, inputs = gens[0]
    assert inputs[0] == causal.encode_input(tok, cut_to_tokens(tok, LONG, CAP), gpt2_bank.tasks["yn8"].template)
    assert all(p + len(x) + 3 <= LIMIT for p, x in zip(prompt_lens, inputs))
    assert all(len(x) > len(inputs[0]) + 40 for x in inputs[1:])


def test_vllm_export_cuts_as_predict_does(gpt2_bank):
    tok = gpt2_bank.backbone.tokenizer
    (emb, whole) = gpt2_bank.prompt_embeds([LONG, LONG], task=["yn8", "g8"])
    ids = causal.encode_input(tok, cut_to_tokens(tok, LONG, CAP), gpt2_bank.tasks["yn8"].template)
    assert emb.shape[0] == 4 + len(ids)
    want = gpt2_bank.backbone.model.get_input_embeddings()(torch.tensor(ids)).detach()
    assert torch.equal(emb[4:], want.float())
    assert whole.shape[0] == 4 + len(causal.encode_input(tok, LONG, gpt2_bank.tasks["g8"].template))


# ------------------------------------------------------------------ PTunedLLM (LangChain) fits its inputs the same way


def _steps_spy(monkeypatch) -> list:
    calls, real = [], causal.generate_steps

    def spy(model, tok, kvs, inputs, **kw):
        calls.append(([0 if kv is None else kv[0][0].shape[-2] for kv in kvs], [list(x) for x in inputs]))
        return real(model, tok, kvs, inputs, **kw)

    monkeypatch.setattr(causal, "generate_steps", spy)
    return calls


def test_ptuned_llm_fits_task_rows_as_generate_does(gpt2_bank, monkeypatch):
    """An over-long message through a task's soft prompt (an IndexError in the model before) feeds the ids
    generate() feeds: cut to fit soft prompt + input + max_tokens, with one warning; a classification task's input
    is cut to its max_input_tokens as in training, with no warning, as generate() does."""
    pytest.importorskip("langchain_core")
    from langchain_promptbank import PTunedLLM

    calls = _steps_spy(monkeypatch)
    for task, warns in (("g", True), ("yn8", False)):
        calls.clear()
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            answer = PTunedLLM(bank=gpt2_bank, task=task, max_tokens=5).invoke(LONG).content
            gpt2_bank.generate([LONG], task=task, max_new_tokens=5)
        cut = [w for w in recorded if "to fit the backbone's" in str(w.message)]
        assert len(cut) == (2 if warns else 0)  # one per call
        (llm_lens, llm_inputs), (gen_lens, gen_inputs) = calls
        assert llm_inputs == gen_inputs and llm_lens == gen_lens
        assert llm_lens[0] + len(llm_inputs[0]) + 5 <= LIMIT and isinstance(answer, str)
        if not warns:
            tok = gpt2_bank.backbone.tokenizer
            template = gpt2_bank.tasks[task].template
            assert llm_inputs[0] == causal.encode_input(tok, cut_to_tokens(tok, LONG, CAP), template)


def test_ptuned_llm_cuts_the_last_human_message_of_a_plain_conversation(gpt2_bank, monkeypatch):
    """With no task the whole conversation goes to the backbone: an over-long one keeps its other messages whole and
    has its last human message cut to its first tokens until it fits with max_tokens; one warning. A conversation
    that fits is fed as before; one whose other messages take every position is a clear error."""
    pytest.importorskip("langchain_core")
    from langchain_core.messages import HumanMessage, SystemMessage

    from langchain_promptbank import PTunedLLM

    llm = PTunedLLM(bank=gpt2_bank, task=None, max_tokens=5)
    tok = gpt2_bank.backbone.tokenizer
    calls = _steps_spy(monkeypatch)
    with pytest.warns(UserWarning, match=r"cut the last human message of 1 of 1 conversations .* 96 positions"):
        llm.invoke([SystemMessage("be brief"), HumanMessage(LONG)])
    (_, (ids,)) = calls[0]
    assert LIMIT - 5 - 3 <= len(ids) <= LIMIT - 5  # cut to fit, not much shorter
    text = tok.decode(ids)
    assert text.startswith("system: be brief\nuser: a long input a long input") and text.endswith("\nassistant:")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llm.invoke([SystemMessage("be brief"), HumanMessage("short")])
    assert calls[1][1][0] == tok("system: be brief\nuser: short\nassistant:", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="96 positions leave no room for the conversation"):
        llm.invoke([SystemMessage(LONG), HumanMessage("short")])

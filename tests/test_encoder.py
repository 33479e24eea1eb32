"""Encoder backbones (BERT family) on a tiny config-built BERT: same invariants as the causal-LM bank."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fast_options
from test_bank import FRUIT, WEATHER, _state_hash, _tree_bytes

from promptbank import PromptBank
from promptbank.config import TrainConfig
from promptbank.encoder import pooled


def test_kind_is_inferred_as_encoder(enc_bank):
    assert enc_bank.backbone.kind == "encoder" and enc_bank.is_encoder


@pytest.mark.parametrize("method", ["prompt_tuning", "ptuning_mlp", "deep"])
def test_encoder_learning_keeps_backbone_and_lowers_loss(enc_bank, method):
    before = _state_hash(enc_bank.backbone.model)
    rec = enc_bank.learn_task(
        "weather",
        WEATHER,
        method=method,
        num_virtual_tokens=4,
        probe=False,  # the record's dev accuracy is then the prompted head's, as in the history
        **fast_options(max_steps=20, eval_every=5, head_lr=0.1),
    )
    assert _state_hash(enc_bank.backbone.model) == before
    assert rec.dev_loss < rec.history[0]["dev_loss"]
    assert enc_bank._tasks["weather"].head["weight"].shape == (2, 32)
    # dev accuracy is recorded at every dev evaluation (step 0 included), and at the best step it is the record's
    evals = [h for h in rec.history if "dev_loss" in h]
    assert len(evals) >= 2 and all(0.0 <= h["dev_accuracy"] <= 1.0 for h in evals)
    best = next(h for h in evals if h["step"] == rec.best_step)
    assert best["dev_accuracy"] == pytest.approx(rec.dev_accuracy)


def test_encoder_no_forgetting_and_batch_independence(enc_bank):
    enc_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options())
    texts = ["the weather is odd today", "i would like to eat a kiwi"]
    before = enc_bank.predict(texts, task=["weather", "weather"])
    enc_bank.learn_task("fruit", FRUIT, method="prompt_tuning", num_virtual_tokens=5, **fast_options())
    after = enc_bank.predict(texts, task=["weather", "weather"])
    assert [p.label_scores for p in before] == [p.label_scores for p in after]
    mixed = enc_bank.predict(texts + ["no prompt row"], task=["weather", "fruit", None])
    alone = [enc_bank.predict([texts[0]], task="weather")[0], enc_bank.predict([texts[1]], task="fruit")[0]]
    for m, a in zip(mixed, alone):
        assert m.output == a.output
        assert m.label_scores == pytest.approx(a.label_scores, abs=1e-5)
    assert mixed[2].output is None


def test_encoder_pooled_prompt_rows_match_alone(enc_bank):
    model, tok = enc_bank.backbone.model, enc_bank.backbone.tokenizer
    d = enc_bank.backbone.hidden_size
    p1 = {0: torch.randn(2, d), 2: torch.randn(2, d)}
    p2 = {0: torch.randn(5, d)}
    seqs = [tok("short one")["input_ids"], tok("a longer row of text here")["input_ids"], tok("x")["input_ids"]]
    with torch.no_grad():
        batch = pooled(model, tok, seqs, [p1, p2, None])
        for i, p in enumerate([p1, p2, None]):
            torch.testing.assert_close(batch[i], pooled(model, tok, [seqs[i]], [p])[0], atol=1e-5, rtol=1e-5)
        plain = model(input_ids=torch.tensor([seqs[2]])).last_hidden_state.mean(1)[0]
    torch.testing.assert_close(batch[2], plain, atol=1e-5, rtol=1e-5)  # no prompt == the plain encoder


def test_encoder_save_load_save_identical(enc_bank, tmp_path):
    enc_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options())
    enc_bank.save(tmp_path / "bank")
    files = _tree_bytes(tmp_path / "bank")
    assert "tasks/weather/head.safetensors" in files and "tasks/weather/adapter_config.json" not in files
    loaded = PromptBank.load(tmp_path / "bank", backbone=enc_bank.backbone, embedder=enc_bank.embedder)
    loaded.save(tmp_path / "bank")
    assert _tree_bytes(tmp_path / "bank") == files
    text = ["the weather is grim"]
    assert (
        loaded.predict(text, task="weather")[0].label_scores == enc_bank.predict(text, task="weather")[0].label_scores
    )


def test_encoder_rejects_generation(enc_bank):
    with pytest.raises(ValueError, match="classification tasks only"):
        enc_bank.learn_task("gen", [{"input": "a", "target": "b"}] * 4, **fast_options())
    with pytest.raises(ValueError, match="cannot generate"):
        enc_bank.generate(["hi"])


def test_vocab_init_never_draws_special_or_unused_tokens(tmp_path):
    """BERT vocabularies start with [PAD], ~1,000 [unused*] slots and [CLS]/[SEP]/[MASK], whose embeddings were
    never trained: init="vocab" must skip them (and any tokenizer's special tokens)."""
    import torch

    from promptbank.prompts import vocab_init_ids

    words = ["[PAD]", *[f"[unused{i}]" for i in range(40)], "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]

    class BertLikeTokenizer:  # the two things vocab_init_ids asks a tokenizer
        all_special_ids = [0, 41, 42, 43, 44]

        def convert_ids_to_tokens(self, ids):
            return [words[i] for i in ids]

    tok = BertLikeTokenizer()
    model = torch.nn.Module()
    model.get_input_embeddings = lambda: torch.nn.Embedding(len(words), 4)
    ids = vocab_init_ids(model, 200, generator=torch.Generator().manual_seed(0), tokenizer=tok)
    assert set(ids) == {words.index("hello"), words.index("world")}
    plain = vocab_init_ids(model, 200, generator=torch.Generator().manual_seed(0))  # no tokenizer: any id
    assert len(set(plain)) > 10


def test_a_new_zero_head_is_never_the_kept_state(enc_bank):
    """A new encoder head starts at zero: it predicts one label for everything. On a small dev set every trained
    state can lose to it on loss (confidently wrong on a few examples) or tie on accuracy (CL-4's Amazon with 8
    dev examples kept it under both rules), so it is not a candidate: the first evaluated state replaces it."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no trained state beat.*")
        for select_on in ("loss", "auto"):
            rec = enc_bank.learn_task(
                f"stuck_{select_on}",
                WEATHER,
                method="deep",
                num_virtual_tokens=3,
                **fast_options(
                    max_steps=9, eval_every=3, lr=1e-12, head_lr=1e-12, select_on=select_on, warm_start=False
                ),
            )
            assert rec.best_step == 3  # nothing improves after it: the first trained state is kept
            assert rec.history[0]["dev_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_a_task_that_never_beats_its_initial_state_warns(tiny_bank):
    """On a causal LM the text-initialised prompt is a model, so model selection keeps it when nothing beats it;
    say so instead of storing it silently."""
    import warnings

    with pytest.warns(UserWarning, match=r"no trained state beat.*\(loss\).*untrained state was kept"):
        rec = tiny_bank.learn_task("stuck", WEATHER, num_virtual_tokens=3, **fast_options(lr=1e-12))
    assert rec.best_step == 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no trained state beat.*")
        rec = tiny_bank.learn_task("learns", WEATHER, num_virtual_tokens=3, **fast_options(max_steps=20, eval_every=5))
    assert rec.best_step > 0


def test_warm_start_lends_the_head_when_the_labels_match(enc_bank):
    """A new encoder task warm-started from a stored task with the same label names starts from that task's head
    (rows matched by label name, so label order does not matter), not from a zero head; a stored task missing
    one of the new labels lends its prompt only."""
    import math

    opts = fast_options(max_steps=20, eval_every=5, head_lr=0.1)
    enc_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **opts)
    flipped = list(reversed(enc_bank.tasks["weather"].labels))
    rec = enc_bank.learn_task(
        "weather2",
        WEATHER,
        labels=flipped,
        method="deep",
        num_virtual_tokens=3,
        **fast_options(max_steps=3, eval_every=3, warm_start_min_similarity=0),
    )
    assert [(w["task"], w["head"]) for w in rec.warm_start_from] == [("weather", True)]
    assert rec.history[0]["dev_loss"] < math.log(2) - 0.05  # a zero head gives exactly ln 2
    # at step 0 the new task is the stored one exactly: same prompt, head rows permuted by label name
    cold = enc_bank.learn_task(
        "weather3",
        WEATHER,
        labels=flipped,
        method="deep",
        num_virtual_tokens=3,
        **fast_options(max_steps=1, eval_every=1, warm_start_min_similarity=0, warm_start_k=1, lr=1e-12, head_lr=1e-12),
    )
    (chosen,) = [w["task"] for w in cold.warm_start_from]  # weather or weather2: identical inputs
    head, src = enc_bank._tasks["weather3"].head, enc_bank._tasks[chosen]
    w_src = src.head["weight"][[enc_bank.tasks[chosen].labels.index(lab) for lab in flipped]]
    assert cold.best_step == 0 and torch.allclose(head["weight"], w_src, atol=1e-6)
    # fruit's labels (red / yellow) are not weather's: prompt only, head from zero
    other = enc_bank.learn_task(
        "fruit",
        FRUIT,
        method="deep",
        num_virtual_tokens=3,
        **fast_options(max_steps=3, eval_every=3, warm_start_min_similarity=0, warm_start_k=1),
    )
    assert other.warm_start_from and not any(w["head"] for w in other.warm_start_from)
    assert other.history[0]["dev_loss"] == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("share, lent", [(0.3, False), (0.6, True)])
def test_head_is_lent_only_above_its_own_similarity_threshold(enc_bank, monkeypatch, share, lent):
    """A source with the same labels lends its prompt from ``warm_start_min_similarity`` but its head only from
    ``warm_start_head_min_similarity`` (default 0.5): weakly similar tasks' heads are not mixed in."""
    enc_bank.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options(max_steps=3))
    monkeypatch.setattr(type(enc_bank), "_routing_shares", lambda self, router, emb, exclude: {"weather": share})
    rec = enc_bank.learn_task(
        "weather2", WEATHER, method="deep", num_virtual_tokens=3, **fast_options(max_steps=1, eval_every=1)
    )
    assert [(w["task"], w["similarity"], w["head"]) for w in rec.warm_start_from] == [("weather", share, lent)]
    zero_head_loss = rec.history[0]["dev_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert zero_head_loss is not lent
    assert TrainConfig().warm_start_head_min_similarity == 0.5
    with pytest.raises(ValueError, match="warm_start_head_min_similarity"):
        TrainConfig(warm_start_head_min_similarity=1.5)

"""Inference inputs longer than the backbone's positions (GPT-2's learned position table: an IndexError before):
the text is cut to its first tokens until soft prompt + input + label or answer tokens fit, the template's own
tokens kept, with one warning; inputs that fit are untouched; no room at all is a clear error."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import fast_options, make_tiny_tokenizer

from promptbank import PromptBank, causal
from promptbank.backbone import from_model
from promptbank.embed import HashingEmbedder

LIMIT = 96
ROWS = [{"text": f"short text {i}", "label": ["yes", "no"][i % 2]} for i in range(12)]
LONG = "a long input " * 60  # ~780 byte-level tokens


@pytest.fixture(scope="module")
def gpt2_bank():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=LIMIT, initializer_range=0.3)
    bank = PromptBank(from_model(GPT2LMHeadModel(cfg), tok, name="tiny-gpt2"), HashingEmbedder(64))
    bank.learn_task("yn", ROWS, num_virtual_tokens=4, max_input_tokens=32, **fast_options(max_steps=2))
    bank.learn_task("g", [{"input": r["text"], "target": r["label"]} for r in ROWS], num_virtual_tokens=4,
                    max_input_tokens=32, **fast_options(max_steps=2))  # fmt: skip
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

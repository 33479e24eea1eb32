"""Packed training forwards: rows of different lengths run unpadded in one sequence behind each distinct prompt
once, with a block mask. Same log-probabilities and prompt gradients as the padded batch and as each row alone,
on Llama (GQA), Qwen2 and GPT-2 layouts; chosen only where it saves compute."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from promptbank import inject
from promptbank.causal import label_scores, target_logprobs
from promptbank.inject import packing_saves, prompt_kv

INPUTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15], [20, 21], [30] * 12, [40, 41, 42, 43]]
TARGETS = [[1, 2], [3], [4, 4, 4], [7], [9, 9]]


def _models():
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    vocab = len(make_tiny_tokenizer())
    torch.manual_seed(0)
    # tiny decoders of the same size: GQA (4 query heads, 2 key/value heads), 2 layers
    sizes = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,
    )
    qwen = Qwen2Config(**sizes)
    gpt2 = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.3)
    # a sliding window (its cache layers keep their own length counter) wider than every row here
    mistral = MistralConfig(**sizes, sliding_window=64)
    return {
        "llama": make_tiny_model(vocab),
        "qwen2": Qwen2ForCausalLM(qwen),
        "gpt2": GPT2LMHeadModel(gpt2),
        "mistral_window": MistralForCausalLM(mistral),
    }


MODELS = _models()


def _prompts(model):
    """Two prompts of different lengths (input-level and deep), trainable, and the rows' prefixes: rows share them,
    one row has none."""
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, d, generator=gen).requires_grad_()
    b0, b1 = (torch.randn(5, d, generator=gen).requires_grad_() for _ in range(2))
    ka, kb = prompt_kv(model, {0: a}), prompt_kv(model, {0: b0, 1: b1})
    return [a, b0, b1], [ka, kb, None, ka, kb]


def _packed_and_padded(arch, run):
    """``run(model, tok, row_kv, way)`` -> per-row tensors, ``way`` False then True (padded / packed, or any other
    pair of ways), each on fresh prompts: checks the two agree, values and prompt gradients (which must not
    vanish), and returns the True way's values and the model."""
    model = MODELS[arch].eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = make_tiny_tokenizer()
    results = {}
    for pack in (False, True):
        params, row_kv = _prompts(model)
        flat = torch.cat(run(model, tok, row_kv, pack))
        results[pack] = (flat.detach(), torch.autograd.grad(flat.sum(), params))
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    for g_packed, g_padded in zip(results[True][1], results[False][1]):
        assert g_padded.abs().sum() > 0
        torch.testing.assert_close(g_packed, g_padded, atol=1e-5, rtol=1e-4)
    return results[True][0], model, tok


def _alone(model, tok, rows) -> torch.Tensor:
    """Each (input, target) scored on its own, unpadded: the summed log-probability per row."""
    _, row_kv = _prompts(model)
    with torch.no_grad():
        return torch.stack(
            [torch.cat(target_logprobs(model, tok, [row_kv[b]], [inp], [t], pack=False)).sum() for b, inp, t in rows]
        )


@pytest.mark.parametrize("arch", list(MODELS))
def test_packed_equals_padded_and_single_rows_with_equal_gradients(arch):
    def run(model, tok, row_kv, pack):
        logp = target_logprobs(model, tok, row_kv, INPUTS, TARGETS, pack=pack)
        assert [len(x) for x in logp] == [len(t) for t in TARGETS]
        return [x.sum()[None] for x in logp]

    packed, model, tok = _packed_and_padded(arch, run)
    torch.testing.assert_close(packed, _alone(model, tok, list(zip(range(5), INPUTS, TARGETS))), atol=1e-5, rtol=1e-5)


LABELS = [[[1, 2], [3], [4, 5, 6]], [[7], [8, 9]], [[1], [2], [3], [4, 4]], [[5, 5, 5]], [[6], [7, 8]]]


@pytest.mark.parametrize("arch", list(MODELS))
def test_packed_label_scores_equal_padded_with_equal_gradients(arch):
    """Label ranking: the inputs' forward packed, then every (row, label) continuation on the cache laid out
    padded; multi-token labels, different label sets, prompts and a row without one. Each label's score is the
    full sequence's likelihood, the row alone."""

    def run(model, tok, row_kv, pack):
        scores = label_scores(model, tok, row_kv, INPUTS, LABELS, pack=pack)
        assert [len(x) for x in scores] == [len(labs) for labs in LABELS]
        return scores

    packed, model, tok = _packed_and_padded(arch, run)
    rows = [(b, inp, lab) for b, (inp, labs) in enumerate(zip(INPUTS, LABELS)) for lab in labs]
    torch.testing.assert_close(packed, _alone(model, tok, rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("budget", [2048, 4])
def test_label_continuations_side_by_side_equal_copies_per_label(arch, budget, monkeypatch):
    """Each row's multi-token labels continue side by side behind the row's one cache (a block mask keeps them
    apart) instead of each on its own copy of the cache: the same scores and prompt gradients, whether they fit
    one forward or take several rounds (a small token budget), and the cache is reused unchanged across rounds."""
    from promptbank import causal

    monkeypatch.setattr(causal, "LABEL_TOKENS_PER_FORWARD", budget)
    calls = []
    real = causal.forward_segments

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(causal, "forward_segments", spy)

    def run(model, tok, row_kv, shared):  # the two ways: copies (False), then side by side (True)
        monkeypatch.setattr(inject, "PACKING", shared)  # off: a copy of the cache per (row, label) pair
        calls.clear()
        scores = label_scores(model, tok, row_kv, INPUTS, LABELS, pack=False)
        assert len(calls) == (0 if not shared else 1 if budget > 100 else 2)
        return scores

    _packed_and_padded(arch, run)


def test_label_continuations_fall_back_to_copies_where_a_mask_cannot_keep_them_apart(monkeypatch):
    """A sliding window shorter than cache + labels, or an attention kernel without custom masks: copies."""
    model = MODELS["llama"]
    assert inject.segments_fit(model, 40, 10)
    monkeypatch.setattr(model.config, "sliding_window", 45, raising=False)
    assert not inject.segments_fit(model, 40, 10)
    assert inject.segments_fit(model, 30, 10)
    monkeypatch.setattr(model.config, "sliding_window", None)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    assert not inject.segments_fit(model, 40, 10)


def test_packing_is_chosen_only_where_it_saves(monkeypatch):
    model = MODELS["llama"]
    assert packing_saves(model, [40, 5, 6, 4, 5, 6, 7, 5], [20])  # mostly padding: pack
    assert not packing_saves(model, [64] * 8, [20])  # no padding: packing would only add attention
    monkeypatch.setattr(inject, "MAX_PACKED_TOKENS", 50)
    assert not packing_saves(model, [40, 5, 6, 4, 5, 6, 7, 5], [20])  # too long a packed sequence
    monkeypatch.setattr(inject, "MAX_PACKED_TOKENS", 4096)
    monkeypatch.setattr(model.config, "sliding_window", 50, raising=False)
    assert not packing_saves(model, [40, 5, 6, 4, 5, 6, 7, 5], [20])  # a row + prompt beyond the window
    assert packing_saves(model, [25, 5, 6, 4, 5, 6, 7, 5], [20])  # every row within one window
    monkeypatch.setattr(model.config, "sliding_window", None)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2")
    assert not packing_saves(model, [40, 5, 6, 4, 5, 6, 7, 5], [20])  # flash kernels take no custom mask


def test_training_step_packs_uneven_batches(tiny_bank, monkeypatch):
    """learn_task's loss goes through the packed forward when rows differ a lot in length, the padded one when
    they do not."""
    calls = []
    real = inject.forward_packed

    def spy(*a, **kw):
        calls.append(len(a[1]))
        return real(*a, **kw)

    monkeypatch.setattr("promptbank.causal.forward_packed", spy)
    from conftest import fast_options

    short = [{"text": w, "label": lab} for w, lab in [("ok", "a"), ("no", "b")] * 4]
    long = [{"text": "a much longer text that goes on " * 6, "label": "a"}, {"text": "x " * 60, "label": "b"}]
    tiny_bank.learn_task("mixed", short + long, num_virtual_tokens=2, **fast_options(batch_size=10, dev_fraction=0))
    assert calls, "uneven batches should run packed"
    calls.clear()
    even = [{"text": f"text number {i:03d}", "label": "ab"[i % 2]} for i in range(12)]
    tiny_bank.learn_task("even", even, num_virtual_tokens=2, **fast_options(dev_fraction=0))
    assert not calls


def test_models_whose_packed_forward_differs_are_never_packed():
    """A one-off check per model: Bloom biases attention by absolute key position (ALiBi), so its packed
    forward differs from the padded one and its batches stay padded; the other layouts pass."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(make_tiny_tokenizer()), hidden_size=32, n_layer=2, n_head=4))
    bloom.config._attn_implementation = "sdpa"  # as if it took a custom mask: the check still refuses it
    assert not inject._check_packing(bloom.eval())
    assert not packing_saves(bloom, [40, 5, 6, 4, 5, 6, 7, 5], [20])
    assert not inject.segments_fit(bloom, 10, 4)  # its label continuations run on copies of the cache
    assert all(inject._packing_matches(m) for m in MODELS.values())

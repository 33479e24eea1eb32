"""The last decoder layer runs its feed-forward block and its attention's query / output projections only at the
positions whose final hidden state is read (training targets, each row's last input position when ranking labels
or starting generation, none for a prompt's own keys/values). Same values and prompt gradients as the full forward,
on Llama (GQA), Qwen2, Mistral and GPT-2 layouts; a model whose sub-modules are not per-position runs in full."""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer
from test_packing import INPUTS, LABELS, MODELS, TARGETS, _prompts

from promptbank import inject
from promptbank.causal import generate, label_scores, target_logprobs
from promptbank.inject import decoder_layers, prompt_kv


def _mlp_rows(model) -> list[int]:
    """Spy inside the last layer's feed-forward block (its first sub-module): the number of positions of each
    call's input, as the block really runs it."""
    seen: list[int] = []
    inner = next(iter(decoder_layers(model)[-1].mlp.children()))
    handle = inner.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[:-1].numel()))
    return seen, handle


def _both_ways(model, run, seen=None):
    """``run(row_kv)`` -> per-row tensors, with pruning off then on, on fresh prompts each time: returns the
    (values, prompt gradients) pairs. ``seen``: a :func:`_mlp_rows` list, cleared before the batch's forward
    (after the prompts' and the one-off check), whose content then goes to ``out["rows"][prune]``."""
    out = {"rows": {}}
    for prune in (False, True):
        inject.PRUNING = prune
        try:
            params, row_kv = _prompts(model)
            inject._prunable(model)  # the one-off check, if not done yet
            if seen is not None:
                seen.clear()
            flat = torch.cat([x.reshape(-1) for x in run(row_kv)])
            out["rows"][prune] = list(seen or [])
            out[prune] = (flat.detach(), torch.autograd.grad(flat.sum(), params))
        finally:
            inject.PRUNING = True
    return out


def _assert_same(out):
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    for pruned, full in zip(out[True][1], out[False][1]):
        assert full.abs().sum() > 0
        torch.testing.assert_close(pruned, full, atol=1e-5, rtol=1e-4)


def _frozen(arch):
    model = MODELS[arch].eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _checked_both_ways(arch, run):
    """:func:`_both_ways` of ``run(model, tokenizer, row_kv)`` on a frozen model of ``arch``, with the last
    feed-forward block's rows recorded; checks the two ways agree. Returns (out, model)."""
    model, tok = _frozen(arch), make_tiny_tokenizer()
    seen, handle = _mlp_rows(model)
    try:
        out = _both_ways(model, lambda row_kv: run(model, tok, row_kv), seen)
    finally:
        handle.remove()
    _assert_same(out)
    return out, model


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("pack", [False, True])
def test_targets_equal_full_forward_with_equal_gradients(arch, pack):
    out, model = _checked_both_ways(
        arch, lambda m, tok, row_kv: target_logprobs(m, tok, row_kv, INPUTS, TARGETS, pack=pack)
    )
    assert inject._PRUNING_CHECKED[model] is True
    fed = [len(i) + len(t) - 1 for i, t in zip(INPUTS, TARGETS)]  # the last target token is not fed
    assert out["rows"][False] == [sum(fed) if pack else len(fed) * max(fed)]
    assert out["rows"][True] == [sum(len(t) for t in TARGETS)]  # the target positions only


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("pack", [False, True])
def test_label_scores_equal_full_forward_with_equal_gradients(arch, pack):
    """Only each row's last input position is read; the labels' continuations use the last layer's cache, which
    pruning leaves exact."""
    out, _ = _checked_both_ways(arch, lambda m, tok, row_kv: label_scores(m, tok, row_kv, INPUTS, LABELS, pack=pack))
    assert out["rows"][True][0] == len(INPUTS)  # the inputs' forward: each row's last position only
    assert out["rows"][False][0] == (sum(map(len, INPUTS)) if pack else len(INPUTS) * max(map(len, INPUTS)))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generation_equals_full_forward(arch):
    model, tok = _frozen(arch), make_tiny_tokenizer()
    got = {}
    for prune in (False, True):
        inject.PRUNING = prune
        try:
            _, row_kv = _prompts(model)
            with torch.no_grad():
                got[prune] = generate(model, tok, row_kv, INPUTS, max_new_tokens=6)
        finally:
            inject.PRUNING = True
    assert got[True] == got[False]


def test_prompt_keys_values_are_exact_though_no_position_is_read():
    model = _frozen("llama")
    d = model.config.hidden_size
    prompt = {0: torch.randn(4, d, generator=torch.Generator().manual_seed(3))}
    kv = prompt_kv(model, prompt)
    inject.PRUNING = False
    try:
        full = prompt_kv(model, prompt)
    finally:
        inject.PRUNING = True
    for (k, v), (k0, v0) in zip(kv, full):
        torch.testing.assert_close(k, k0)
        torch.testing.assert_close(v, v0)


def _mixing_model():
    """A tiny Llama whose last feed-forward block mixes positions (a running sum): not per-position."""
    model = make_tiny_model(len(make_tiny_tokenizer()), seed=4).eval()
    mlp = decoder_layers(model)[-1].mlp
    base = type(mlp)

    class Mixing(base):
        def forward(self, x):
            return base.forward(self, x) + 0.5 * x.cumsum(dim=-2)

    mlp.__class__ = Mixing
    return model


def test_model_with_a_position_mixing_block_runs_in_full():
    model, tok = _mixing_model(), make_tiny_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    out = _both_ways(model, lambda row_kv: target_logprobs(model, tok, row_kv, INPUTS, TARGETS, pack=False))
    _assert_same(out)
    assert inject._PRUNING_CHECKED[model] is False
    assert all("forward" not in vars(m) for m in decoder_layers(model)[-1].modules())  # put back


def test_weights_untouched_copies_and_pickles_run_their_own_weights():
    model, tok = make_tiny_model(len(make_tiny_tokenizer()), seed=5).eval(), make_tiny_tokenizer()
    keys = list(model.state_dict())
    rows = [[5, 6, 7, 8], [9, 10, 11, 12]]
    target = [[1], [2]]
    with torch.no_grad():
        before = torch.cat(target_logprobs(model, tok, [None, None], rows, target, pack=False))
    assert inject._PRUNING_CHECKED[model] is True and list(model.state_dict()) == keys

    twin = copy.deepcopy(model)
    with torch.no_grad():
        decoder_layers(twin)[-1].mlp.down_proj.weight.mul_(3.0)
        assert torch.equal(torch.cat(target_logprobs(model, tok, [None, None], rows, target, pack=False)), before)
        changed = torch.cat(target_logprobs(twin, tok, [None, None], rows, target, pack=False))
    assert not torch.allclose(changed, before)
    assert inject._PRUNING_CHECKED[twin] is True  # the copy prunes too, with its own modules

    restored = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        again = torch.cat(target_logprobs(restored, tok, [None, None], rows, target, pack=False))
    torch.testing.assert_close(again, before)


def test_other_threads_run_in_full_meanwhile():
    model = _frozen("llama")
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 10]])
    with torch.no_grad():
        full = model.base_model(input_ids=ids).last_hidden_state
        other = {}
        with inject.reading(model, [3], ids.numel()):
            pruned = model.base_model(input_ids=ids).last_hidden_state
            thread = threading.Thread(target=lambda: other.setdefault("h", model.base_model(input_ids=ids)))
            thread.start()
            thread.join()
    torch.testing.assert_close(other["h"].last_hidden_state, full)
    torch.testing.assert_close(pruned[0, 3], full[0, 3])
    assert not torch.allclose(pruned[1], full[1])  # unread positions were skipped


def test_nothing_is_skipped_when_most_positions_are_read():
    model = _frozen("llama")
    seen, handle = _mlp_rows(model)
    try:
        with torch.no_grad(), inject.reading(model, [0, 1, 2], 4):
            model.base_model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    finally:
        handle.remove()
    assert seen == [4]  # three of four read: the full forward


def test_the_check_runs_in_eval_mode_and_restores_training_mode():
    """Dropout would make the check's two forwards differ; the model's mode is left as it was."""
    model = make_tiny_model(len(make_tiny_tokenizer()), seed=6).train()
    for layer in decoder_layers(model):
        layer.self_attn.attention_dropout = 0.5  # what LlamaConfig(attention_dropout=0.5) sets
    assert inject._prunable(model) is True
    assert model.training

"""The prompt prefix cache's byte budget (``bank.kv_cache_bytes``) on a tiny GQA Llama: never exceeded, least
recently used evicted, evicted prefixes recomputed with identical outputs, both limits applied."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import fast_options
from test_bank import ECHO, FRUIT, WEATHER

from promptbank import PromptBank
from promptbank.bank import KV_CACHE_FRACTION
from promptbank.embed import HashingEmbedder
from promptbank.inject import prompt_kv

TEXTS = ["the weather is sunny today", "i would like to eat a lemon", "the weather is awful", "eat a cherry"]


@pytest.fixture(scope="module")
def bank_dir(_tiny_backbone_proto, tmp_path_factory):
    """Four tasks (three classification, one generation; input-level and deep prompts), trained once."""
    bank = PromptBank(copy.deepcopy(_tiny_backbone_proto), HashingEmbedder(dim=128))
    opts = fast_options(max_steps=3)
    bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **opts)
    bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=5, **opts)
    bank.learn_task("weather2", WEATHER, method="ptuning_mlp", num_virtual_tokens=4, **opts)
    bank.learn_task("echo", ECHO, num_virtual_tokens=3, **opts)
    path = tmp_path_factory.mktemp("kv_budget") / "bank"
    bank.save(path)
    return path


@pytest.fixture
def bank(bank_dir, tiny_backbone):
    """The four-task bank, loaded fresh (empty cache, unlimited budget)."""
    bank = PromptBank.load(bank_dir, backbone=tiny_backbone)
    bank.kv_cache_bytes = 1 << 30
    return bank


def _entry_bytes(bank, name: str) -> int:
    with torch.no_grad():
        kv = prompt_kv(bank.backbone.model, bank._tasks[name].prompt)
    return sum(t.numel() * t.element_size() for pair in kv for t in pair)


def _scores(bank, tasks):
    return [(p.output, p.label_scores) for p in bank.predict(TEXTS, tasks, batch_size=1)]


def test_default_budget_is_a_fraction_of_the_parameter_bytes(tiny_bank):
    params = sum(p.numel() * p.element_size() for p in tiny_bank.backbone.model.parameters())
    assert tiny_bank.kv_cache_bytes == int(KV_CACHE_FRACTION * params)
    tiny_bank.kv_cache_bytes = 123
    assert tiny_bank.kv_cache_bytes == 123
    tiny_bank.kv_cache_bytes = None
    assert tiny_bank.kv_cache_bytes == int(KV_CACHE_FRACTION * params)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="kv_cache_bytes"):
            tiny_bank.kv_cache_bytes = bad


def test_cache_never_exceeds_the_budget_and_outputs_are_identical(bank):
    tasks = ["weather", "fruit", "weather2", "fruit"]
    orders = [tasks, tasks[::-1], ["fruit", "weather", "weather", "weather2"], ["weather2"] * 4]
    ref = [_scores(bank, order) for order in orders]  # every prefix cached
    ref_gen = bank.generate(["repeat cat", "the weather is sunny"], ["echo", "weather"], max_new_tokens=4)
    assert len(bank._kv) == 4
    sizes = {n: _entry_bytes(bank, n) for n in bank.tasks}
    assert bank.kv_cache_nbytes == sum(sizes.values())

    budget = sizes["weather"] + sizes["fruit"] + sizes["weather2"] // 2  # two or three of the four fit
    bank.kv_cache_bytes = budget
    assert bank.kv_cache_nbytes <= budget and len(bank._kv) < 4  # setting it evicts at once
    for _ in range(3):
        for order, want in zip(orders, ref):
            assert _scores(bank, order) == want
            assert bank.kv_cache_nbytes <= budget
            assert sum(e[2] for e in bank._kv.values()) == bank.kv_cache_nbytes
            assert 1 <= len(bank._kv) < 4
        gen = bank.generate(["repeat cat", "the weather is sunny"], ["echo", "weather"], max_new_tokens=4)
        assert gen == ref_gen
        assert bank.kv_cache_nbytes <= budget


def test_least_recently_used_is_evicted(bank):
    one = _entry_bytes(bank, "weather")
    assert _entry_bytes(bank, "weather2") == one  # same prompt length and layout
    bank.kv_cache_bytes = 2 * one
    bank._kv.clear()
    for name in ("weather", "weather2"):
        bank.prompt_prefix(name)
    kept = bank.prompt_prefix("weather")  # now the most recently used
    bank.prompt_prefix("echo")  # smaller (3 positions): weather2 goes, weather stays
    assert list(bank._kv) == ["weather", "echo"]
    assert bank.prompt_prefix("weather") is kept  # a hit: the same object


def test_evicted_prefix_is_recomputed_exactly(bank):
    first = bank.prompt_prefix("fruit")
    ref = prompt_kv(bank.backbone.model, bank._tasks["fruit"].prompt)
    for (k, v), (rk, rv) in zip(first, ref):
        assert k.shape == rk.shape and v.shape == rv.shape
        assert torch.equal(k, rk) and torch.equal(v, rv)
        assert k.untyped_storage().data_ptr() == first[0][0].untyped_storage().data_ptr()  # one block per task
    bank.kv_cache_bytes = 0  # caches nothing: every use recomputes
    assert len(bank._kv) == 0 and bank.kv_cache_nbytes == 0
    again = bank.prompt_prefix("fruit")
    assert again is not first and len(bank._kv) == 0
    assert all(torch.equal(a, b) and torch.equal(c, d) for (a, c), (b, d) in zip(first, again))
    assert not first[0][0].requires_grad


def test_both_limits_apply(bank):
    tasks = ["weather", "fruit", "weather2", "fruit"]
    ref = _scores(bank, tasks)
    bank.kv_cache_size = 1  # a task count, with bytes to spare
    assert len(bank._kv) == 1
    assert _scores(bank, tasks) == ref
    assert len(bank._kv) == 1
    bank.kv_cache_size = 3
    bank.kv_cache_bytes = _entry_bytes(bank, "weather")  # now the byte budget binds: one 4-position prefix
    assert _scores(bank, tasks) == ref
    assert len(bank._kv) <= 1 and bank.kv_cache_nbytes <= bank.kv_cache_bytes


def test_removed_and_replaced_tasks_leave_the_accounting_right(bank):
    for name in bank.tasks:
        bank.prompt_prefix(name)
    bank.remove_task("fruit")
    assert "fruit" not in bank._kv
    assert bank.kv_cache_nbytes == sum(_entry_bytes(bank, n) for n in bank._kv)
    bank.kv_cache_bytes = _entry_bytes(bank, "weather")
    assert bank.kv_cache_nbytes <= bank.kv_cache_bytes


def test_concurrent_readers_with_a_tiny_budget(bank):
    tasks = ["weather", "fruit", "weather2", "fruit"]
    ref = _scores(bank, tasks)
    bank.kv_cache_bytes = _entry_bytes(bank, "weather")  # thrashes: almost every use is a miss
    errors: list[BaseException] = []

    def worker(shift: int) -> None:
        try:
            texts, order = TEXTS[shift:] + TEXTS[:shift], tasks[shift:] + tasks[:shift]
            want = ref[shift:] + ref[:shift]
            for _ in range(3):
                got = [(p.output, p.label_scores) for p in bank.predict(texts, order, batch_size=1)]
                assert [g[0] for g in got] == [w[0] for w in want]
                # not bit-equal: torch ops running in 4 threads at once may split their reductions differently
                for (_, scores), (_, ref_scores) in zip(got, want):
                    assert scores.keys() == ref_scores.keys()
                    assert list(scores.values()) == pytest.approx(list(ref_scores.values()), rel=1e-5, abs=1e-6)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert bank.kv_cache_nbytes <= bank.kv_cache_bytes


def test_one_call_computes_each_tasks_prefix_once_even_past_the_budget(bank, monkeypatch):
    """A call naming more tasks than the budget holds fetches each task's prefix once (not once per row), so the
    cache cannot thrash inside it; outputs are those of the fully cached bank."""
    import promptbank.bank as bank_mod

    tasks = ["weather", "fruit", "weather2", "fruit", "weather", "weather2"]
    texts = TEXTS + TEXTS[:2]
    want = [(p.output, p.label_scores) for p in bank.predict(texts, tasks, batch_size=2)]
    want_gen = bank.generate(texts[:4], ["echo", "weather", "echo", "fruit"], max_new_tokens=3, batch_size=1)
    bank.kv_cache_bytes = 0  # nothing stays cached
    computed: list[int] = []
    real = bank_mod.prompt_kv
    monkeypatch.setattr(bank_mod, "prompt_kv", lambda model, prompt: computed.append(1) or real(model, prompt))
    got = [(p.output, p.label_scores) for p in bank.predict(texts, tasks, batch_size=2)]
    assert got == want and len(computed) == 3  # three distinct tasks
    computed.clear()
    gen = bank.generate(texts[:4], ["echo", "weather", "echo", "fruit"], max_new_tokens=3, batch_size=1)
    assert gen == want_gen and len(computed) == 3


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_a_hook_half_registered_by_another_thread_is_ignored(bank, enc_bank, kind):
    """torch registers a ``with_kwargs`` pre-hook in two steps (the hook, then its with-kwargs flag) and removes it in
    two; a forward in another thread in between calls the hook *without* kwargs. That once failed CI with "missing 1
    required positional argument: 'kwargs'" in the concurrent-readers test above. Here the window is held open:
    another thread makes the hook and files only its first half; this thread's forward must run unchanged."""
    from promptbank.encoder import _RowOverwrite, encoder_layers
    from promptbank.inject import _OverwriteHidden, decoder_layers

    b = bank if kind == "causal" else enc_bank
    if kind == "encoder":
        b.learn_task("weather", WEATHER, method="deep", num_virtual_tokens=3, **fast_options(max_steps=2))
    name = "weather"
    want = [(p.output, p.label_scores) for p in b.predict(TEXTS[:2], [name, name])]
    model = b.backbone.model
    layer = (decoder_layers(model) if kind == "causal" else encoder_layers(model))[1]
    made = []

    def make() -> None:  # owned by another thread, as when that thread is mid-registration
        d = model.config.hidden_size
        hook = (
            _OverwriteHidden(torch.ones(1, 2, d))
            if kind == "causal"
            else _RowOverwrite(torch.ones(1, 2, d), torch.tensor([True]))
        )
        made.append(hook)

    t = threading.Thread(target=make)
    t.start()
    t.join()
    layer._forward_pre_hooks[-1] = made[0]  # the first half of register_forward_pre_hook(..., with_kwargs=True)
    try:
        got = [(p.output, p.label_scores) for p in b.predict(TEXTS[:2], [name, name])]
    finally:
        del layer._forward_pre_hooks[-1]
    assert got == want

"""``TrainConfig.balance_labels``: label-balanced training batches, a class-balanced embedding probe and balanced
dev metrics for data whose labels are far from equally common; refused where it has no meaning."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import fast_options, make_tiny_bert

from promptbank import PromptBank, TrainConfig
from promptbank.encoder import fit_probe
from promptbank.train import _balanced_batches, balanced_mean

# 18 rows of "other", 2 of "refund": the rare label is what a plain sample almost never shows
SKEWED = [{"text": f"general note number {i} about the office", "label": "other"} for i in range(18)] + [
    {"text": "please refund my money for the broken order", "label": "refund"},
    {"text": "I want a refund, the parcel never arrived", "label": "refund"},
]


def test_balanced_batches_draw_each_label_equally_and_cycle_its_rows():
    labels = [0] * 90 + [1] * 9 + [2]  # 90 / 9 / 1
    batches = _balanced_batches(labels, 10, random.Random(0))
    drawn = [i for _ in range(600) for i in next(batches)]
    counts = Counter(labels[i] for i in drawn)
    assert all(abs(counts[k] / len(drawn) - 1 / 3) < 0.02 for k in (0, 1, 2))
    per_row = Counter(drawn)
    assert set(per_row) == set(range(100))  # every row is drawn ...
    rare = [i for i in range(90, 99)]  # ... and a label's rows evenly: each cycle shows each row once
    assert max(per_row[i] for i in rare) - min(per_row[i] for i in rare) <= 1


def test_balanced_batches_are_deterministic_for_a_seed():
    labels = [0] * 30 + [1] * 3
    a = _balanced_batches(labels, 4, random.Random(5))
    b = _balanced_batches(labels, 4, random.Random(5))
    assert [next(a) for _ in range(20)] == [next(b) for _ in range(20)]
    c = _balanced_batches(labels, 4, random.Random(6))
    assert [next(c) for _ in range(20)] != [next(_balanced_batches(labels, 4, random.Random(5))) for _ in range(20)]


def test_balanced_mean_is_the_mean_of_the_groups_means():
    assert balanced_mean([1, 1, 1, 0], [0, 0, 0, 1]) == pytest.approx(0.5)  # plain mean: 0.75
    assert balanced_mean([2.0, 4.0, 9.0], [3, 3, 7]) == pytest.approx((3.0 + 9.0) / 2)
    with pytest.raises(ValueError):
        balanced_mean([1.0], [0, 1])


def test_weighted_probe_matches_repeated_rows():
    """Integer sample weights are the same objective as repeating rows: the same probe."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    y = [0] * 9 + [1] * 3
    weights = [1.0] * 9 + [3.0] * 3
    repeated = fit_probe(np.concatenate([x, x[9:], x[9:]]), y + [1] * 6, 2, c=1.0)
    weighted = fit_probe(x, y, 2, c=1.0, sample_weight=weights)
    assert torch.allclose(weighted["probe_weight"], repeated["probe_weight"], atol=1e-4)
    assert torch.allclose(weighted["probe_bias"], repeated["probe_bias"], atol=1e-4)
    assert torch.equal(
        fit_probe(x, y, 2, c=1.0)["probe_weight"], fit_probe(x, y, 2, c=1.0, sample_weight=None)["probe_weight"]
    )
    for bad in ([1.0] * 11, [1.0] * 11 + [-1.0], [1.0] * 11 + [float("nan")]):
        with pytest.raises(ValueError, match="sample_weight"):
            fit_probe(x, y, 2, c=1.0, sample_weight=bad)


def test_config_checks():
    assert TrainConfig().balance_labels is False
    with pytest.raises(ValueError, match="balance_labels"):
        TrainConfig(balance_labels="yes")
    with pytest.raises(ValueError, match="pass one of them"):
        TrainConfig(balance_labels=True, length_bucketing=True)


@pytest.fixture
def enc_bank(hashing_embedder):
    return PromptBank(make_tiny_bert(), hashing_embedder)


@pytest.mark.parametrize("backbone", ["encoder", "causal"])
def test_a_balanced_task_learns_sees_its_rare_label_and_is_recorded(backbone, enc_bank, tiny_bank, monkeypatch):
    bank = enc_bank if backbone == "encoder" else tiny_bank
    import promptbank.train as train_mod

    seen: list[list[int]] = []
    real = train_mod._balanced_batches

    def spy(labels, batch_size, rng):
        for batch in real(labels, batch_size, rng):
            seen.append([labels[i] for i in batch])
            yield batch

    monkeypatch.setattr(train_mod, "_balanced_batches", spy)
    rec = bank.learn_task("skewed", SKEWED, balance_labels=True, dev_fraction=0.0, **fast_options(max_steps=6))
    assert rec.train_config["balance_labels"] is True
    drawn = Counter(lab for batch in seen for lab in batch)
    assert len(seen) == 6 and drawn[1] >= 0.3 * sum(drawn.values())  # "refund" is 10 % of the rows
    probe = bank._tasks["skewed"].head
    assert probe is not None and "probe_weight" in probe
    assert bank.predict(["I want my money back, refund please"], task="skewed")[0].output in ("other", "refund")


def test_the_balanced_probe_leans_towards_the_rare_label(enc_bank):
    """The probe alone, on the training inputs: the balanced fit gives the rare label a higher bias relative to the
    common one and recalls it at least as well."""
    from promptbank.encoder import probe_logprobs

    recall, gap = {}, {}
    emb = torch.as_tensor(enc_bank.embedder.encode([r["text"] for r in SKEWED]), dtype=torch.float32)
    for balance in (False, True):
        name = f"t{int(balance)}"
        enc_bank.learn_task(name, SKEWED, balance_labels=balance, dev_fraction=0.0, **fast_options(max_steps=2))
        head, labels = enc_bank._tasks[name].head, enc_bank.tasks[name].labels
        pred = probe_logprobs(head, emb).argmax(-1).tolist()
        recall[balance] = np.mean([labels[p] == "refund" for p, r in zip(pred, SKEWED) if r["label"] == "refund"])
        gap[balance] = float(head["probe_bias"][labels.index("refund")] - head["probe_bias"][labels.index("other")])
    assert gap[True] > gap[False] and recall[True] >= recall[False]


def test_balance_labels_is_refused_for_generation(tiny_bank):
    rows = [{"input": f"q{i}", "target": f"a{i}"} for i in range(6)]
    with pytest.raises(ValueError, match="balance_labels balances a classification task's labels"):
        tiny_bank.learn_task("gen", rows, balance_labels=True, **fast_options(max_steps=1))
    assert "gen" not in tiny_bank.tasks


def test_dev_accuracy_that_picks_the_state_is_balanced_on_encoders(enc_bank, monkeypatch):
    import promptbank.bank as bank_mod

    calls: list[tuple[list[float], list[int]]] = []
    real = bank_mod.balanced_mean

    def spy(values, groups):
        calls.append((list(values), list(groups)))
        return real(values, groups)

    monkeypatch.setattr(bank_mod, "balanced_mean", spy)
    rows = SKEWED + [dict(r) for r in SKEWED[-2:]] * 2  # enough rare rows for the dev split to hold some
    enc_bank.learn_task("skewed", rows, balance_labels=True, dev_fraction=0.3, **fast_options(max_steps=2))
    assert calls and all(len(v) == len(g) for v, g in calls)
    assert len({tuple(g) for _, g in calls}) == 1  # the same dev rows each time
    assert len(set(calls[0][1])) == 2  # both labels in the dev rows

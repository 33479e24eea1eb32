"""Pieces of benchmarks/clinc.py that its numbers rest on: the AUROC and the per-intent CLINC sampling."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import clinc  # noqa: E402


def test_auroc_matches_scikit_learn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(5):
        pos = rng.integers(0, 6, size=40).astype(float)  # many ties
        neg = rng.integers(0, 5, size=70).astype(float)
        ref = metrics.roc_auc_score(np.r_[np.ones(40), np.zeros(70)], np.r_[pos, neg])
        assert clinc.auroc(pos, neg) == pytest.approx(ref)
    assert clinc.auroc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 1.0
    assert clinc.auroc(np.array([0.0]), np.array([1.0])) == 0.0


def test_load_clinc_samples_per_intent_and_keeps_domains_apart(tmp_path):
    folder = tmp_path / "clinc150"
    folder.mkdir()
    domains = {"bank": ["balance", "transfer"], "travel": ["book_flight", "carry_on"]}
    (folder / "labels.json").write_text(
        json.dumps({"labels": [i for v in domains.values() for i in v], "domains": domains})
    )
    for split, n in (("train", 8), ("test", 5)):
        rows = [{"text": f"{split} {it} {k}", "label": it} for v in domains.values() for it in v for k in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "oos_test.jsonl").write_text(
        "\n".join(json.dumps({"text": f"oos {k}", "label": "oos"}) for k in range(9))
    )
    stream, oos = clinc.load_clinc(tmp_path, 3, None, seed=0, domains=None)
    assert list(stream) == ["bank", "travel"]
    train = stream["bank"]["train"]
    assert train.labels == ["balance", "transfer"] and len(train) == 6
    assert {ex.target for ex in train.examples} == {"balance", "transfer"}
    assert len(stream["travel"]["test"]) == 10  # full test split when no sample size is given
    assert len(oos) == 9
    again, _ = clinc.load_clinc(tmp_path, 3, None, seed=0, domains=None)
    assert [ex.input for ex in again["bank"]["train"].examples] == [ex.input for ex in train.examples]
    one, _ = clinc.load_clinc(tmp_path, 3, 2, seed=0, domains=1)
    assert list(one) == ["bank"] and len(one["bank"]["test"]) == 4

"""benchmarks/routing_examples.py on tiny fake dataset folders, the tiny backbone and the hashing embedder (its full
run needs the real data and embedder)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import forgetting  # noqa: E402
import routing_examples as rex  # noqa: E402


def _rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _data(root: Path) -> Path:
    for short in rex.QUICK_TASKS:
        folder, pool_file, test_file, domain = forgetting.DATASETS[short]
        labels = [f"{short}_{c}" for c in "abc"]
        if domain is not None:
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / "labels.json").write_text(json.dumps({"domains": {domain: labels}}))
        else:
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / "labels.json").write_text(json.dumps({"labels": labels}))
        for fname in {pool_file, test_file} - {None}:
            # News Style Text, Like AG News Rows: capitalised words and punctuation, which preprocess() removes
            _rows(root / folder / fname, [
                {"text": f"The {short.title()} Story Of {lab.title()}, Part {k}!", "label": lab}
                for lab in labels for k in range(60)
            ])  # fmt: skip
    _rows(root / "yelp_reviews" / "train.jsonl", [{"text": f"great food number {k}", "label": "5"} for k in range(80)])
    _rows(root / "yelp_reviews" / "dev.jsonl", [{"text": f"great food review {k}", "label": "5"} for k in range(20)])
    _rows(root / "clinc150" / "oos_test.jsonl", [{"text": f"play song {k}", "label": "oos"} for k in range(30)])
    return root


def test_preprocess_strips_case_punctuation_and_stop_words():
    assert rex.preprocess("I'm charged TWICE for the same order, and it's not fair!") == "im charged twice order fair"


def test_run_seed_measures_each_case_for_each_k(tmp_path, tiny_backbone, hashing_embedder):
    data = _data(tmp_path / "data")
    res = rex.run_seed(data, rex.QUICK_TASKS, [0, 4, 16], 0, tiny_backbone, hashing_embedder)
    assert res["n_queries"] == {"new_source": 20, "preprocessed": 90} and res["n_oos"] == 30
    for case in rex.CASES:
        rows = res[case]
        assert [r["k"] for r in rows] == [0, 4, 16]
        for r in rows:
            for m in ("queries_to_task", "queries_rejected", "other_queries_hit1", "oos_rejected", "oos_to_task"):
                assert 0.0 <= r[m] <= 1.0
            elsewhere = sum(r["queries_elsewhere"].values()) / res["n_queries"][case]
            assert r["queries_to_task"] + r["queries_rejected"] + elsewhere == pytest.approx(1.0)
    # natural AG rows next to a task learned from their preprocessed form: examples in the natural form help
    pre = res["preprocessed"]
    assert pre[-1]["queries_to_task"] > pre[0]["queries_to_task"]
    summary = rex.summarize([res], [0, 4, 16])
    assert summary["preprocessed"][0]["queries_to_task"] == pre[0]["queries_to_task"]
    assert "| preprocessed (ag) | 16 |" in rex.table(summary)

"""benchmarks/step_budget.py on a tiny config-built BERT, a hashing embedder and tiny fake CL-4 folders."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_bert
from test_bench_forgetting import cl4_dir  # noqa: F401 - fixture

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import probe_refit  # noqa: E402
import step_budget  # noqa: E402


def test_train_and_heldout_are_disjoint_draws_from_the_train_pool(cl4_dir):  # noqa: F811 - fixture
    train, held = step_budget.sample(cl4_dir, "amazon", 2, 3, seed=0)
    assert len(train) == 5 * 2 and len(held) == 5 * 3
    assert not {ex.input for ex in train.examples} & {ex.input for ex in held.examples}
    assert all("example" in ex.input for ex in held.examples)  # from train.jsonl: the test file is never read
    again, _ = step_budget.sample(cl4_dir, "amazon", 2, 3, seed=0)
    assert [ex.input for ex in again.examples] == [ex.input for ex in train.examples]


def test_run_reports_every_task_and_budget(cl4_dir, tmp_path):  # noqa: F811 - fixture
    pytest.importorskip("sklearn")
    from promptbank.embed import HashingEmbedder

    args = argparse.Namespace(
        data=cl4_dir, tasks=["ag", "yahoo"], budgets=[1, 3], seed=0, train_per_class=3, heldout_per_class=2,
        eval_every=1, dev_fraction=0.1, head_lr=1e-2, lr=None, no_probe=False, dtype="float32", precision="fp32",
    )  # fmt: skip
    rows = step_budget.run(args, make_tiny_bert(), HashingEmbedder(64))["rows"]
    assert [(r["task"], r["budget"]) for r in rows] == [("ag", 1), ("ag", 3), ("yahoo", 1), ("yahoo", 3)]
    for r in rows:
        assert 1 <= r["steps_run"] <= r["budget"] and 0 <= r["best_step"] <= r["steps_run"]
        assert 0.0 <= r["heldout_accuracy"] <= 1.0 and 0.0 <= r["logistic_heldout_accuracy"] <= 1.0
    table = step_budget.table(rows)
    assert (
        "| ag |" in table
        and "| **mean** (ag, yahoo) |" in table
        and "3 steps, dev 0.1, head lr 0.01, lr 0.01 + probe (kept step)" in table
    )
    assert all(r["probe"] for r in rows)
    # rows from before the probe existed (no "probe" key) are a setting of their own, without it
    old = [{k: v for k, v in r.items() if k != "probe"} for r in rows]
    assert "3 steps, dev 0.1, head lr 0.01, lr 0.01 (kept step)" in step_budget.table(rows + old)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"config": {"seed": 0}, "rows": rows}))
    b.write_text(json.dumps({"config": {"seed": 1}, "rows": [r | {"seed": 1} for r in rows]}))
    merged = step_budget.main(["--merge", str(a), str(b), "--out", str(tmp_path / "m.json")])
    assert len(merged["rows"]) == 8 and "seeds [0, 1]" in step_budget.table(merged["rows"])


def test_probe_refit_study_swaps_in_what_the_library_stores(cl4_dir, tmp_path):  # noqa: F811 - fixture
    """benchmarks/probe_refit.py: the refitted probe it scores is the one learn_task(probe_refit=True) stores."""
    pytest.importorskip("sklearn")
    import forgetting
    import torch

    from promptbank import PromptBank
    from promptbank.embed import HashingEmbedder

    bert, emb = make_tiny_bert(), HashingEmbedder(64)
    train, held = step_budget.sample(cl4_dir, "ag", 4, 2, seed=0)
    bank = PromptBank(bert, emb, routing="lda")
    row = probe_refit.score_task(bank, "ag", train, held, 0, 2)
    assert row["n_train"] + row["n_dev"] == len(train) and row["n_dev"] >= 1 and row["n_heldout"] == len(held)
    for key in ("heldout_accuracy_probe_train", "heldout_accuracy_probe_refit", "probe_alone_refit"):
        assert 0.0 <= row[key] <= 1.0
    swapped = bank._tasks["ag"].head
    other = PromptBank(bert, emb, routing="lda")
    other.learn_task("ag", train, **(forgetting.LEARN_OPTIONS | {"max_steps": 2, "seed": 0}))
    stored = other._tasks["ag"].head
    assert torch.allclose(swapped["probe_weight"], stored["probe_weight"], atol=1e-5)
    assert torch.equal(swapped["weight"], stored["weight"])  # the same prompted head: the probe changes no step
    table = probe_refit.table([row, row | {"seed": 1}])
    assert "| ag |" in table and "| **mean** |" in table and "seeds [0, 1]" in table

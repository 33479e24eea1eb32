"""benchmarks/balance_labels.py's scoring and tables (its full run needs the real data and backbone)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import balance_labels as bl  # noqa: E402


def test_scores_of_a_majority_predictor_and_of_a_perfect_one():
    golds = ["a"] * 8 + ["b", "c"]
    majority = bl.scores(["a"] * 10, golds)
    assert majority["accuracy"] == pytest.approx(0.8)
    assert majority["balanced_accuracy"] == pytest.approx(1 / 3)  # recalls 1, 0, 0
    assert majority["macro_f1"] == pytest.approx((2 * 0.8 / 1.8) / 3)  # F1 of "a" (P 0.8, R 1); 0 for b and c
    assert (majority["labels_predicted"], majority["labels_present"]) == (1, 3)
    perfect = bl.scores(golds, golds)
    assert perfect["accuracy"] == perfect["macro_f1"] == perfect["balanced_accuracy"] == 1.0


def test_summary_and_table_average_over_seeds():
    run = lambda acc: {  # noqa: E731
        label: {"accuracy": acc, "macro_f1": acc / 2, "balanced_accuracy": acc / 3, "labels_predicted": 2,
                "labels_present": 3, "seconds": 1.0}
        for label in bl.SETTINGS
    }  # fmt: skip
    mean = bl.summarize({"tos": [run(0.5), run(0.7)]})
    assert mean["tos"]["balance_labels"]["accuracy"] == pytest.approx(0.6)
    assert "seconds" not in mean["tos"]["balance_labels"]
    text = bl.table(mean)
    assert "| tos | balance_labels | 60.0 | 30.0 | 20.0 | 2.0 / 3 |" in text

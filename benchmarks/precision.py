"""Does training in bf16 (``TrainConfig.precision="bf16"``, mixed precision under ``torch.autocast``) cost held-out
accuracy, and how much time does it save? A held-out study, no test sets, fp32 and bf16 interleaved in one run.

For each dataset, method and seed: the same sampling and ``learn_task`` settings as ``benchmarks/objective.py``
(``per_class`` training rows and 20 held-out rows per label, disjoint, from the dataset's TRAIN pool; library
defaults except ``max_steps``, ``patience=3``, no warm start, no embedding probe), trained once with
``precision="fp32"`` and once with ``"bf16"`` back to back (so machine load hits both alike); then the held-out
accuracy with the task given (always evaluated in fp32, as a stored task is served) and the training time per step.

    python benchmarks/precision.py --datasets sst5,trec,ag_news --methods prompt_tuning,deep --out c.json
    python benchmarks/precision.py --backbone all-minilm-l6-v2 --datasets ag_news,amazon_reviews,dbpedia,yahoo_answers \\
        --methods deep --per-class 16 --steps 60 --seeds 0,1 --out e.json
    python benchmarks/precision.py --merge c.json --out benchmarks/results/precision_causal.json

Prints a markdown table (held-out accuracy per precision, the difference, and bf16's seconds per training step
as a fraction of fp32's) and writes JSON (config, versions, every run).
"""

from __future__ import annotations

import statistics

from bench_common import mean, require_native_bf16
from objective import learn_and_score, run_record, run_study, seed_groups, study_parser

PRECISIONS = ("fp32", "bf16")


def run_one(bank, pool, name: str, method: str, precision: str, seed: int, per_class: int, steps: int) -> dict:
    scored = learn_and_score(bank, pool, method, seed, per_class, steps, precision=precision)
    return run_record(name, method, "precision", precision, seed, pool, scored)


def summary(runs: list[dict]) -> list[dict]:
    """Per (dataset, method): mean held-out accuracy per precision over the seeds where both ran, and the median
    over those seeds of bf16's seconds per step divided by fp32's (steps differ when early stopping does)."""
    out = []
    for row, by_p in seed_groups(runs, "precision"):
        seeds = row["seeds"]
        for p in PRECISIONS:
            row[p] = 100 * mean([by_p[p][s]["held_out_accuracy"] for s in seeds])
            row[f"{p}_best_step"] = mean([by_p[p][s]["best_step"] for s in seeds])
        per_step = {p: [by_p[p][s]["train_seconds"] / max(1, by_p[p][s]["steps"]) for s in seeds] for p in PRECISIONS}
        row["step_time_ratio"] = statistics.median(b / f for b, f in zip(per_step["bf16"], per_step["fp32"]))
        out.append(row)
    return sorted(out, key=lambda r: (r["method"], r["dataset"]))


def table(rows: list[dict]) -> str:
    lines = [
        "| dataset | labels | method | seeds | fp32 acc. | bf16 acc. | bf16 - fp32 | bf16 / fp32 time per step |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['n_labels']} | {r['method']} | {','.join(map(str, r['seeds']))} | {r['fp32']:.1f} | "
            f"{r['bf16']:.1f} | {r['bf16'] - r['fp32']:+.1f} | {r['step_time_ratio']:.2f} |"
        )
    if rows:
        d = [r["bf16"] - r["fp32"] for r in rows]
        t = statistics.median(r["step_time_ratio"] for r in rows)
        lines.append(
            f"\nbf16 - fp32: mean {mean(d):+.1f} points over {len(rows)} (dataset, method) rows (better on "
            f"{sum(x > 0 for x in d)}, worse on {sum(x < 0 for x in d)}); time per step: median {t:.2f}x"
        )
    return "\n".join(lines)


def main() -> None:
    ap = study_parser(__doc__, "sst5,trec,ag_news", "prompt_tuning,deep")
    ap.add_argument("--backbone", default=None, help="default: SmolLM2-135M-Instruct; e.g. all-minilm-l6-v2")
    args = ap.parse_args()
    if not args.merge:
        require_native_bf16("bf16")
    run_study(args, "precision", list(PRECISIONS), run_one, "precision", summary, table)


if __name__ == "__main__":
    main()

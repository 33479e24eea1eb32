"""Which default learning rate should a soft-prompt method use on the causal backbone? A held-out study, no test sets.

The causal-LM defaults (``promptbank.config.DEFAULT_LR``) were first chosen on the dev loss of the bundled toy tasks.
This study measures them on real data: for each dataset, method, learning rate and seed, the same sampling as
``benchmarks/objective.py`` (``per_class`` training rows and 20 held-out rows per label, disjoint, from the
dataset's TRAIN pool; CLINC150 domains as ``clinc:<domain>``), ``learn_task`` on the default backbone
(SmolLM2-135M) at library defaults except ``lr``, ``max_steps`` (80), ``patience=3`` and no warm start; then the
held-out accuracy with the task given, and the dev loss of the kept state.

    python benchmarks/lr_study.py --methods deep --lrs 0.01,0.03,0.1 --datasets trec,sst5 --seeds 0 --out a.json
    python benchmarks/lr_study.py --merge a.json b.json --out benchmarks/results/lr_study.json
    python benchmarks/lr_study.py --compare benchmarks/results/lr_study.json   # methods paired at each lr

Prints a markdown table (mean held-out accuracy per dataset, method and learning rate over the seeds where every
learning rate ran, and the mean over datasets) and writes JSON (config, versions, every run).
"""

from __future__ import annotations

import json
from pathlib import Path

from bench_common import mean
from objective import learn_and_score, run_record, run_study, seed_groups, study_parser


def run_one(bank, pool, name: str, method: str, lr: float, seed: int, per_class: int, steps: int) -> dict:
    """One learn_task at learning rate ``lr`` + held-out accuracy; ``pool``: ``objective.load_pool``'s output."""
    scored = learn_and_score(bank, pool, method, seed, per_class, steps, lr=lr)
    return run_record(name, method, "lr", lr, seed, pool, scored)


def summary(runs: list[dict]) -> list[dict]:
    """Per (dataset, method): mean held-out accuracy and dev loss of each lr over the seeds where all lrs ran."""
    out = []
    for row, by_lr in seed_groups(runs, "lr"):
        seeds = row["seeds"]
        row["lrs"] = {
            f"{lr:g}": {
                "accuracy": 100 * mean([by_seed[s]["held_out_accuracy"] for s in seeds]),
                "dev_loss": mean([by_seed[s]["dev_loss"] for s in seeds]),
                "best_step": mean([by_seed[s]["best_step"] for s in seeds]),
            }
            for lr, by_seed in sorted(by_lr.items())
        }
        out.append(row)
    return sorted(out, key=lambda r: (r["method"], r["dataset"]))


def table(rows: list[dict]) -> str:
    lines = []
    for method in sorted({r["method"] for r in rows}):
        sub = [r for r in rows if r["method"] == method]
        lrs = sorted({lr for r in sub for lr in r["lrs"]}, key=float)
        lines += [
            f"\n{method}: held-out accuracy % (dev loss of the kept state, kept step)",
            "| dataset | labels | seeds | " + " | ".join(f"lr {lr}" for lr in lrs) + " |",
            "|" + "---|" * (3 + len(lrs)),
        ]
        for r in sub:
            cells = [r["dataset"], str(r["n_labels"]), ",".join(map(str, r["seeds"]))]
            for lr in lrs:
                v = r["lrs"].get(lr)
                cells.append(f"{v['accuracy']:.1f} ({v['dev_loss']:.2f}, {v['best_step']:.0f})" if v else "")
            lines.append("| " + " | ".join(cells) + " |")
        full = [r for r in sub if all(lr in r["lrs"] for lr in lrs)]
        if full:
            means = [f"{mean([r['lrs'][lr]['accuracy'] for r in full]):.1f}" for lr in lrs]
            lines.append(f"| mean of {len(full)} datasets | | | " + " | ".join(means) + " |")
            best = [max(lrs, key=lambda lr, r=r: r["lrs"][lr]["accuracy"]) for r in full]
            lines.append(
                "\nbest lr per dataset (ties: the first): "
                + ", ".join(f"{r['dataset']} {b}" for r, b in zip(full, best))
            )
    return "\n".join(lines)


def compare_methods(runs: list[dict]) -> str:
    """Paired comparison of every two methods at each learning rate, over the (dataset, seed) runs both have:
    per dataset the two means and per-seed differences, then how often the second method did better / the same /
    worse and the mean difference (points of held-out accuracy)."""
    by = {(r["dataset"], r["method"], r["lr"], r["seed"]): r["held_out_accuracy"] for r in runs}
    methods = sorted({r["method"] for r in runs})
    lines = []
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            for lr in sorted({r["lr"] for r in runs}):
                pairs = {}
                for (ds, m, r_lr, seed), acc in by.items():
                    if m == a and r_lr == lr and (ds, b, lr, seed) in by:
                        pairs.setdefault(ds, []).append((seed, acc, by[(ds, b, lr, seed)]))
                if not pairs:
                    continue
                lines += [
                    f"\n{a} vs {b} at lr {lr:g}: held-out accuracy %, paired by (dataset, seed)",
                    f"| dataset | seeds | {a} | {b} | {b} - {a} per seed |",
                    "|---|---|---:|---:|---|",
                ]
                diffs = []
                for ds, rows in sorted(pairs.items()):
                    rows.sort()
                    d = [100 * (y - x) for _, x, y in rows]
                    diffs += d
                    lines.append(
                        f"| {ds} | {','.join(str(s) for s, _, _ in rows)} | {100 * mean([x for _, x, _ in rows]):.1f} | "
                        f"{100 * mean([y for _, _, y in rows]):.1f} | {', '.join(f'{v:+.1f}' for v in d)} |"
                    )
                better = sum(v > 0 for v in diffs)
                same = sum(v == 0 for v in diffs)
                lines.append(
                    f"\n{b} better in {better} of {len(diffs)} paired runs, the same in {same}, worse in "
                    f"{len(diffs) - better - same}; mean difference {mean(diffs):+.1f} points"
                )
    return "\n".join(lines)


def main() -> None:
    ap = study_parser(__doc__, "trec,sst5,subj,cr,ag_news,clinc:banking", "deep")
    ap.add_argument("--lrs", default="0.01,0.03,0.1")
    ap.add_argument("--compare", type=Path, help="print the paired method comparison of this result file and exit")
    args = ap.parse_args()
    if args.compare:
        print(compare_methods(json.loads(args.compare.read_text())["runs"]))
        return
    run_study(args, "lr", [float(x) for x in args.lrs.split(",")], run_one, "lr_study", summary, table)


if __name__ == "__main__":
    main()

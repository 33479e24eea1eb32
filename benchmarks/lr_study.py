"""Which default learning rate should a soft-prompt method use on the causal backbone? A held-out study, no test sets.

The causal-LM defaults (``promptbank.config.DEFAULT_LR``) were first chosen on the dev loss of the bundled toy tasks.
This study measures them on real data: for each dataset, method, learning rate and seed, the same sampling as
``benchmarks/objective.py`` (``per_class`` training rows and 20 held-out rows per label, disjoint, from the
dataset's TRAIN pool; CLINC150 domains as ``clinc:<domain>``), ``learn_task`` on the default backbone
(SmolLM2-135M) at library defaults except ``lr``, ``max_steps`` (80), ``patience=3`` and no warm start; then the
held-out accuracy with the task given, and the dev loss of the kept state.

    python benchmarks/lr_study.py --methods deep --lrs 0.01,0.03,0.1 --datasets trec,sst5 --seeds 0 --out a.json
    python benchmarks/lr_study.py --merge a.json b.json --out benchmarks/results/lr_study.json

Prints a markdown table (mean held-out accuracy per dataset, method and learning rate over the seeds where every
learning rate ran, and the mean over datasets) and writes JSON (config, versions, every run).
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

from bench_common import default_data_dir, mean, versions, write_result
from objective import learn_and_score, load_pool


def run_one(bank, pool, name: str, method: str, lr: float, seed: int, per_class: int, steps: int) -> dict:
    """One learn_task at learning rate ``lr`` + held-out accuracy; ``pool``: ``objective.load_pool``'s output."""
    rec, acc, seconds = learn_and_score(bank, pool, method, seed, per_class, steps, lr=lr)
    return {
        "dataset": name,
        "method": method,
        "lr": lr,
        "seed": seed,
        "labels": len(pool[1]),
        "held_out_accuracy": acc,
        "dev_loss": rec.dev_loss,
        "best_step": rec.best_step,
        "steps": rec.steps,
        "train_seconds": seconds,
    }


def summary(runs: list[dict]) -> list[dict]:
    """Per (dataset, method): mean held-out accuracy and dev loss of each lr over the seeds where all lrs ran."""
    groups = collections.defaultdict(lambda: collections.defaultdict(dict))
    for r in runs:
        groups[(r["dataset"], r["method"])][r["lr"]][r["seed"]] = r
    out = []
    for (ds, method), by_lr in groups.items():
        seeds = sorted(set.intersection(*(set(v) for v in by_lr.values())))
        if not seeds:
            continue
        row = {
            "dataset": ds,
            "method": method,
            "seeds": seeds,
            "n_labels": by_lr[next(iter(by_lr))][seeds[0]]["labels"],
        }
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--datasets", default="trec,sst5,subj,cr,ag_news,clinc:banking")
    ap.add_argument("--methods", default="deep")
    ap.add_argument("--lrs", default="0.01,0.03,0.1")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--merge", nargs="+", type=Path, help="merge the runs of these result files instead")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        runs = [r for p in parts for r in p["runs"]]
        keys = [(r["dataset"], r["method"], r["lr"], r["seed"]) for r in runs]
        if len(set(keys)) != len(keys):
            raise SystemExit("the files repeat a (dataset, method, lr, seed) run")
        config = {**parts[0]["config"], "merged_from": [str(p) for p in args.merge]}
        wall = sum(p["wall_seconds"] for p in parts)
    else:
        from promptbank import PromptBank

        bank = PromptBank.from_pretrained()
        config = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
        config["data"] = str(args.data)
        runs = []
        for name in args.datasets.split(","):
            pool = load_pool(args.data, name)
            for method in args.methods.split(","):
                for lr in map(float, args.lrs.split(",")):
                    for seed in map(int, args.seeds.split(",")):
                        runs.append(run_one(bank, pool, name, method, lr, seed, args.per_class, args.steps))
                        print(json.dumps(runs[-1]), flush=True)
        wall = time.perf_counter() - t0
    rows = summary(runs)
    result = {"config": config, "versions": versions(), "runs": runs, "summary": rows, "wall_seconds": wall}
    write_result(result, args.out, "lr_study")
    print(table(rows))


if __name__ == "__main__":
    main()

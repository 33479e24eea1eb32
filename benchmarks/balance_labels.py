"""Label balancing for data whose labels are far from equally common: ``TrainConfig.balance_labels`` off vs on.

Per dataset and seed, from ONE pool of rows (no test split is read: UNFAIR-ToS has none, Medical Abstracts only
its official test file, which serves as the pool here; CFPB complaints: its train file): one shuffle with the seed,
the first ``--train`` rows to learn from (10 % of them held out as dev by ``learn_task``), the next ``--heldout``
rows (at most the rest of the pool: 300 for CFPB) held out to score. One ``learn_task`` per setting (deep prompt + linear head + embedding probe on the MiniLM
encoder, the library's defaults otherwise, ``warm_start=False``), the task given at scoring. Reported per setting:
accuracy, macro-F1 over the labels present in the held-out rows, balanced accuracy (the mean of the labels'
recalls), and the number of labels ever predicted.

    python benchmarks/balance_labels.py --seeds 0 --out b0.json      # ~30 min at 1 thread; other seeds alongside
    python benchmarks/balance_labels.py --seeds 0 --datasets medical_abstracts --out m0.json   # one dataset
    python benchmarks/balance_labels.py --merge b0.json b1.json      # merged table (per dataset, all seeds)
    python benchmarks/balance_labels.py --quick                      # 2 datasets, few rows, 2 steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import default_data_dir, read_rows, sample_disjoint, versions, write_result  # noqa: E402

DATASETS = {  # name -> the pool file in its folder
    "unfair_tos": "all.jsonl",
    "medical_abstracts": "test.jsonl",
    "cfpb_complaints": "train.jsonl",
}
SETTINGS = {"unbalanced (default)": False, "balance_labels": True}


def scores(preds: list[str], golds: list[str]) -> dict:
    """Accuracy, macro-F1 over the gold labels present, balanced accuracy, labels predicted."""
    from promptbank.metrics import macro_f1
    from promptbank.train import balanced_mean

    present = list(dict.fromkeys(golds))
    hits = [float(p == g) for p, g in zip(preds, golds)]
    return {
        "accuracy": float(np.mean(hits)),
        "macro_f1": float(macro_f1(preds, golds, present)),
        "balanced_accuracy": balanced_mean(hits, golds),  # the mean of the labels' recalls
        "labels_predicted": len(set(preds)),
        "labels_present": len(present),
    }


def run_one(bank, name: str, train: list[dict], held: list[dict], seed: int, steps: int | None) -> dict:
    out = {}
    for label, balance in SETTINGS.items():
        task = f"{name}_{int(balance)}"
        t0 = time.perf_counter()
        options = {"method": "deep", "warm_start": False, "progress": False, "seed": seed, "balance_labels": balance}
        if steps is not None:
            options["max_steps"] = steps
        bank.learn_task(task, train, **options)
        preds = [p.output for p in bank.predict([r["text"] for r in held], task=task, batch_size=64)]
        out[label] = scores(preds, [r["label"] for r in held]) | {"seconds": time.perf_counter() - t0}
        bank.remove_task(task)
        r = out[label]
        print(
            f"seed {seed} {name:18s} {label:22s} acc {100 * r['accuracy']:.1f}  macro-F1 {100 * r['macro_f1']:.1f}  "
            f"balanced acc {100 * r['balanced_accuracy']:.1f}  labels predicted {r['labels_predicted']}/"
            f"{r['labels_present']}  ({r['seconds']:.0f} s)",
            flush=True,
        )
    return out


def summarize(per_seed: dict[str, dict[str, list[dict]]]) -> dict:
    """``{dataset: {setting: {metric: mean over seeds}}}``."""
    return {
        ds: {
            label: {m: float(np.mean([r[label][m] for r in runs])) for m in runs[0][label] if m != "seconds"}
            for label in SETTINGS
        }
        for ds, runs in per_seed.items()
    }


def table(mean: dict) -> str:
    lines = [
        "| dataset | setting | accuracy | macro-F1 | balanced accuracy | labels predicted |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for ds, rows in mean.items():
        for label, r in rows.items():
            lines.append(
                f"| {ds} | {label} | {100 * r['accuracy']:.1f} | {100 * r['macro_f1']:.1f} | "
                f"{100 * r['balanced_accuracy']:.1f} | {r['labels_predicted']:.1f} / {r['labels_present']:.0f} |"
            )
    return "\n".join(lines)


def merge(files: list[Path], out: Path | None) -> dict:
    parts = [json.loads(Path(f).read_text()) for f in files]
    per_seed: dict[str, list] = {}
    for p in parts:
        for ds, runs in p["per_seed"].items():
            per_seed.setdefault(ds, []).extend(runs)
    result = {
        "config": {
            **parts[0]["config"],
            "seeds": sorted({s for p in parts for s in p["config"]["seeds"]}),
            "datasets": sorted(per_seed),
        },
        "merged_from": [str(f) for f in files],
        "versions": parts[0]["versions"],
        "per_seed": per_seed,
        "mean": summarize(per_seed),
        "wall_seconds": sum(p["wall_seconds"] for p in parts),
    }
    print(table(result["mean"]))
    write_result(result, out, "balance_labels")
    return result


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--train", type=int, default=400, help="rows to learn from (10 %% of them held out as dev)")
    ap.add_argument("--heldout", type=int, default=600, help="rows held out to score (at most the pool's rest)")
    ap.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, of: " + ", ".join(DATASETS))
    ap.add_argument("--steps", type=int, default=None, help="max_steps (default: the library's)")
    ap.add_argument("--backbone", default="all-minilm-l6-v2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--merge", nargs="+", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    torch.set_num_threads(args.threads)
    from promptbank import PromptBank

    t_start = time.perf_counter()
    names = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown or not names:
        ap.error(f"--datasets: unknown {unknown}; choose from {list(DATASETS)}")
    datasets = {d: DATASETS[d] for d in names}
    if args.quick:
        datasets = dict(list(datasets.items())[:2])
        args.train, args.heldout, args.steps = 40, 40, 2
    seeds = [int(s) for s in args.seeds.split(",")]
    bank = PromptBank.from_pretrained(args.backbone)
    per_seed: dict[str, list] = {ds: [] for ds in datasets}
    for seed in seeds:
        for ds, pool_file in datasets.items():
            rows = read_rows(args.data / ds / pool_file)
            held_n = min(args.heldout, len(rows) - args.train)  # CFPB's pool: 700 rows
            train, held = sample_disjoint(rows, [args.train, held_n], seed)
            per_seed[ds].append(run_one(bank, ds, train, held, seed, args.steps))
    result = {
        "config": {**{k: str(v) for k, v in vars(args).items()}, "seeds": seeds},
        "versions": versions(),
        "per_seed": per_seed,
        "mean": summarize(per_seed),
        "wall_seconds": time.perf_counter() - t_start,
    }
    print(table(result["mean"]))
    write_result(result, args.out, "balance_labels", quick=args.quick)
    return result


if __name__ == "__main__":
    main()

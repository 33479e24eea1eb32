"""Refitting the embedding probe on the dev rows: held-out accuracy of the CL-4 tasks with the probe fitted on the
training part only vs on the training and dev rows together (``TrainConfig.probe_refit``), no test split.

Per CL-4 task and seed, on data drawn from the TRAIN pools only (``step_budget.sample``: 16 examples per label to
learn from, up to ``--heldout-per-class`` others per label held out): one ``learn_task`` call as in
``forgetting.py`` (deep prompt on MiniLM, 10 % of the rows held out as dev for model selection) with
``probe_refit=False``; held-out accuracy with the task given; then the stored probe is replaced by the one
``probe_refit=True`` stores (refitted on the training and dev parts of the same split; the prompt and its head are
the same, since the probe changes no training step) and the held-out rows are scored again. Also each probe alone
(its argmax on the routing embeddings) and the logistic-head baseline of ``forgetting.py`` (fitted on all rows).

    python benchmarks/probe_refit.py --seed 0 --out r0.json     # ~10 min at 1 thread; other seeds alongside
    python benchmarks/probe_refit.py --merge r0.json r1.json ... # merged table
    python benchmarks/probe_refit.py --quick                    # 2 tasks, 4 per label, 2 steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import default_data_dir, versions, write_result  # noqa: E402

CL4 = ["ag", "amazon", "dbpedia", "yahoo"]


def score_task(bank, name: str, train, held, seed: int, steps: int) -> dict:
    """Learn ``name`` without the refit, score it on ``held``; swap in the refitted probe, score again."""
    import forgetting

    from promptbank import TrainConfig

    t0 = time.perf_counter()
    options = forgetting.LEARN_OPTIONS | {"max_steps": steps, "seed": seed, "probe_refit": False}
    rec = bank.learn_task(name, train, **options)
    task = bank._tasks[name]
    before = bank.evaluate(held, task=name, batch_size=64)["accuracy"]
    # what probe_refit=True stores: the probe refitted on the same split's training and dev parts
    tconf = TrainConfig.from_dict({k: v for k, v in options.items() if k != "method"})
    _, train_part, dev_part, tconf = bank._split_data(train, None, None, rec.labels, tconf)
    dev_emb = bank.embedder.encode([ex.whole_input for ex in dev_part.examples])
    refit = bank._fit_probe(train_part, tconf, None, dev=(dev_part, dev_emb))
    bank._tasks[name] = replace(task, head=dict(task.head) | refit)
    after = bank.evaluate(held, task=name, batch_size=64)["accuracy"]

    emb = bank.embedder.encode([ex.input for ex in held.examples])
    ys = np.array([rec.labels.index(ex.target) for ex in held.examples])

    def alone(head) -> float:
        logits = emb @ head["probe_weight"].numpy().T + head["probe_bias"].numpy()
        return float((logits.argmax(1) == ys).mean())

    logistic = forgetting.fit_logistic(bank.embedder, train, seed).predict(emb)
    return {
        "task": name,
        "seed": seed,
        "n_train": len(train_part),
        "n_dev": len(dev_part),
        "n_heldout": len(held),
        "heldout_accuracy_probe_train": before,
        "heldout_accuracy_probe_refit": after,
        "probe_alone_train": alone(task.head),
        "probe_alone_refit": alone(refit),
        "logistic_heldout_accuracy": float(np.mean([p == ex.target for p, ex in zip(logistic, held.examples)])),
        "dev_accuracy": rec.dev_accuracy,
        "best_step": rec.best_step,
        "seconds": time.perf_counter() - t0,
    }


def table(rows: list[dict]) -> str:
    """Mean held-out accuracy per task over the seeds, and the mean over tasks."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    keys = [
        ("logistic_heldout_accuracy", "logistic head (all rows)"),
        ("probe_alone_train", "probe alone, train part"),
        ("probe_alone_refit", "probe alone, refitted"),
        ("heldout_accuracy_probe_train", "prompt + head + probe, train part"),
        ("heldout_accuracy_probe_refit", "**prompt + head + probe, refitted**"),
    ]
    lines = ["| task | " + " | ".join(k[1] for k in keys) + " | refit - train part, per seed |"]
    lines.append("|---|" + "---:|" * (len(keys) + 1))
    for task in [*tasks, None]:
        rs = [r for r in rows if task is None or r["task"] == task]
        cells = [f"{100 * statistics.mean(r[k] for r in rs):.1f}" for k, _ in keys]
        if task is None:
            diffs = ""
        else:
            diffs = " / ".join(
                f"{100 * (r['heldout_accuracy_probe_refit'] - r['heldout_accuracy_probe_train']):+.1f}"
                for r in sorted(rs, key=lambda r: r["seed"])
            )
        lines.append(f"| {task or '**mean**'} | " + " | ".join(cells) + f" | {diffs} |")
    return f"Held-out (train-pool) accuracy, seeds {seeds}\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--tasks", default=",".join(CL4), help="comma list of forgetting.py task names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-class", type=int, default=16)
    ap.add_argument("--heldout-per-class", type=int, default=30)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="2 tasks, 4 train / 4 held-out per label, 2 steps")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON", help="merge runs, print table")
    ap.add_argument("--out", type=Path, default=None, help="default: results/probe_refit[_quick].json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        rows = [r for run in runs for r in run["rows"]]
        result = {"merged": [str(p) for p in args.merge], "configs": [r["config"] for r in runs], "rows": rows}
        result["wall_seconds"] = sum(r.get("wall_seconds", 0.0) for r in runs)
    else:
        import forgetting
        import step_budget
        import torch

        from promptbank import PromptBank
        from promptbank.backbone import load_backbone
        from promptbank.embed import load_embedder

        if args.quick:
            args.tasks, args.train_per_class, args.heldout_per_class, args.steps = "ag,amazon", 4, 4, 2
        torch.set_num_threads(args.threads)
        backbone = load_backbone("all-minilm-l6-v2")
        embedder = load_embedder(forgetting.ROUTING_EMBEDDER)
        rows = []
        for name in args.tasks.split(","):
            train, held = step_budget.sample(args.data, name, args.train_per_class, args.heldout_per_class, args.seed)
            bank = PromptBank(backbone, embedder, routing="lda")
            rows.append(score_task(bank, name, train, held, args.seed, args.steps))
            print(json.dumps(rows[-1]), flush=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "merge"}
        result = {"config": config, "versions": versions(), "rows": rows, "wall_seconds": time.perf_counter() - t0}
    print("\n" + table(result["rows"]))
    write_result(result, args.out, "probe_refit", quick=args.quick)
    return result


if __name__ == "__main__":
    main()

"""Is the CL-4 step budget binding? promptbank's held-out accuracy per task at several step budgets, no test split.

``forgetting.py`` trains each task's deep prompt for at most ``--steps`` optimizer steps (60 on CL-4, batch 16,
dev evaluation every 10 steps, patience 4). This measures, per CL-4 task and seed, what a larger budget changes,
on data drawn from the TRAIN pools only (so choosing a budget from it does not tune on the test sets):

- train: 16 examples per label from the task's train pool (as ``forgetting.py`` draws them);
- held-out: up to ``--heldout-per-class`` other examples per label from the same pool, disjoint from train;
- per budget: the same ``learn_task`` call as ``forgetting.py`` (deep prompt, warm start off, 10 % of train held
  out as dev for model selection; ``--dev-fraction`` to try another) with ``max_steps`` = the budget; held-out
  accuracy with the task given, the steps run and the step whose state was kept (``--head-lr``: the head's
  learning rate, 1e-2 by default; ``--lr``: the prompt's, the deep-prompt default 1e-2 on encoders; the task's
  embedding probe is on, as by default, unless ``--no-probe``);
- reference: frozen embeddings + logistic head (``forgetting.py``'s baseline) on the same train / held-out rows.

    python benchmarks/step_budget.py                        # budgets 60,120; seed 0; CL-4 (~30 min at 1 thread)
    python benchmarks/step_budget.py --seed 1 --out b1.json   # other seeds alongside, then --merge
    python benchmarks/step_budget.py --merge b0.json b1.json
    python benchmarks/step_budget.py --quick                # 2 tasks, 4 per label, budgets 2,4: a smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import RESULTS, default_data_dir, require_native_bf16, versions  # noqa: E402

CL4 = ["ag", "amazon", "dbpedia", "yahoo"]


def sample(data_dir: Path, name: str, train_per_class: int, heldout_per_class: int, seed: int):
    """(train TaskData, held-out TaskData) of one task, disjoint draws from its train pool."""
    import forgetting

    from promptbank.tasks import TaskData, load_task_data

    labels, pool, _ = forgetting._dataset_rows(data_dir, name)
    data = load_task_data(pool, labels=labels)
    by: dict[str, list] = {}
    for ex in data.examples:
        by.setdefault(ex.target, []).append(ex)
    rng = random.Random(seed)
    train, held = [], []
    for lab in labels:
        rows = rng.sample(by.get(lab, []), min(train_per_class + heldout_per_class, len(by.get(lab, []))))
        train += rows[:train_per_class]
        held += rows[train_per_class:]
    rng.shuffle(train)
    source = str(forgetting.DATASETS[name][0])
    return (
        TaskData(kind="classification", examples=train, labels=labels, source=source),
        TaskData(kind="classification", examples=held, labels=labels, source=source),
    )


def run(args, backbone, embedder) -> dict:
    import forgetting

    from promptbank import PromptBank

    rows = []
    for name in args.tasks:
        train, held = sample(args.data, name, args.train_per_class, args.heldout_per_class, args.seed)
        logistic = _logistic(embedder, train, held, args.seed)
        for budget in args.budgets:
            bank = PromptBank(backbone, embedder, routing="lda")
            t0 = time.perf_counter()
            options = forgetting.LEARN_OPTIONS | {"eval_every": args.eval_every}
            bank.learn_task(
                name,
                train,
                max_steps=budget,
                seed=args.seed,
                dev_fraction=args.dev_fraction,
                head_lr=args.head_lr,
                lr=args.lr,
                probe=not args.no_probe,
                precision=args.precision,
                **options,
            )
            seconds = time.perf_counter() - t0
            rec = bank._tasks[name].record
            acc = bank.evaluate(held, task=name, batch_size=64)["accuracy"]
            row = {
                "task": name,
                "seed": args.seed,
                "budget": budget,
                "dev_fraction": args.dev_fraction,
                "head_lr": args.head_lr,
                "lr": args.lr,
                "probe": not args.no_probe,
                "dtype": args.dtype,
                "precision": args.precision,
                "heldout_accuracy": acc,
                "logistic_heldout_accuracy": logistic,
                "steps_run": rec.steps,
                "best_step": rec.best_step,
                "dev_accuracy": rec.dev_accuracy,
                "train_seconds": seconds,
                "n_train": len(train),
                "n_heldout": len(held),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"rows": rows}


def _logistic(embedder, train, held, seed: int) -> float:
    import forgetting

    pred = forgetting.fit_logistic(embedder, train, seed).predict(embedder.encode([ex.input for ex in held.examples]))
    return float(np.mean([p == ex.target for p, ex in zip(pred, held.examples)]))


def _setting(r: dict) -> tuple[int, float, float, float, bool, str]:
    # rows written before the embedding probe existed were without one; before --dtype / --precision, fp32
    precision = "".join(f", {v}" for v in (r.get("dtype", "float32"), r.get("precision", "fp32")) if "32" not in v)
    return (
        r["budget"], r.get("dev_fraction", 0.1), r.get("head_lr", 1e-2), r.get("lr") or 1e-2, r.get("probe", False),
        precision,
    )  # fmt: skip


def table(rows: list[dict]) -> str:
    settings = sorted({_setting(r) for r in rows})
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    head = (
        "| task | logistic | "
        + " | ".join(
            f"{b} steps, dev {d:g}, head lr {h:g}, lr {lr:g}{' + probe' if pr else ''}{prec} (kept step)"
            for b, d, h, lr, pr, prec in settings
        )
        + " |"
    )
    lines = [head, "|---|---:|" + "---:|" * len(settings)]

    def cell(task, setting):
        rs = [r for r in rows if r["task"] == task and _setting(r) == setting]
        if not rs:
            return "-"
        acc = statistics.mean(100 * r["heldout_accuracy"] for r in rs)
        kept = "/".join(str(r["best_step"]) for r in rs)
        return f"{acc:.1f} ({kept})"

    for task in tasks:
        lg = statistics.mean(100 * r["logistic_heldout_accuracy"] for r in rows if r["task"] == task)
        lines.append(f"| {task} | {lg:.1f} | " + " | ".join(cell(task, st) for st in settings) + " |")
    common = [t for t in tasks if all(any(r["task"] == t and _setting(r) == st for r in rows) for st in settings)]
    if len(common) > 1:  # mean over the tasks every setting has
        rs = [r for r in rows if r["task"] in common]
        means = [statistics.mean(100 * r["heldout_accuracy"] for r in rs if _setting(r) == st) for st in settings]
        lg = statistics.mean(100 * r["logistic_heldout_accuracy"] for r in rs)
        lines.append(f"| **mean** ({', '.join(common)}) | {lg:.1f} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    return f"Held-out (train-pool) accuracy, seeds {seeds}; kept step per seed in brackets\n\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--budgets", default="60,120", help="comma list of max_steps values")
    ap.add_argument("--tasks", default=",".join(CL4), help="comma list of forgetting.py task names")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-per-class", type=int, default=16)
    ap.add_argument("--heldout-per-class", type=int, default=30)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--dev-fraction", type=float, default=0.1, help="of train, held out for model selection")
    ap.add_argument("--head-lr", type=float, default=1e-2, help="learning rate of the task's linear head")
    ap.add_argument("--lr", type=float, default=None, help="the prompt's learning rate (default: the method's, 1e-2)")
    ap.add_argument("--no-probe", action="store_true", help="the prompted head alone (TrainConfig.probe=False)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="backbone weights' dtype")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="TrainConfig.precision")
    ap.add_argument("--quick", action="store_true", help="2 tasks, 4 train / 4 held-out per label, budgets 2,4")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON", help="merge runs, print table")
    ap.add_argument("--out", type=Path, default=None, help="default: results/step_budget[_quick].json")
    args = ap.parse_args(argv)
    if args.merge:
        runs = [json.loads(p.read_text()) for p in args.merge]
        result = {"config": [r["config"] for r in runs], "rows": [row for r in runs for row in r["rows"]]}
        out = args.out or RESULTS / "step_budget.json"
    else:
        require_native_bf16(args.precision)
        if args.quick:
            args.tasks, args.train_per_class, args.heldout_per_class, args.budgets = "ag,amazon", 4, 4, "2,4"
            args.eval_every = 1
        args.tasks = [t for t in args.tasks.split(",") if t]
        args.budgets = sorted({int(b) for b in args.budgets.split(",") if b})
        if not args.budgets or min(args.budgets) < 1:
            ap.error("--budgets must be positive integers")
        import forgetting
        import torch

        from promptbank.backbone import load_backbone
        from promptbank.embed import load_embedder

        if args.threads:
            torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        result = run(
            args, load_backbone("all-minilm-l6-v2", dtype=args.dtype), load_embedder(forgetting.ROUTING_EMBEDDER)
        )  # as there
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "merge"}
        result = {"config": config | {"wall_s": time.perf_counter() - t0}, "versions": versions(), **result}
        out = args.out or RESULTS / ("step_budget_quick.json" if args.quick else "step_budget.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print("\n" + table(result["rows"]) + f"\n\nWrote {out}")
    return result


if __name__ == "__main__":
    main()

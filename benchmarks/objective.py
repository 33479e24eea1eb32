"""Which training objective should a causal-LM classification task use? A held-out study, no test sets.

For each dataset, method, objective and seed: ``per_class`` training rows and 20 held-out rows per label, drawn
disjointly from the dataset's TRAIN pool (``train.jsonl``, else ``all.jsonl``; CLINC150 domains as
``clinc:<domain>``); ``learn_task`` on the default backbone (SmolLM2-135M) with ``objective="lm"`` (the default),
``"labels"`` or ``"labels+lm"`` (see ``TrainConfig``), everything else at the library defaults except
``max_steps`` (80), ``patience=3`` and no warm start; then the held-out accuracy with the task given.
Inputs are cut to 600 characters.

    python benchmarks/objective.py --datasets trec,sst5 --seeds 0,1 --out a.json
    python benchmarks/objective.py --merge a.json b.json --out benchmarks/results/objective.json

Prints a markdown table (mean held-out accuracy per dataset and method, each objective's difference to "lm")
and writes JSON (config, versions, every run).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import time
from pathlib import Path

from bench_common import default_data_dir, mean, read_labels, read_rows, versions, write_result

OBJECTIVES = ("lm", "labels", "labels+lm")
HELD_OUT_PER_CLASS = 20
MAX_CHARS = 600


def load_pool(data: Path, name: str) -> tuple[list[dict], list[str]]:
    """(train-pool rows, labels) of a dataset folder, or of one CLINC150 domain (``clinc:banking``)."""
    if name.startswith("clinc:"):
        domain = name.split(":", 1)[1]
        folder = data / "clinc150"
        labels = sorted(json.loads((folder / "labels.json").read_text())["domains"][domain])
        return [r for r in read_rows(folder / "train.jsonl") if r["label"] in labels], labels
    folder = data / name
    path = folder / "train.jsonl"
    return read_rows(path if path.exists() else folder / "all.jsonl"), read_labels(folder)


def split(rows: list[dict], labels: list[str], per_class: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``per_class`` training and HELD_OUT_PER_CLASS held-out rows per label, disjoint, seeded."""
    rng = random.Random(seed)
    by = collections.defaultdict(list)
    for r in rows:
        by[r["label"]].append(r)
    train, held = [], []
    for lab in labels:
        pick = rng.sample(by[lab], per_class + HELD_OUT_PER_CLASS)
        train += pick[:per_class]
        held += pick[per_class:]
    rng.shuffle(train)
    cut = [[{"text": r["text"][:MAX_CHARS], "label": r["label"]} for r in part] for part in (train, held)]
    return cut[0], cut[1]


def learn_and_score(bank, pool, method: str, seed: int, per_class: int, steps: int, **options) -> tuple:
    """Learn the task once on :func:`split`'s training rows (the study's settings; ``options``: more
    ``learn_task`` arguments) and score it on the held-out rows, task given: ``(record, accuracy, seconds)``.
    The causal LM's label ranking alone (``probe=False`` unless ``options`` say otherwise): these studies measure
    what training settings do to the prompt, as they did before tasks got an embedding probe by default."""
    rows, labels = pool
    train, held = split(rows, labels, per_class, seed)
    t0 = time.perf_counter()
    rec = bank.learn_task(
        "task",
        train,
        method=method,
        labels=labels,
        max_steps=steps,
        eval_every=10,
        patience=3,
        seed=seed,
        progress=False,
        warm_start=False,
        **{"probe": False, **options},
    )
    seconds = time.perf_counter() - t0
    try:
        acc = bank.evaluate(held, task="task")["accuracy"]
    finally:
        bank.remove_task("task")
    return rec, acc, seconds


def run_record(name: str, method: str, setting: str, value, seed: int, pool, scored: tuple) -> dict:
    """A study's record of one run: dataset ``name``, ``method``, the studied ``setting``'s ``value``, ``seed`` and
    what :func:`learn_and_score` returned (``scored``)."""
    rec, acc, seconds = scored
    return {
        "dataset": name,
        "method": method,
        setting: value,
        "seed": seed,
        "labels": len(pool[1]),
        "held_out_accuracy": acc,
        "dev_loss": rec.dev_loss,
        "dev_accuracy": rec.dev_accuracy,
        "best_step": rec.best_step,
        "steps": rec.steps,
        "train_seconds": seconds,
    }


def run_one(bank, pool, name: str, method: str, objective: str, seed: int, per_class: int, steps: int) -> dict:
    """One learn_task + held-out accuracy; ``pool``: :func:`load_pool`'s (rows, labels) of dataset ``name``."""
    scored = learn_and_score(bank, pool, method, seed, per_class, steps, objective=objective)
    return run_record(name, method, "objective", objective, seed, pool, scored)


def seed_groups(runs: list[dict], setting: str):
    """Per (dataset, method): ``(row, by_value)``, ``row`` the group's dataset, method, labels and the seeds on
    which every value of ``setting`` ran, ``by_value`` ``{value: {seed: run}}``; groups with no such seed are left
    out. What each study's summary starts from."""
    groups = collections.defaultdict(lambda: collections.defaultdict(dict))
    for r in runs:
        groups[(r["dataset"], r["method"])][r[setting]][r["seed"]] = r
    for (ds, method), by_value in groups.items():
        seeds = sorted(set.intersection(*(set(v) for v in by_value.values())))
        if seeds:
            n_labels = next(iter(by_value.values()))[seeds[0]]["labels"]
            yield {"dataset": ds, "method": method, "seeds": seeds, "n_labels": n_labels}, by_value


def summary(runs: list[dict]) -> list[dict]:
    """Per (dataset, method): mean held-out accuracy of each objective over the seeds where all ran."""
    out = []
    for row, by_obj in seed_groups(runs, "objective"):
        seeds = row["seeds"]
        for obj, by_seed in by_obj.items():
            row[obj] = 100 * mean([by_seed[s]["held_out_accuracy"] for s in seeds])
            row[f"{obj}_seconds"] = mean([by_seed[s]["train_seconds"] for s in seeds])
        out.append(row)
    return sorted(out, key=lambda r: (r["method"], r["dataset"]))


def table(rows: list[dict]) -> str:
    objs = [o for o in OBJECTIVES if any(o in r for r in rows)]
    head = "| dataset | labels | method | seeds | " + " | ".join(f"{o} acc." for o in objs)
    head += " | " + " | ".join(f"{o} - lm" for o in objs if o != "lm") + " |"
    lines = [head, "|" + "---|" * (4 + len(objs) + len(objs) - 1)]
    for r in rows:
        cells = [r["dataset"], str(r["n_labels"]), r["method"], ",".join(map(str, r["seeds"]))]
        cells += [f"{r[o]:.1f}" if o in r else "" for o in objs]
        cells += [f"{r[o] - r['lm']:+.1f}" if o in r and "lm" in r else "" for o in objs if o != "lm"]
        lines.append("| " + " | ".join(cells) + " |")
    for method in sorted({r["method"] for r in rows}):
        sub = [r for r in rows if r["method"] == method and "lm" in r]
        for o in objs:
            if o == "lm":
                continue
            d = [r[o] - r["lm"] for r in sub if o in r]
            if d:
                lines.append(
                    f"\n{method}, {o} - lm: mean {mean(d):+.1f} over {len(d)} datasets "
                    f"(better on {sum(x > 0 for x in d)}, worse on {sum(x < 0 for x in d)})"
                )
    return "\n".join(lines)


def study_parser(doc: str, datasets: str, methods: str) -> argparse.ArgumentParser:
    """The command-line options shared by the held-out studies (this one and ``lr_study.py``)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--datasets", default=datasets)
    ap.add_argument("--methods", default=methods)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--merge", nargs="+", type=Path, help="merge the runs of these result files instead")
    ap.add_argument(
        "--no-pack",
        action="store_true",
        help="run every training and ranking forward padded (the library packs rows of different lengths where "
        "that saves compute; same values up to floating-point order)",
    )
    return ap


def run_study(args, setting: str, values: list, run, name: str, summarise, tabulate) -> None:
    """Run every (dataset, method, ``setting`` value, seed) with ``run`` (a ``run_one``), or merge ``--merge``'s
    files (no run repeated); write the JSON result as ``name`` and print the table."""
    t0 = time.perf_counter()
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        runs = [r for p in parts for r in p["runs"]]
        keys = [(r["dataset"], r["method"], r[setting], r["seed"]) for r in runs]
        if len(set(keys)) != len(keys):
            raise SystemExit(f"the files repeat a (dataset, method, {setting}, seed) run")
        config = {**parts[0]["config"], "merged_from": [str(p) for p in args.merge]}
        wall = sum(p["wall_seconds"] for p in parts)
    else:
        from promptbank import PromptBank, inject

        inject.PACKING = not args.no_pack
        bank = PromptBank.from_pretrained(getattr(args, "backbone", None))  # default: SmolLM2-135M
        config = {k: v for k, v in vars(args).items() if k not in ("out", "merge")}
        config["data"] = str(args.data)
        runs = []
        for dataset in args.datasets.split(","):
            pool = load_pool(args.data, dataset)  # read once per dataset
            for method in args.methods.split(","):
                for value in values:
                    for seed in map(int, args.seeds.split(",")):
                        runs.append(run(bank, pool, dataset, method, value, seed, args.per_class, args.steps))
                        print(json.dumps(runs[-1]), flush=True)
        wall = time.perf_counter() - t0
    rows = summarise(runs)
    result = {"config": config, "versions": versions(), "runs": runs, "summary": rows, "wall_seconds": wall}
    write_result(result, args.out, name)
    print(tabulate(rows))


def main() -> None:
    ap = study_parser(__doc__, "trec,sst5,subj,ag_news,clinc:banking", "prompt_tuning,deep")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    args = ap.parse_args()
    run_study(args, "objective", args.objectives.split(","), run_one, "objective", summary, table)


if __name__ == "__main__":
    main()

"""Should a causal-LM task's inference inputs be cut to its ``max_input_tokens``, as its training inputs were? A
held-out study, no test sets.

Training cuts every input to the task's ``max_input_tokens`` (``promptbank.tasks.truncate_inputs``). Before this
study, causal-LM inference used inputs whole (encoder banks already cut them). Per dataset and seed: ``per_class``
training rows and ``held_out`` other rows per label, disjoint, from the dataset's file (each label's rows shuffled
with the seed); ``learn_task`` on the default backbone (SmolLM2-135M) at library defaults except ``max_steps``, the
cap and no warm start; then the held-out rows predicted with the task given, once whole (the text as given, fitted
only to the backbone's positions) and once cut to the cap (``promptbank.tasks.cut_to_tokens``, what inference does
now). Reports accuracy and prediction time of both.

    python benchmarks/input_cut.py --dataset medical_abstracts/test.jsonl --max-input-tokens 128 --seed 0
    python benchmarks/input_cut.py --merge a.json b.json --out benchmarks/results/input_cut.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

from bench_common import default_data_dir, read_rows, versions, write_result


def split(rows: list[dict], per_class: int, held_out: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``per_class`` training rows and the next ``held_out`` rows of each label (labels in sorted order, each
    label's rows shuffled once with ``seed``)."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["label"], []).append(r)
    rng = random.Random(seed)
    train, test = [], []
    for _, rs in sorted(by.items()):
        rs = rs[:]
        rng.shuffle(rs)
        if len(rs) < per_class + 1:
            raise SystemExit(f"a label has {len(rs)} rows; need more than per_class={per_class}")
        train += rs[:per_class]
        test += rs[per_class : per_class + held_out]
    return train, test


def run_one(data: Path, dataset: str, cap: int, seed: int, per_class: int, held_out: int, steps: int) -> dict:
    from promptbank import PromptBank
    from promptbank.tasks import cut_to_tokens

    train, test = split(read_rows(data / dataset), per_class, held_out, seed)
    bank = PromptBank.from_pretrained()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training cut's warning: expected here
        rec = bank.learn_task(
            "t", train, max_steps=steps, max_input_tokens=cap, seed=seed, progress=False, warm_start=False
        )
    train_s = time.perf_counter() - t0
    tok = bank.backbone.tokenizer
    whole = [r["text"] for r in test]
    cut = [cut_to_tokens(tok, t, cap) for t in whole]
    gold = [r["label"] for r in test]
    out = {
        "dataset": dataset,
        "max_input_tokens": cap,
        "seed": seed,
        "n_train": len(train),
        "n_held_out": len(test),
        "n_cut": sum(a != b for a, b in zip(whole, cut)),
        "method": rec.method.value,
        "train_seconds": train_s,
    }
    for name, texts in (("whole", whole), ("cut", cut)):
        t0 = time.perf_counter()
        # task given: no routing; inference now cuts "whole" to the cap too, so bypass that for the old behaviour
        preds = _predict_uncut(bank, texts) if name == "whole" else bank.predict(texts, task="t")
        out[f"{name}_seconds"] = time.perf_counter() - t0
        out[f"{name}_accuracy"] = sum(p.output == g for p, g in zip(preds, gold)) / len(gold)
    return out


def _predict_uncut(bank, texts):
    """``predict(texts, task="t")`` as it was before inference cut inputs: the task's cap lifted for the call."""
    import promptbank.bank as bank_module

    real = bank_module._max_input_tokens
    bank_module._max_input_tokens = lambda record: None
    try:
        return bank.predict(texts, task="t")
    finally:
        bank_module._max_input_tokens = real


def table(runs: list[dict]) -> str:
    lines = [
        "| dataset | max_input_tokens | seed | held-out rows (cut) | accuracy whole | accuracy cut | time cut / whole |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['dataset']} | {r['max_input_tokens']} | {r['seed']} | {r['n_held_out']} ({r['n_cut']}) | "
            f"{100 * r['whole_accuracy']:.1f} | {100 * r['cut_accuracy']:.1f} | "
            f"{r['cut_seconds'] / r['whole_seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--dataset", default="medical_abstracts/test.jsonl", help="a {text, label} JSONL under --data")
    ap.add_argument("--max-input-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=24)
    ap.add_argument("--held-out", type=int, default=40, help="held-out rows per label")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.merge:
        runs = [r for f in args.merge for r in json.loads(f.read_text())["runs"]]
        result = {"config": {"merged": [str(f) for f in args.merge]}, "versions": versions(), "runs": runs}
    else:
        run = run_one(
            args.data, args.dataset, args.max_input_tokens, args.seed, args.per_class, args.held_out, args.steps
        )
        config = {k: v for k, v in vars(args).items() if k not in ("merge", "out")}
        result = {"config": {**config, "data": str(args.data)}, "versions": versions(), "runs": [run]}
    result["wall_seconds"] = time.perf_counter() - t0
    print(table(result["runs"]))
    write_result(result, args.out, "input_cut")
    return result


if __name__ == "__main__":
    main()

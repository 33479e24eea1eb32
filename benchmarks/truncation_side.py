"""Where should training cut an input that ends with its question? ``truncation_side`` on RAG-style answering, held
out by article.

The answer-synthesis input of the RAG chain is the passages, then the question
(``langchain_promptbank.format_answer_input``). Training cuts inputs longer than ``max_input_tokens`` (default 256);
keeping their first tokens (``truncation_side="right"``, the default) drops the question of every long one. This
study trains the same generation task on the default backbone (SmolLM2-135M), once per side, on XQuAD-en answer rows
whose input is longer than the cap (the rows where the side matters; ``--all-lengths`` for rows of any length), from
the training articles of ``split_by_article``; then answers questions of the test articles (inputs whole, as
inference gives a generation task's inputs) and scores exact match and F1 (SQuAD v1.1 normalisation) with
``bank.evaluate``, plus the target loss on the test rows cut as training cut them. Same rows, seed and settings for
every side; no warm start (one fresh bank per side).

    python benchmarks/truncation_side.py --sides right,left --seed 0 --out a.json
    python benchmarks/truncation_side.py --merge a.json b.json --out benchmarks/results/truncation_side.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from pathlib import Path

from bench_common import default_data_dir, versions, write_result


def long_rows(rows: list[dict], tokenizer, cap: int, *, all_lengths: bool) -> list[dict]:
    """Answer rows (``{"input", "target"}``) of ``rows``, only those whose input is over ``cap`` tokens unless
    ``all_lengths``."""
    from langchain_promptbank.xquad import answer_rows

    out = answer_rows(rows)
    if all_lengths:
        return out
    return [r for r in out if len(tokenizer(r["input"], add_special_tokens=False)["input_ids"]) > cap]


def run_side(bank_factory, side: str, train: list[dict], test: list[dict], args) -> dict:
    bank = bank_factory()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training cut's warning: every row here is cut, on purpose
        rec = bank.learn_task(
            "qa",
            train,
            method=args.method,
            max_steps=args.steps,
            max_input_tokens=args.max_input_tokens,
            truncation_side=side,
            seed=args.seed,
            warm_start=False,
            progress=not args.quiet,
        )
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        scores = bank.evaluate(test, task="qa", progress=not args.quiet)
    return {
        "side": side,
        "seed": args.seed,
        "exact_match": 100 * scores["exact_match"],
        "f1": 100 * scores["f1"],
        "test_loss": scores["loss"],
        "n_test": scores["n"],
        "n_train": len(train),
        "steps": len(rec.history) and max(h.get("step", 0) for h in rec.history),
        "best_step": rec.best_step,
        "dev_loss": rec.dev_loss,
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t1,
    }


def table(runs: list[dict]) -> str:
    lines = [
        "| truncation side | seed | train rows | test rows | exact match | F1 | test loss (cut) | best step | train min |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['side']} | {r['seed']} | {r['n_train']} | {r['n_test']} | {r['exact_match']:.1f} | {r['f1']:.1f} | "
            f"{r['test_loss']:.3f} | {r['best_step']} | {r['train_seconds'] / 60:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--sides", default="right,left,middle", help="comma-separated truncation sides to train")
    ap.add_argument("--max-input-tokens", type=int, default=256)
    ap.add_argument("--train", type=int, default=64, help="training rows (from the training articles)")
    ap.add_argument("--test", type=int, default=40, help="test rows (from the test articles)")
    ap.add_argument("--all-lengths", action="store_true", help="rows of any length, not only those over the cap")
    ap.add_argument("--method", default="deep")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a tiny smoke run: 8 rows, 2 steps, the hashing embedder")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.merge:
        runs = [r for f in args.merge for r in json.loads(f.read_text())["runs"]]
        result = {"config": {"merged": [str(f) for f in args.merge]}, "versions": versions(), "runs": runs}
    else:
        from langchain_promptbank.xquad import load_xquad, split_by_article
        from promptbank import PromptBank

        if args.quick:
            args.train, args.test, args.steps = 8, 4, 2

        def factory():
            return PromptBank.from_pretrained(embedder="hashing" if args.quick else None)

        tok = factory().backbone.tokenizer
        parts = split_by_article(load_xquad(args.data))
        rng = random.Random(args.seed)
        pool = long_rows(parts["train"], tok, args.max_input_tokens, all_lengths=args.all_lengths)
        held = long_rows(parts["test"], tok, args.max_input_tokens, all_lengths=args.all_lengths)
        train = rng.sample(pool, min(args.train, len(pool)))
        test = rng.sample(held, min(args.test, len(held)))
        runs = [run_side(factory, side, train, test, args) for side in args.sides.split(",")]
        config = {k: v for k, v in vars(args).items() if k not in ("merge", "out")}
        config.update(data=str(args.data), train_pool=len(pool), test_pool=len(held))
        result = {"config": config, "versions": versions(), "runs": runs}
    result["wall_seconds"] = time.perf_counter() - t0
    print(table(result["runs"]))
    write_result(result, args.out, "truncation_side", quick=args.quick)
    return result


if __name__ == "__main__":
    main()

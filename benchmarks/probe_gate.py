"""Should a task keep its embedding probe? A held-out study over every dataset of the long stream, no test split.

A classification task's label scores are its prompted head's (encoder backbones) or its causal LM's label
ranking's (causal LMs) log-probabilities plus, by default, those of an embedding probe (``TrainConfig.probe``: a
logistic regression on the routing embeddings). The probe was adopted on CL-4 and the long stream at 16 examples
per label for encoders, and on this study for causal LMs. This measures, per dataset and training size, on data
drawn from the TRAIN pools only (``step_budget.sample``: train rows per label, other rows of the same pool held
out):

- the task learned as ``learn_task`` would (``--method``: deep prompt + head on the encoder by default; default
  steps and learning rates, 10 % of the training rows as dev, split by ``split_dev`` as ``learn_task`` does;
  ``--max-input-tokens``);
- held-out accuracy with the probe, without it (the prompted head, or the causal LM's label ranking, alone: the
  ``*_head_only`` fields), the probe alone, and with a dev gate: the probe kept only when it does not lower the
  task's dev accuracy (a rule the library could apply at training time; not adopted, see the README: on these
  runs it does worse than keeping the probe always);
- the dev accuracies both ways (what the gate sees).

    python benchmarks/probe_gate.py --per-class 16,64          # 16 datasets x 2 sizes, seed 0 (~30 min, 1 thread)
    python benchmarks/probe_gate.py --per-class 64 --seed 1 --out g64s1.json   # parts alongside, then --merge
    python benchmarks/probe_gate.py --merge g16.json g64.json g16s1.json g64s1.json
    python benchmarks/probe_gate.py --backbone smollm2-135m-instruct --method prompt_tuning --per-class 16 \
        --heldout-per-class 20 --out causal_pt.json            # the default causal LM (~1 h, 1 thread)
    python benchmarks/probe_gate.py --quick                     # 2 datasets, 4 per label, 6 steps: a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import RESULTS, default_data_dir, versions, without_probes  # noqa: E402


def run_one(
    backbone, embedder, data_dir: Path, name: str, per_class: int, heldout: int, seed: int, opts: dict, method: str
):
    import step_budget
    import torch

    from promptbank import PromptBank
    from promptbank.config import TrainConfig
    from promptbank.encoder import probe_logprobs
    from promptbank.tasks import split_dev

    train_all, held = step_budget.sample(data_dir, name, per_class, heldout, seed)
    conf = TrainConfig()
    train, dev = split_dev(train_all, conf.dev_fraction, seed=seed, max_dev=conf.max_dev)
    bank = PromptBank(backbone, embedder)
    t0 = time.perf_counter()
    bank.learn_task(name, train, dev=dev, method=method, seed=seed, probe=True, progress=False, **opts)
    seconds = time.perf_counter() - t0
    plain = without_probes(bank, [name])
    batch = 64 if bank.is_encoder else 16
    dev_with = bank.evaluate(dev, task=name, batch_size=batch)["accuracy"]
    dev_head = plain.evaluate(dev, task=name, batch_size=batch)["accuracy"]
    held_with = bank.evaluate(held, task=name, batch_size=batch)["accuracy"]
    held_head = plain.evaluate(held, task=name, batch_size=batch)["accuracy"]
    emb = torch.as_tensor(bank.embedder.encode([ex.input for ex in held.examples]))
    guess = probe_logprobs(bank._tasks[name].head, emb).argmax(-1).tolist()
    held_probe = sum(train_all.labels[g] == ex.target for g, ex in zip(guess, held.examples)) / len(held)
    keep = dev_with >= dev_head
    row = {
        "task": name,
        "per_class": per_class,
        "seed": seed,
        "n_train": len(train),
        "n_dev": len(dev),
        "n_heldout": len(held),
        "labels": len(train_all.labels),
        "dev_with_probe": dev_with,
        "dev_head_only": dev_head,
        "gate_keeps_probe": keep,
        "heldout_with_probe": held_with,
        "heldout_head_only": held_head,
        "heldout_probe_only": held_probe,
        "heldout_gated": held_with if keep else held_head,
        "steps": bank._tasks[name].record.steps,
        "train_seconds": round(seconds, 1),
    }
    print(json.dumps(row), flush=True)
    return row


def summarize(rows: list[dict]) -> dict:
    out = {}
    for size in sorted({r["per_class"] for r in rows}):
        rs = [r for r in rows if r["per_class"] == size]
        keys = ("heldout_with_probe", "heldout_head_only", "heldout_gated", "heldout_probe_only")
        out[str(size)] = {
            "runs": len(rs),
            **{k: 100 * statistics.mean(r[k] for r in rs) for k in keys if all(k in r for r in rs)},
            "gate_keeps_probe": sum(r["gate_keeps_probe"] for r in rs),
            "probe_helps_heldout": sum(r["heldout_with_probe"] > r["heldout_head_only"] for r in rs),
            "probe_hurts_heldout": sum(r["heldout_with_probe"] < r["heldout_head_only"] for r in rs),
            "gate_right": sum(
                (r["gate_keeps_probe"] and r["heldout_with_probe"] >= r["heldout_head_only"])
                or (not r["gate_keeps_probe"] and r["heldout_head_only"] >= r["heldout_with_probe"])
                for r in rs
            ),
        }
    return out


def print_table(result: dict) -> None:
    print("\n| examples per label | runs | held-out acc. with probe | without (head / LM alone) | probe alone | "
          "dev-gated | gate keeps probe | probe helps / hurts (held-out) | gate right |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, s in result["summary"].items():
        alone = f"{s['heldout_probe_only']:.1f}" if "heldout_probe_only" in s else "-"
        print(
            f"| {size} | {s['runs']} | {s['heldout_with_probe']:.1f} | {s['heldout_head_only']:.1f} | {alone} | "
            f"{s['heldout_gated']:.1f} | {s['gate_keeps_probe']} | {s['probe_helps_heldout']} / "
            f"{s['probe_hurts_heldout']} | {s['gate_right']} |"
        )


def main(argv=None) -> dict:
    import forgetting

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--backbone", default="all-minilm-l6-v2", help="the bank's backbone (an encoder or a causal LM)")
    ap.add_argument("--method", default="deep", help="the tasks' prompt method")
    ap.add_argument("--tasks", default=",".join(forgetting.STREAMS["long"]["L1"]))
    ap.add_argument("--per-class", default="16,64", help="training examples per label (comma-separated sizes)")
    ap.add_argument("--heldout-per-class", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-input-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    out = args.out or RESULTS / ("probe_gate_quick.json" if args.quick else "probe_gate.json")
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        rows = [r for p in parts for r in p["rows"]]
        result = {
            "config": {"merged_from": [str(p) for p in args.merge], "parts": [p["config"] for p in parts]},
            "versions": parts[0]["versions"],
            "wall_seconds": sum(p["wall_seconds"] for p in parts),
            "summary": summarize(rows),
            "rows": rows,
        }
    else:
        import torch

        from promptbank import PromptBank
        from promptbank.backbone import load_backbone

        torch.set_num_threads(args.threads)
        tasks = args.tasks.split(",")
        sizes = [int(x) for x in args.per_class.split(",")]
        opts = {"max_input_tokens": args.max_input_tokens}
        if args.quick:
            tasks, sizes, args.heldout_per_class = tasks[:2], [4], 4
            opts |= {"max_steps": 6, "eval_every": 3}
        t0 = time.perf_counter()
        backbone = load_backbone(args.backbone)
        embedder = PromptBank.from_pretrained(backbone).embedder
        rows = [
            run_one(backbone, embedder, args.data, name, size, args.heldout_per_class, args.seed, opts, args.method)
            for size in sizes
            for name in tasks
        ]
        result = {
            "config": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "options": opts},
            "versions": versions(),
            "wall_seconds": time.perf_counter() - t0,
            "summary": summarize(rows),
            "rows": rows,
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    return result


if __name__ == "__main__":
    main()

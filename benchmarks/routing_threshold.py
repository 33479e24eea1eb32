"""What the "no task" threshold trades: in-task queries kept vs out-of-scope queries rejected, per quantile.

Each task's threshold accepts all but ``threshold_quantile`` of its own keys' cross-fitted routing distances
(``TrainConfig.threshold_quantile``, default 0.05). A lower quantile rejects fewer in-task queries (higher hit@1)
and accepts more queries that belong to no task. This measures both sides on held-out data, never a test split:

- CL-4 and the 16-task long stream: per task 16 keys and up to 30 queries per label, drawn disjointly from the
  TRAIN pools (as ``routing_layers.py``); top-1 (no threshold), hit@1 (right task and accepted), in-task queries
  rejected.
- CLINC150's 10 domains as tasks: 10 keys per intent from train; queries: the validation split's in-scope
  queries and its 100 out-of-scope ones; the same three numbers plus the share of out-of-scope queries rejected.

The learned router (LDA, the default) on the default routing embedding (MiniLM + middle layer), fitted on the
keys of all tasks of a set, every query routed alone, for each quantile; mean over the seeds.

    python benchmarks/routing_threshold.py                  # 3 seeds, ~10 min at 1 thread
    python benchmarks/routing_threshold.py --quick          # 1 seed, 4 tasks per set, few keys (smoke)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import default_data_dir, mean, versions, write_result  # noqa: E402

QUANTILES = (0.1, 0.05, 0.02, 0.01, 0.005)


def clinc_sample(data_dir: Path, keys_per_intent: int, seed: int, domains: int | None = None):
    """CLINC150 domains as tasks: key texts, key tasks, key groups (intent index) from train; in-scope validation
    texts with their domains; out-of-scope validation texts."""
    folder = data_dir / "clinc150"
    doms = json.loads((folder / "labels.json").read_text())["domains"]
    names = list(doms)[:domains] if domains else list(doms)
    read = lambda f: [json.loads(line) for line in (folder / f).read_text().splitlines() if line.strip()]  # noqa: E731
    train, val = read("train.jsonl"), read("val.jsonl")
    oos = [r["text"] for r in read("oos_val.jsonl")]
    domain_of = {lab: d for d in names for lab in doms[d]}
    by: dict[str, list[str]] = {}
    for r in train:
        by.setdefault(r["label"], []).append(r["text"])
    rng = random.Random(f"{seed}:clinc")
    kt, ktask, kgroup = [], [], []
    for d in names:
        for g, lab in enumerate(sorted(doms[d])):
            xs = rng.sample(by[lab], min(keys_per_intent, len(by[lab])))
            kt += xs
            ktask += [d] * len(xs)
            kgroup += [g] * len(xs)
    qt = [r["text"] for r in val if r["label"] in domain_of]
    qtask = [domain_of[r["label"]] for r in val if r["label"] in domain_of]
    return kt, ktask, kgroup, qt, qtask, oos


def _decide(router, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-ranked task, and whether the router answers it with that task (its threshold passed, and
    the guard's: GaussianRouter.decide)."""
    top = np.array([r[0][0] for r in router.route(x, top_k=1)])
    return top, np.array([d is not None for d in router.decide(x)])


def sweep(keys, ktask, kgroup, queries, qtask, oos=None) -> dict:
    """Per quantile: top-1, hit@1 and in-task rejected share of ``queries`` (and rejected share of ``oos``)."""
    from promptbank.lda import GaussianRouter

    ktask, kgroup, qtask = np.asarray(ktask), np.asarray(kgroup), np.asarray(qtask)
    names = list(dict.fromkeys(ktask.tolist()))
    out = {}
    for q in QUANTILES:
        spec = {n: (keys[ktask == n].astype(np.float64), kgroup[ktask == n], q) for n in names}
        router = GaussianRouter(spec, keys.shape[1])
        top, accepted = _decide(router, queries)
        right = top == qtask
        row = {
            "top1": float(right.mean()),
            "hit@1": float((right & accepted).mean()),
            "in_task_rejected": float((~accepted).mean()),
            "queries": len(qtask),
        }
        if oos is not None and len(oos):
            row["oos_rejected"] = float((~_decide(router, oos)[1]).mean())
            row["oos_queries"] = len(oos)
        out[f"{q:g}"] = row
    return out


def table(per_set: dict) -> str:
    lines = [
        "| task set | threshold_quantile | top-1 | hit@1 | in-task rejected | out-of-scope rejected |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for set_name, rows in per_set.items():
        for q, r in rows.items():
            oos = f"{100 * r['oos_rejected']:.1f}" if "oos_rejected" in r else ""
            lines.append(
                f"| {set_name} | {q} | {100 * r['top1']:.1f} | {100 * r['hit@1']:.1f} | "
                f"{100 * r['in_task_rejected']:.1f} | {oos} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    import forgetting
    import torch
    from routing_layers import combine, layer_means, sample

    from promptbank.embed import DEFAULT_EMBEDDER, SentenceEmbedder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = {"cl4": list(forgetting.TASKS), "long": list(forgetting.STREAMS["long"]["L1"])}
    keys_per_label, queries_per_label, keys_per_intent, domains = 16, 30, 10, None
    if args.quick:
        seeds, sets = seeds[:1], {k: v[:4] for k, v in sets.items()}
        keys_per_label, queries_per_label, keys_per_intent, domains = 4, 4, 3, 3
    encoder = SentenceEmbedder(DEFAULT_EMBEDDER)._load()
    layers = [encoder.n_layers, encoder.n_layers // 2]  # the default routing embedding: last + middle layer

    def embed(texts):
        return combine(layer_means(encoder, texts), layers)

    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        for set_name, names in sets.items():
            kt, ktask, kgroup, qt, qtask = sample(args.data, names, keys_per_label, queries_per_label, seed)
            runs.setdefault(set_name, []).append(sweep(embed(kt), ktask, kgroup, embed(qt), qtask))
        kt, ktask, kgroup, qt, qtask, oos = clinc_sample(args.data, keys_per_intent, seed, domains)
        runs.setdefault("clinc", []).append(sweep(embed(kt), ktask, kgroup, embed(qt), qtask, embed(oos)))
        print(f"seed {seed} done ({(time.perf_counter() - t_start) / 60:.1f} min)", flush=True)
    per_set = {s: {q: {k: mean([r[q][k] for r in rs]) for k in rs[0][q]} for q in rs[0]} for s, rs in runs.items()}
    print(table(per_set))
    result = {
        "config": {**{k: str(v) for k, v in vars(args).items()}, "seeds": seeds, "quantiles": list(QUANTILES)},
        "versions": versions(),
        "embedder": DEFAULT_EMBEDDER,
        "mean_over_seeds": per_set,
        "per_seed": runs,
        "wall_seconds": time.perf_counter() - t_start,
    }
    write_result(result, args.out, "routing_threshold", quick=args.quick)
    return result


if __name__ == "__main__":
    main()

"""Forgetting benchmark: the CL-4 few-shot stream (AG News, Amazon, DBpedia, Yahoo; LFPT5 splits, 16 train
examples per class) learned one task after another on the all-MiniLM-L6-v2 encoder backbone.

    python benchmarks/forgetting.py                       # 3 orders x 3 seeds, ~10-15 min on 2 cores
    python benchmarks/forgetting.py --quick               # 1 order, 1 seed, tiny slices: a smoke run (~1 min)
    python benchmarks/forgetting.py --data /path/to/shared/data

Systems, measured in the same run on the same samples:
- promptbank: one deep soft prompt + linear head per task, routed by MiniLM keys (no task id at test time);
  also reported with the task given (oracle).
- frozen embeddings + per-task logistic head (sklearn) with the same routing: a strong trivial baseline.
- one shared deep prompt trained sequentially (a new head per task; old heads kept): forgets.
- multitask joint training of one shared prompt + per-task heads on all tasks at once: an upper bound.
Metrics (DESIGN.md): accuracy matrix R[i][j] (accuracy on task j after learning task i), ACC (mean of last row),
BWT (mean of R[T][j] - R[j][j]), forgetting (mean of max earlier minus last), routing hit@1 at batch size 1,
routed accuracy and the oracle-vs-routed gap. Amazon and Yahoo/AG News do not share label spaces here; Amazon's
star labels are only evaluated within its own task.
Writes benchmarks/results/forgetting.json, a PNG heatmap of promptbank's R, and prints a markdown table.
Warm start is off for promptbank here (each task's prompt is independent of the order), so its per-task prompts
are trained once per seed and reused across orders; the sequential baseline is retrained for every order.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import default_data_dir, file_routing_keys_only  # noqa: E402

from promptbank.embed import ROUTING_EMBEDDER  # noqa: E402

ROUTING = "lda"  # set from --routing
OTHER = {"lda": "knn", "knn": "lda"}
RESULTS = ROOT / "benchmarks" / "results"
TASKS = {"ag": "ag_news", "amazon": "amazon_reviews", "dbpedia": "dbpedia", "yahoo": "yahoo_answers"}
ORDERS = {
    "O1": ["dbpedia", "amazon", "yahoo", "ag"],
    "O2": ["dbpedia", "amazon", "ag", "yahoo"],
    "O3": ["yahoo", "amazon", "ag", "dbpedia"],
}


def load_stream(data_dir: Path, train_per_class: int, test_per_class: int, seed: int):
    from promptbank.tasks import TaskData, load_task_data

    rng = random.Random(seed)
    out = {}
    for short, folder in TASKS.items():
        labels = json.loads((data_dir / folder / "labels.json").read_text())["labels"]
        parts = {}
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            data = load_task_data(data_dir / folder / f"{split}.jsonl", labels=labels)
            by = {}
            for ex in data.examples:
                by.setdefault(ex.target, []).append(ex)
            rows = [ex for lab in labels for ex in rng.sample(by[lab], min(per_class, len(by[lab])))]
            rng.shuffle(rows)
            parts[split] = TaskData(kind="classification", examples=rows, labels=labels, source=str(data.source))
        out[short] = parts
    return out


def metrics(R: np.ndarray) -> dict:
    """ACC, BWT (GEM) and forgetting (Chaudhry) of an accuracy matrix R[i][j] (row i: after learning task i)."""
    t = R.shape[0]
    acc = float(R[-1].mean())
    bwt = float(np.mean([R[-1, j] - R[j, j] for j in range(t - 1)])) if t > 1 else 0.0
    forg = float(np.mean([R[j:-1, j].max() - R[-1, j] for j in range(t - 1)])) if t > 1 else 0.0
    return {"ACC": acc, "BWT": bwt, "forgetting": forg}


# ----------------------------------------------------------------------------------------------- systems
def run_promptbank(backbone, embedder, stream, order, steps, seed, trained_cache):
    """Learn tasks in order; after each, evaluate every task learned so far with the task given (oracle)."""
    from promptbank import PromptBank
    from promptbank.bank import _Task

    bank = PromptBank(backbone, embedder, routing=ROUTING)
    R = np.full((len(order), len(order)), np.nan)
    for i, name in enumerate(order):
        key = (name, seed)
        if key not in trained_cache:  # order-independent (warm start off): train once per seed
            t0 = time.perf_counter()
            bank.learn_task(
                name,
                stream[name]["train"],
                method="deep",
                max_steps=steps,
                batch_size=16,
                eval_every=10,
                patience=4,
                seed=seed,
                warm_start=False,
                progress=False,
                max_input_tokens=128,
                keep_train_state=False,
            )
            t = bank._tasks[name]
            trained_cache[key] = (t, time.perf_counter() - t0)
        else:
            t = trained_cache[key][0]
            bank._insert(_Task(t.record, t.prompt, t.keys, t.train_state, t.head))
        for j in range(i + 1):
            R[i, j] = bank.evaluate(stream[order[j]]["test"], task=order[j], batch_size=64)["accuracy"]
    # routed: every test query of every task, one at a time through the router (no task id)
    texts, gold_task, gold_label = [], [], []
    for name in order:
        for ex in stream[name]["test"].examples:
            texts.append(ex.input)
            gold_task.append(name)
            gold_label.append(ex.target)
    preds = bank.predict(texts, batch_size=64)
    hit = float(np.mean([p.task == g for p, g in zip(preds, gold_task)]))  # "no task" counts as a miss
    ranked = bank.route_many(texts)
    top1 = float(np.mean([bool(r.ranked) and r.ranked[0][0] == g for r, g in zip(ranked, gold_task)]))
    routed = float(
        np.mean([np.mean([p.output == y for p, y, g in zip(preds, gold_label, gold_task) if g == n]) for n in order])
    )
    out = {"routing_hit@1": hit, "routing_top1_ignoring_threshold": top1, "routed_ACC": routed}
    out.update(_other_scorer(bank, texts, gold_task))
    return R, out, bank


def _other_scorer(bank, texts, gold_task) -> dict:
    """Routing of the same queries with the other scorer (cosine to the nearest keys vs the learned router)."""
    other = "knn" if bank.routing == "lda" else "lda"
    was, bank.routing = bank.routing, other
    try:
        ranked = bank.route_many(texts)
    finally:
        bank.routing = was
    return {
        f"routing_hit@1_{other}": float(np.mean([r.task == g for r, g in zip(ranked, gold_task)])),
        f"routing_top1_{other}": float(
            np.mean([bool(r.ranked) and r.ranked[0][0] == g for r, g in zip(ranked, gold_task)])
        ),
    }


def run_logistic(embedder, stream, order, seed, router):
    """Frozen MiniLM embeddings + one logistic-regression head per task; same router as promptbank."""
    from sklearn.linear_model import LogisticRegression

    heads = {}
    for name in order:
        X = embedder.encode([ex.input for ex in stream[name]["train"].examples])
        y = [ex.target for ex in stream[name]["train"].examples]
        heads[name] = LogisticRegression(max_iter=2000, C=10.0, random_state=seed).fit(X, y)
    oracle, routed_acc = [], []
    for name in order:
        X = embedder.encode([ex.input for ex in stream[name]["test"].examples])
        y = np.array([ex.target for ex in stream[name]["test"].examples])
        oracle.append(float((heads[name].predict(X) == y).mean()))
        chosen = router([ex.input for ex in stream[name]["test"].examples])
        correct = [c == name and heads[name].predict(x[None])[0] == t for c, x, t in zip(chosen, X, y)]
        routed_acc.append(float(np.mean(correct)))
    return {"ACC": float(np.mean(oracle)), "routed_ACC": float(np.mean(routed_acc)), "BWT": 0.0, "forgetting": 0.0}


def _train_shared(backbone, data_by_task, steps, seed, prompt=None, heads=None, multitask=False):
    """Train one shared deep prompt (+ per-task heads). Sequential: one task's data; multitask: all tasks mixed."""
    from torch import nn

    from promptbank.config import Method, PromptConfig, TrainConfig
    from promptbank.encoder import Head, encode_texts, pooled
    from promptbank.prompts import build_prompt_module, describe_task, text_init_ids, token_init
    from promptbank.train import train_loop

    model, tok = backbone.model, backbone.tokenizer
    torch.manual_seed(seed)
    if prompt is None:
        conf = PromptConfig(method=Method.DEEP, num_virtual_tokens=20)
        init = token_init(
            model,
            text_init_ids(tok, describe_task("classification", None), 20),
            conf.resolved_layers(backbone.num_layers),
            causal=False,
        )
        prompt = build_prompt_module(conf, init)
    heads = heads if heads is not None else {}
    rows = []  # (task, seq, label index)
    for name, data in data_by_task.items():
        if name not in heads:
            heads[name] = Head(backbone.hidden_size, len(data.labels))
        index = {lab: i for i, lab in enumerate(data.labels)}
        seqs = encode_texts(tok, [ex.input for ex in data.examples], 128)
        rows += [(name, s, index[ex.target]) for s, ex in zip(seqs, data.examples)]
    modules = nn.ModuleDict({"prompt": prompt, **{f"head_{n}": h for n, h in heads.items() if n in data_by_task}})

    def batch_loss(idx):
        p = prompt()
        feats = pooled(model, tok, [rows[i][1] for i in idx], [p] * len(idx))
        losses = [
            nn.functional.cross_entropy(heads[rows[i][0]](f[None]), torch.tensor([rows[i][2]]))
            for i, f in zip(idx, feats)
        ]
        return torch.stack(losses).mean()

    groups = [
        {"params": list(prompt.parameters()), "lr": 0.1},
        {"params": [p for n, h in heads.items() if n in data_by_task for p in h.parameters()], "lr": 1e-2},
    ]
    tconf = TrainConfig(max_steps=steps, batch_size=16, progress=False, seed=seed)
    train_loop(model, modules, len(rows), batch_loss, None, tconf, param_groups=groups, fold=prompt.fold)
    return prompt, heads


@torch.no_grad()
def _eval_shared(backbone, prompt, head, data):
    from promptbank.encoder import encode_texts, pooled

    seqs = encode_texts(backbone.tokenizer, [ex.input for ex in data.examples], 128)
    p = prompt.fold()
    correct = 0
    for s in range(0, len(seqs), 64):
        feats = pooled(backbone.model, backbone.tokenizer, seqs[s : s + 64], [p] * len(seqs[s : s + 64]))
        pred = head(feats).argmax(-1)
        correct += sum(data.labels[int(k)] == ex.target for k, ex in zip(pred, data.examples[s : s + 64]))
    return correct / len(seqs)


def run_sequential_shared(backbone, stream, order, steps, seed):
    R = np.full((len(order), len(order)), np.nan)
    prompt, heads = None, None
    for i, name in enumerate(order):
        prompt, heads = _train_shared(backbone, {name: stream[name]["train"]}, steps, seed, prompt, heads)
        for j in range(i + 1):
            R[i, j] = _eval_shared(backbone, prompt, heads[order[j]], stream[order[j]]["test"])
    return R


def run_multitask(backbone, stream, order, steps, seed):
    prompt, heads = _train_shared(
        backbone, {n: stream[n]["train"] for n in order}, steps * len(order), seed, multitask=True
    )
    return {n: _eval_shared(backbone, prompt, heads[n], stream[n]["test"]) for n in order}


class _Memo:
    """An embedder that remembers every text it encoded (optionally: the first half of another's vectors)."""

    def __init__(self, base, *, first_half: bool = False, name: str | None = None):
        self.base, self.first_half = base, first_half
        self.name = name or base.name
        self.dim = base.dim // 2 if first_half else base.dim
        self._memo: dict[str, np.ndarray] = {}

    def encode(self, texts, *, batch_size: int = 64) -> np.ndarray:
        texts = list(texts)
        todo = list(dict.fromkeys(t for t in texts if t not in self._memo))
        if todo:
            for t, v in zip(todo, self.base.encode(todo, batch_size=batch_size)):
                self._memo[t] = v
        x = np.stack([self._memo[t] for t in texts]) if texts else np.zeros((0, self.base.dim), np.float32)
        if self.first_half:
            x = x[:, : self.dim]
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return np.ascontiguousarray(x, dtype=np.float32)


def routing_only(args, backbone) -> dict:
    """Routing alone on the same CL-4 samples: each task filed with its keys only (no prompt is trained or used),
    then every test query routed on its own, for both scorers and both routing embedders. Cheap (embeddings
    only); it isolates the router from the prompts. Label-aware hit@1 equals plain hit@1 here: the four tasks
    have four different label sets."""
    from promptbank import PromptBank
    from promptbank.config import TrainConfig
    from promptbank.embed import DEFAULT_EMBEDDER, load_embedder

    tconf = TrainConfig(seed=0)
    out = []
    both = _Memo(load_embedder(ROUTING_EMBEDDER))
    # one forward for both: the routing embedding's first half is the plain sentence embedding / sqrt(2)
    embedders = {ROUTING_EMBEDDER: both, DEFAULT_EMBEDDER: _Memo(both, first_half=True, name=DEFAULT_EMBEDDER)}
    for seed in range(args.seeds):
        stream = load_stream(args.data, args.train_per_class, args.test_per_class, seed)
        texts = [ex.input for n in TASKS for ex in stream[n]["test"].examples]
        gold = [n for n in TASKS for _ in stream[n]["test"].examples]
        for ename, emb in embedders.items():
            bank = PromptBank(backbone, emb)
            for name in TASKS:
                train = stream[name]["train"]
                file_routing_keys_only(bank, name, train, tconf)
            for scorer in ("lda", "knn"):
                bank.routing = scorer
                routes = bank.route_many(texts)
                row = {
                    "seed": seed,
                    "embedder": ename,
                    "scorer": scorer,
                    "hit@1": float(np.mean([r.task == g for r, g in zip(routes, gold)])),
                    "top1_ignoring_threshold": float(np.mean([r.ranked[0][0] == g for r, g in zip(routes, gold)])),
                }
                out.append(row)
                print(row, flush=True)
    return {"routing_only": out}


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--quick", action="store_true", help="1 order, 1 seed, 4/class train, 5/class test, 10 steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--orders", default="O1,O2,O3")
    ap.add_argument("--steps", type=int, default=60, help="optimizer steps per task (batch 16)")
    ap.add_argument("--train-per-class", type=int, default=16)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--out", type=Path, default=RESULTS / "forgetting.json")
    ap.add_argument("--embedder", default=ROUTING_EMBEDDER, help="routing embedder (default: MiniLM + middle layer)")
    ap.add_argument("--routing", default="lda", choices=["lda", "knn"], help="routing scorer of the bank")
    ap.add_argument("--routing-only", action="store_true", help="no training: routing of both scorers / embedders")
    args = ap.parse_args(argv)
    global ROUTING
    ROUTING = args.routing
    if args.quick:
        args.seeds, args.orders, args.steps, args.train_per_class, args.test_per_class = 1, "O1", 10, 4, 5
    if not (args.data / "ag_news").is_dir():
        sys.exit(
            f"no CL-4 data under {args.data} (expected ag_news/, amazon_reviews/, dbpedia/, yahoo_answers/); "
            "pass --data or set PROMPTBANK_DATA"
        )
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from promptbank.backbone import load_backbone
    from promptbank.bank import Routing  # noqa: F401  (import check)
    from promptbank.embed import load_embedder

    t_start = time.perf_counter()
    backbone = load_backbone("all-minilm-l6-v2")
    if args.routing_only:
        result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
        result.update(routing_only(args, backbone))
        result["wall_seconds"] = time.perf_counter() - t_start
        out = args.out if args.out != RESULTS / "forgetting.json" else RESULTS / "forgetting_routing.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        rows = result["routing_only"]
        print(f"\nCL-4 routing only, {args.seeds} seed(s), {len(rows) // 4 // max(1, args.seeds)} x 4 configurations\n")
        print("| routing embedder | scorer | hit@1 (with 'no task' threshold) | top-1 (no threshold) |")
        print("|---|---|---:|---:|")
        for e in dict.fromkeys(r["embedder"] for r in rows):
            for sc in ("lda", "knn"):
                sel = [r for r in rows if r["embedder"] == e and r["scorer"] == sc]
                h = [r["hit@1"] for r in sel]
                t = [r["top1_ignoring_threshold"] for r in sel]
                print(
                    f"| {e} | {sc} | {100 * np.mean(h):.1f} ({100 * np.std(h):.1f}) | {100 * np.mean(t):.1f} ({100 * np.std(t):.1f}) |"
                )
        return result
    embedder = load_embedder(args.embedder)
    orders = args.orders.split(",")
    runs = []
    for seed in range(args.seeds):
        stream = load_stream(args.data, args.train_per_class, args.test_per_class, seed)
        trained = {}
        mt = None
        for oname in orders:
            order = ORDERS[oname]
            t0 = time.perf_counter()
            R, routed, bank = run_promptbank(backbone, embedder, stream, order, args.steps, seed, trained)
            t_ours = time.perf_counter() - t0
            router = lambda texts, bank=bank: [r.task for r in bank.route_many(texts)]  # noqa: E731
            logistic = run_logistic(embedder, stream, order, seed, router)
            t0 = time.perf_counter()
            R_seq = run_sequential_shared(backbone, stream, order, args.steps, seed)
            t_seq = time.perf_counter() - t0
            if mt is None:  # order-independent: once per seed
                mt = run_multitask(backbone, stream, order, args.steps, seed)
            run = {
                "seed": seed,
                "order": oname,
                "tasks": order,
                "promptbank": {
                    "R": R.tolist(),
                    **metrics(R),
                    **routed,
                    "seconds": t_ours,
                    "train_seconds": {n: trained[(n, seed)][1] for n in order},
                },
                "logistic_head": logistic,
                "sequential_shared_prompt": {"R": R_seq.tolist(), **metrics(R_seq), "seconds": t_seq},
                "multitask": {"per_task": mt, "ACC": float(np.mean(list(mt.values())))},
            }
            run["promptbank"]["oracle_routed_gap"] = run["promptbank"]["ACC"] - run["promptbank"]["routed_ACC"]
            runs.append(run)
            print(
                f"seed {seed} {oname}: promptbank ACC {run['promptbank']['ACC']:.3f} (routed "
                f"{run['promptbank']['routed_ACC']:.3f}, hit@1 {run['promptbank']['routing_hit@1']:.3f}, BWT "
                f"{run['promptbank']['BWT']:+.3f}); logistic {logistic['ACC']:.3f} (routed {logistic['routed_ACC']:.3f}); "
                f"sequential shared prompt ACC {run['sequential_shared_prompt']['ACC']:.3f} BWT "
                f"{run['sequential_shared_prompt']['BWT']:+.3f}; multitask {run['multitask']['ACC']:.3f}",
                flush=True,
            )

    def mean(path):
        vals = []
        for r in runs:
            v = r
            for k in path:
                v = v[k]
            vals.append(v)
        return statistics.mean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)

    summary = {
        "promptbank (task given)": {k: mean(("promptbank", k)) for k in ("ACC", "BWT", "forgetting")},
        "promptbank (routed)": {
            "ACC": mean(("promptbank", "routed_ACC")),
            "hit@1": mean(("promptbank", "routing_hit@1")),
        },
        f"routing top-1, no threshold ({args.routing})": {
            "hit@1": mean(("promptbank", "routing_top1_ignoring_threshold"))
        },
        f"routing hit@1, other scorer ({OTHER[args.routing]})": {
            "hit@1": mean(("promptbank", f"routing_hit@1_{OTHER[args.routing]}"))
        },
        f"routing top-1, other scorer ({OTHER[args.routing]})": {
            "hit@1": mean(("promptbank", f"routing_top1_{OTHER[args.routing]}"))
        },
        "frozen emb + logistic head (task given)": {"ACC": mean(("logistic_head", "ACC"))},
        "frozen emb + logistic head (routed)": {"ACC": mean(("logistic_head", "routed_ACC"))},
        "sequential shared prompt": {k: mean(("sequential_shared_prompt", k)) for k in ("ACC", "BWT", "forgetting")},
        "multitask (upper bound)": {"ACC": mean(("multitask", "ACC"))},
    }
    import transformers

    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "wall_seconds": time.perf_counter() - t_start,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(runs[0], args.out.with_suffix(".png"))

    print(
        f"\nCL-4 few-shot ({args.train_per_class}/class train, {args.test_per_class}/class test), orders {args.orders}, "
        f"{args.seeds} seed(s), {args.steps} steps/task; mean (std) over runs; wall {result['wall_seconds'] / 60:.1f} min\n"
    )
    print("| system | ACC | BWT | forgetting | routing hit@1 |")
    print("|---|---:|---:|---:|---:|")
    for name, m in summary.items():
        cells = [
            f"{100 * m[k][0]:.1f} ({100 * m[k][1]:.1f})" if k in m else ""
            for k in ("ACC", "BWT", "forgetting", "hit@1")
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return result


def _plot(run, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, title in (
        (axes[0], "promptbank", "promptbank (task given)"),
        (axes[1], "sequential_shared_prompt", "one shared prompt, sequential"),
    ):
        R = np.array(run[key]["R"], dtype=float)
        im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(run["tasks"])), run["tasks"], rotation=45)
        ax.set_yticks(range(len(run["tasks"])), [f"after {t}" for t in run["tasks"]])
        for i in range(R.shape[0]):
            for j in range(R.shape[1]):
                if not np.isnan(R[i, j]):
                    ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    fig.suptitle(f"CL-4 accuracy matrix R[i][j], order {run['order']}, seed {run['seed']}")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()

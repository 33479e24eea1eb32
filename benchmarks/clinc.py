"""CLINC150 as a continual stream: its 10 domains (15 intents each) learned one after another on the
all-MiniLM-L6-v2 encoder backbone, then every test query routed with no task id, and the out-of-scope (OOS) queries
scored for rejection.

    python benchmarks/clinc.py                  # 10 train examples per intent, full test + OOS test (~10 min)
    python benchmarks/clinc.py --quick          # 3 domains, 4 train / 3 test per intent, 5 steps (smoke, ~1 min)
    python benchmarks/clinc.py --data /path/to/shared/data

Systems in the same run: promptbank (one deep prompt + head per domain; learned router, and the cosine scorer
on the same keys for comparison); frozen embeddings + per-domain logistic head with the same routing.
Metrics: accuracy matrix R[i][j] (ACC, BWT), routing hit@1 over in-scope queries (each routed on its own; "no
task" is a miss), OOS AUROC of the routing score (in-scope vs out-of-scope), the share of OOS queries rejected
and of in-scope queries accepted at the calibrated thresholds, routed accuracy (in-scope: right domain and
intent; the whole test set with OOS counted right when rejected). Writes benchmarks/results/clinc.json + .png.
Hyper-parameters are the library defaults except those listed in the JSON config; nothing is tuned on test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import default_data_dir, file_routing_keys_only, routing_discriminant, without_probes  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def load_clinc(data_dir: Path, train_per_intent: int, test_per_intent: int | None, seed: int, domains: int | None):
    """-> ({domain: (train TaskData, test TaskData)}, OOS test texts). Samples are per intent, deterministic."""
    from promptbank.tasks import TaskData, load_task_data

    folder = data_dir / "clinc150"
    doms = json.loads((folder / "labels.json").read_text())["domains"]
    names = list(doms)[:domains] if domains else list(doms)
    rng = random.Random(seed)
    stream = {}
    for split, per in (("train", train_per_intent), ("test", test_per_intent)):
        data = load_task_data(folder / f"{split}.jsonl")
        by: dict[str, list] = {}
        for ex in data.examples:
            by.setdefault(ex.target, []).append(ex)
        for d in names:
            intents = sorted(doms[d])
            rows = [ex for it in intents for ex in (rng.sample(by[it], min(per, len(by[it]))) if per else by[it])]
            rng.shuffle(rows)
            stream.setdefault(d, {})[split] = TaskData(
                kind="classification", examples=rows, labels=intents, source=str(folder / f"{split}.jsonl")
            )
    with open(folder / "oos_test.jsonl", encoding="utf-8") as f:  # one label ("oos"): not a task file
        oos = [json.loads(line)["text"] for line in f if line.strip()]
    if test_per_intent:
        oos = rng.sample(oos, min(len(oos), test_per_intent * 15 * len(names)))
    return stream, oos


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of scores (positives should score higher); ties count one half."""
    scores = np.r_[pos, neg]
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):  # average ranks of ties
        m = scores == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def routing_metrics(bank, texts, gold, oos) -> dict:
    ins, out = bank.route_many(texts), bank.route_many(oos)
    s_in = np.array([r.score for r in ins])
    s_out = np.array([r.score for r in out])
    return {
        "hit@1": float(np.mean([r.task == g for r, g in zip(ins, gold)])),
        "top1_ignoring_threshold": float(np.mean([r.ranked[0][0] == g for r, g in zip(ins, gold)])),
        "oos_auroc": auroc(s_in, s_out),
        "oos_rejected": float(np.mean([r.task is None for r in out])),
        "in_scope_accepted": float(np.mean([r.task is not None for r in ins])),
        "discriminant": routing_discriminant(bank),
        # the same routings decided without the learned router's guard (Routing.guard): its threshold alone
        "without_guard": {
            "hit@1": float(np.mean([_first_passes(r) and r.ranked[0][0] == g for r, g in zip(ins, gold)])),
            "oos_rejected": float(np.mean([not _first_passes(r) for r in out])),
            "in_scope_accepted": float(np.mean([_first_passes(r) for r in ins])),
        },
    }


def _first_passes(r) -> bool:
    return r.score is not None and r.score >= r.threshold


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per domain (batch 16)")
    ap.add_argument("--train-per-intent", type=int, default=10)
    ap.add_argument("--test-per-intent", type=int, default=0, help="0: the full test split (30 per intent)")
    ap.add_argument("--domains", type=int, default=0, help="0: all 10")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=RESULTS / "clinc.json")
    ap.add_argument("--routing-only", action="store_true", help="no training: file keys only, report routing")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.train_per_intent, args.test_per_intent, args.domains = 5, 4, 3, 3
        if args.out == RESULTS / "clinc.json":
            args.out = RESULTS / "clinc_quick.json"
    if not (args.data / "clinc150").is_dir():
        sys.exit(f"no CLINC150 under {args.data} (expected clinc150/); pass --data or set PROMPTBANK_DATA")
    torch.set_num_threads(args.threads)
    from sklearn.linear_model import LogisticRegression

    from promptbank import PromptBank
    from promptbank.backbone import load_backbone
    from promptbank.embed import ROUTING_EMBEDDER, load_embedder

    t_start = time.perf_counter()
    stream, oos = load_clinc(args.data, args.train_per_intent, args.test_per_intent or None, args.seed, args.domains)
    order = list(stream)
    bank = PromptBank(load_backbone("all-minilm-l6-v2"), load_embedder(ROUTING_EMBEDDER))
    if args.routing_only:
        return _routing_only(bank, stream, oos, order, args, t_start)
    R = np.full((len(order), len(order)), np.nan)
    train_seconds = {}
    for i, name in enumerate(order):
        t0 = time.perf_counter()
        bank.learn_task(
            name,
            stream[name]["train"],
            method="deep",
            max_steps=args.steps,
            batch_size=16,
            seed=args.seed,
            progress=False,
            max_input_tokens=64,
            keep_train_state=False,
        )
        train_seconds[name] = time.perf_counter() - t0
        for j in range(i + 1):
            R[i, j] = bank.evaluate(stream[order[j]]["test"], task=order[j], batch_size=64)["accuracy"]
        print(
            f"learned {name} ({train_seconds[name]:.0f} s): R[{i}] = {np.round(R[i, : i + 1], 3).tolist()}", flush=True
        )

    texts = [ex.input for n in order for ex in stream[n]["test"].examples]
    gold = [n for n in order for _ in stream[n]["test"].examples]
    labels = [ex.target for n in order for ex in stream[n]["test"].examples]
    routing = {}
    for scorer in ("lda", "knn"):
        bank.routing = scorer
        routing[scorer] = routing_metrics(bank, texts, gold, oos)
    bank.routing = "lda"
    preds = bank.predict(texts, batch_size=64)
    oos_preds = bank.route_many(oos)
    in_correct = [p.task == g and p.output == y for p, g, y in zip(preds, gold, labels)]
    routed_in = float(np.mean(in_correct))
    routed_all = float((sum(in_correct) + sum(r.task is None for r in oos_preds)) / (len(texts) + len(oos)))
    ablation = {}
    plain = without_probes(bank, order)
    if plain is not None:  # the same trained domains, prompted heads alone (same router)
        acc_plain = [plain.evaluate(stream[n]["test"], task=n, batch_size=64)["accuracy"] for n in order]
        preds_plain = plain.predict(texts, batch_size=64)
        ablation = {
            "ACC_head_only": float(np.mean(acc_plain)),
            "routed_in_scope_head_only": float(
                np.mean([p.task == g and p.output == y for p, g, y in zip(preds_plain, gold, labels)])
            ),
        }

    # baseline: frozen routing embeddings + one logistic head per domain, routed by the same router
    emb = bank.embedder
    heads = {}
    for n in order:
        X = emb.encode([ex.input for ex in stream[n]["train"].examples])
        heads[n] = LogisticRegression(max_iter=2000, C=10.0).fit(X, [ex.target for ex in stream[n]["train"].examples])
    Xte = emb.encode(texts)
    chosen = [p.task for p in preds]
    log_oracle = float(
        np.mean(
            [
                np.mean(heads[n].predict(Xte[np.array(gold) == n]) == np.array(labels)[np.array(gold) == n])
                for n in order
            ]
        )
    )
    log_routed = float(
        np.mean([c == g and heads[g].predict(x[None])[0] == y for c, g, x, y in zip(chosen, gold, Xte, labels)])
    )

    t = len(order)
    acc = float(R[-1].mean())
    bwt = float(np.mean([R[-1, j] - R[j, j] for j in range(t - 1)])) if t > 1 else 0.0
    import transformers

    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "tasks": order,
        "n_test_in_scope": len(texts),
        "n_test_oos": len(oos),
        "promptbank": {
            "R": R.tolist(),
            "ACC": acc,
            "BWT": bwt,
            **ablation,
            "routed_ACC_in_scope": routed_in,
            "routed_ACC_with_oos": routed_all,
            "routing": routing,
            "train_seconds": train_seconds,
        },
        "logistic_head": {"ACC": log_oracle, "routed_ACC_in_scope": log_routed},
        "wall_seconds": time.perf_counter() - t_start,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(R, order, args.out.with_suffix(".png"))
    lda, knn = routing["lda"], routing["knn"]
    print(
        f"\nCLINC150, {len(order)} domains as tasks, {args.train_per_intent} train examples per intent, "
        f"{len(texts)} in-scope + {len(oos)} OOS test queries; wall {result['wall_seconds'] / 60:.1f} min\n"
    )
    print("| metric | promptbank (learned router) | cosine scorer, same keys | frozen emb + logistic head |")
    print("|---|---:|---:|---:|")
    print(f"| ACC, task given (BWT) | {100 * acc:.1f} ({100 * bwt:+.1f}) | | {100 * log_oracle:.1f} |")
    print(f"| routing hit@1 | {100 * lda['hit@1']:.1f} | {100 * knn['hit@1']:.1f} | (same router) |")
    print(
        f"| routing top-1, no threshold | {100 * lda['top1_ignoring_threshold']:.1f} | {100 * knn['top1_ignoring_threshold']:.1f} | |"
    )
    print(f"| OOS AUROC | {lda['oos_auroc']:.3f} | {knn['oos_auroc']:.3f} | |")
    print(
        f"| OOS rejected / in-scope accepted | {100 * lda['oos_rejected']:.1f} / {100 * lda['in_scope_accepted']:.1f} | {100 * knn['oos_rejected']:.1f} / {100 * knn['in_scope_accepted']:.1f} | |"
    )
    print(f"| routed accuracy, in-scope | {100 * routed_in:.1f} | | {100 * log_routed:.1f} |")
    print(f"| routed accuracy, with OOS (rejected = right) | {100 * routed_all:.1f} | | |")
    if ablation:
        print(
            f"| prompted heads alone (no embedding probe): ACC / routed in-scope | "
            f"{100 * ablation['ACC_head_only']:.1f} / {100 * ablation['routed_in_scope_head_only']:.1f} | | |"
        )
    return result


def _routing_only(bank, stream, oos, order, args, t_start) -> dict:
    """Each domain filed with its routing keys only (no prompt is trained or used); routing of both scorers."""
    from promptbank.config import TrainConfig

    tconf = TrainConfig(seed=args.seed)
    for name in order:
        train = stream[name]["train"]
        file_routing_keys_only(bank, name, train, tconf)
    texts = [ex.input for n in order for ex in stream[n]["test"].examples]
    gold = [n for n in order for _ in stream[n]["test"].examples]
    routing = {}
    for scorer in ("lda", "knn"):
        bank.routing = scorer
        routing[scorer] = routing_metrics(bank, texts, gold, oos)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "tasks": order,
        "n_test_in_scope": len(texts),
        "n_test_oos": len(oos),
        "routing": routing,
        "wall_seconds": time.perf_counter() - t_start,
    }
    out = args.out if args.out.name != "clinc.json" else args.out.with_name("clinc_routing.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| scorer | hit@1 | top-1, no threshold | OOS AUROC | OOS rejected | in-scope accepted |")
    print("|---|---:|---:|---:|---:|---:|")
    for sc, m in routing.items():
        print(
            f"| {sc} | {100 * m['hit@1']:.1f} | {100 * m['top1_ignoring_threshold']:.1f} | {m['oos_auroc']:.3f} | "
            f"{100 * m['oos_rejected']:.1f} | {100 * m['in_scope_accepted']:.1f} |"
        )
        if sc == "lda":
            w = m["without_guard"]
            print(
                f"| {sc}, without the guard | {100 * w['hit@1']:.1f} | | | {100 * w['oos_rejected']:.1f} | "
                f"{100 * w['in_scope_accepted']:.1f} |"
            )
    return result


def _plot(R: np.ndarray, order: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right")
    ax.set_yticks(range(len(order)), [f"after {t}" for t in order])
    for i in range(R.shape[0]):
        for j in range(R.shape[1]):
            if not np.isnan(R[i, j]):
                ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8, label="accuracy")
    ax.set_title("CLINC150 domains: accuracy matrix R[i][j] (task given)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()

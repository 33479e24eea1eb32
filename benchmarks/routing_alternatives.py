"""Routing alternatives that did not replace the default: held-out evidence for keeping the learned router.

The learned router (LDA over MiniLM's sentence + middle-layer embedding, ``promptbank.lda``) misses the CL-4
routing target (hit@1 >= 98 %): its top-1 on held-out queries is ~97.6 %, and the "no task" threshold rejects
~3 % more. This measures four ways one might try to do better, on the same held-out data as
``routing_layers.py`` / ``routing_threshold.py`` (no test split is read):

- **another ranker**: multinomial logistic regression over the same keys (labels: tasks, or task labels summed
  per task), and its product with the LDA posterior, against LDA's top-1;
- **another rejection score**: the relative Mahalanobis distance (Ren et al. 2021, "A simple fix to Mahalanobis
  distance for improving near-OOD detection"): ``d_task(x) - alpha * d_background(x)``, the background one
  Gaussian (Ledoit-Wolf) over every key of the bank, thresholds cross-fitted like the default's (same folds).
  Reported: AUROC of in-task vs out-of-scope queries (threshold-free), and at ``threshold_quantile=0.05`` hit@1,
  in-task queries rejected, out-of-scope queries rejected;
- **surface features beside the embedding**: the keys and queries extended with a hashed bag of character
  n-grams (case kept) or of word uni- and bigrams (:class:`promptbank.embed.HashingEmbedder`), weighted against
  the default embedding, since tasks from different sources differ in format (casing, punctuation, markup) that a
  sentence embedding is trained to ignore. Reported: top-1, hit@1 and the default rejection score's AUROC;
- **another embedder** (``--smollm2``, ~16 min more at 2 threads): mean-pooled hidden states of SmolLM2-135M (the
  default causal backbone, so a causal bank could route from its own model) at several layers, alone and
  concatenated with the default embedding.

Task sets: CL-4 and the long stream (16 keys and up to 30 queries per label from the TRAIN pools; out-of-scope:
300 CLINC150 out-of-scope test queries, far from both), and CLINC150's 10 domains (10 keys per intent from train;
the validation split's in-scope queries and its 100 out-of-scope ones).

    python benchmarks/routing_alternatives.py                 # seeds 0-2, ~10 min at 1 thread
    python benchmarks/routing_alternatives.py --smollm2 --seeds 0
    python benchmarks/routing_alternatives.py --quick
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_common import auroc, default_data_dir, versions, write_result  # noqa: E402

ALPHAS = (0.25, 0.5, 0.75)
QUANTILE = 0.05
DEFAULT = "default (Mahalanobis)"


def _background(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of one Ledoit-Wolf Gaussian over all ``keys``."""
    from promptbank.lda import ledoit_wolf_covariance, precision_of

    mu = keys.mean(0)
    return mu, precision_of(ledoit_wolf_covariance(keys - mu)[0])


def _bg_distance(x: np.ndarray, bg: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    d = np.asarray(x, dtype=np.float64) - bg[0]
    return np.einsum("nd,nd->n", d @ bg[1], d)


def rejection(keys, ktask, kgroup, queries, qtask, oos) -> dict:
    """The default rejection score (Mahalanobis distance to the top task) against relative ones, per alpha."""
    from promptbank.lda import _FOLDS, GaussianRouter, _fit, _Params, task_folds

    names = list(dict.fromkeys(ktask.tolist()))
    items = [(t, keys[ktask == n].astype(np.float64), kgroup[ktask == n]) for t, n in enumerate(names)]
    dim = keys.shape[1]

    def task_distances(params: _Params, x: np.ndarray) -> np.ndarray:
        starts = np.flatnonzero(np.r_[True, np.diff(params.owner) != 0])
        return np.minimum.reduceat(params.distances(x), starts, axis=1)

    # held-out (cross-fitted) distances of each task's keys: to its own task, and to the background
    held_task: list[list[np.ndarray]] = [[] for _ in names]
    held_bg: list[list[np.ndarray]] = [[] for _ in names]
    folds = [task_folds(n, len(kk)) for n, (_, kk, _) in zip(names, items)]  # as the router draws them
    for k in range(_FOLDS):
        train = [(t, kk[f != k], g[f != k]) for (t, kk, g), f in zip(items, folds)]
        params = _Params(*_fit(train, dim)[:3])
        bg = _background(np.concatenate([kk for _, kk, _ in train]))
        for t, ((_, kk, _), f) in enumerate(zip(items, folds)):
            if np.any(f == k):
                held_task[t].append(task_distances(params, kk[f == k])[:, t])
                held_bg[t].append(_bg_distance(kk[f == k], bg))
    held_task_all = [np.concatenate(h) for h in held_task]
    held_bg_all = [np.concatenate(h) for h in held_bg]

    router = GaussianRouter({n: (it[1], it[2], QUANTILE) for n, it in zip(names, items)}, dim)
    params = _Params(*_fit(items, dim)[:3])
    bg = _background(np.concatenate([kk for _, kk, _ in items]))
    out = {}
    per_alpha = {DEFAULT: 0.0, **{f"relative, alpha={a:g}": a for a in ALPHAS}}
    # the router's guard (GaussianRouter.route_guarded): with the per-group ranking, the query must also pass the
    # threshold of the task the per-task Gaussians rank first; applied with each row's own score and thresholds
    per_task = router._guard if router._guard is not None else router._ranker
    tops = {}
    for which, x in (("in", queries), ("oos", oos)):
        top = router.rank_scores(x).argmax(1)
        guard = top if per_task is None else per_task.owner[per_task.distances(x).argmin(1)]
        d = task_distances(params, x)
        rows = np.arange(len(x))
        tops[which] = (top, d[rows, top], guard, d[rows, guard], _bg_distance(x, bg))
    right = np.asarray(names)[tops["in"][0]] == qtask
    for label, a in per_alpha.items():
        score = {w: d - a * b for w, (_, d, _, _, b) in tops.items()}  # lower: more in-task
        guard_score = {w: d - a * b for w, (_, _, _, d, b) in tops.items()}
        thr = np.array([np.quantile(h - a * b, 1 - QUANTILE) for h, b in zip(held_task_all, held_bg_all)])
        acc_in = (score["in"] <= thr[tops["in"][0]]) & (guard_score["in"] <= thr[tops["in"][2]])
        acc_oos = (score["oos"] <= thr[tops["oos"][0]]) & (guard_score["oos"] <= thr[tops["oos"][2]])
        out[label] = {
            "auroc": auroc(-score["in"], -score["oos"]),
            "top1": float(right.mean()),
            "hit@1": float((right & acc_in).mean()),
            "in_task_rejected": float((~acc_in).mean()),
            "oos_rejected": float((~acc_oos).mean()),
        }
    return out


def rankers(keys, ktask, kgroup, queries, qtask) -> dict:
    """Top-1 of LDA (the default ranker) and of logistic regression over the same keys."""
    from sklearn.linear_model import LogisticRegression

    from promptbank.lda import GaussianRouter

    names = list(dict.fromkeys(ktask.tolist()))
    router = GaussianRouter({n: (keys[ktask == n], kgroup[ktask == n], QUANTILE) for n in names}, keys.shape[1])
    rank = router.rank_scores(queries)
    lda_post = np.exp((rank - rank.max(1, keepdims=True)) * keys.shape[1] / 2)  # scores are -distance / dim
    lda_post /= lda_post.sum(1, keepdims=True)
    by_task = LogisticRegression(C=10.0, max_iter=2000).fit(keys, ktask)
    p_task = by_task.predict_proba(queries)[:, [list(by_task.classes_).index(n) for n in names]]
    groups = np.array([f"{t}|{g}" for t, g in zip(ktask, kgroup)])
    by_group = LogisticRegression(C=10.0, max_iter=2000).fit(keys, groups)
    owner = np.array([c.split("|")[0] for c in by_group.classes_])
    pg = by_group.predict_proba(queries)
    p_group = np.stack([pg[:, owner == n].sum(1) for n in names], 1)
    top1 = lambda s: float((np.asarray(names)[s.argmax(1)] == qtask).mean())  # noqa: E731
    return {
        "LDA (default)": top1(rank),
        "logistic regression, task labels": top1(p_task),
        "logistic regression, task-label groups summed": top1(p_group),
        "LDA x logistic regression (posterior product)": top1(np.log(lda_post + 1e-12) + np.log(p_task + 1e-12)),
    }


SURFACE = {  # name -> (n-gram lengths; None: hashed words), weight of the surface block against the embedding
    "char 3-grams, weight 0.5": ((3,), 0.5),
    "char 3-grams, weight 1": ((3,), 1.0),
    "char 2-4-grams, weight 0.5": ((2, 3, 4), 0.5),
    "word uni+bigrams, weight 0.5": (None, 0.5),
}
SURFACE_DIM = 256


def char_ngrams(texts: list[str], ns: tuple[int, ...] = (3,), dim: int = SURFACE_DIM) -> np.ndarray:
    """``(n, dim)`` unit rows: each text's UTF-8 byte n-grams (case kept, padded with one space each side) hashed
    into ``dim`` signed buckets (splitmix64 of the n-gram's bytes; stable across processes), counts log-scaled
    (``sign * log1p(|count|)``)."""
    out = np.zeros((len(texts), dim))
    m1, m2, m3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    for row, text in enumerate(texts):
        b = np.frombuffer(f" {text} ".encode(), dtype=np.uint8).astype(np.uint64)
        for n in ns:
            if len(b) < n:
                continue
            code = np.zeros(len(b) - n + 1, dtype=np.uint64)
            for j in range(n):
                code = (code << np.uint64(8)) | b[j : len(b) - n + 1 + j]
            with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as the hash wants
                h = code + np.uint64(n) * m1
                h = (h ^ (h >> np.uint64(30))) * m2
                h = (h ^ (h >> np.uint64(27))) * m3
                h = h ^ (h >> np.uint64(31))
            np.add.at(out[row], ((h >> np.uint64(1)) % np.uint64(dim)).astype(np.int64), np.where(h & 1, 1.0, -1.0))
    out = np.sign(out) * np.log1p(np.abs(out))
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norm > 0, norm, 1.0)


def with_surface(emb: np.ndarray, surface: np.ndarray, weight: float) -> np.ndarray:
    """The embedding and the ``weight``-scaled surface block side by side, as unit rows."""
    x = np.concatenate([np.asarray(emb, dtype=np.float64), weight * surface], 1)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def surface(emb: tuple, texts: tuple, ktask, kgroup, qtask) -> dict:
    """Routing with each :data:`SURFACE` block beside the default embedding. ``emb`` / ``texts``: (keys,
    in-task queries, out-of-scope queries) as embeddings / texts."""
    from routing_layers import routing_accuracy

    from promptbank.embed import HashingEmbedder

    names = list(dict.fromkeys(np.asarray(ktask).tolist()))

    def measure(k, q, o) -> dict:
        acc = routing_accuracy(k, ktask, kgroup, q, qtask, names, quantile=QUANTILE, oos=o)
        return {m: acc[m] for m in ("top1", "hit@1", "auroc")}

    out = {"default (no surface block)": measure(*emb)}
    for label, (ns, weight) in SURFACE.items():
        blocks = [HashingEmbedder(SURFACE_DIM).encode(t) if ns is None else char_ngrams(t, ns) for t in texts]
        out[label] = measure(*(with_surface(e, b, weight) for e, b in zip(emb, blocks)))
    return out


@functools.lru_cache(maxsize=1)
def _smollm2():
    from promptbank.backbone import load_backbone

    return load_backbone()


def smollm2_means(texts: list[str], batch_size: int = 16, max_tokens: int = 128) -> np.ndarray:
    """(n, L + 1, d) mean-pooled, L2-normalised hidden states of the default causal backbone."""
    import torch

    bb = _smollm2()
    tok, model = bb.tokenizer, bb.model
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list = [None] * len(texts)
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            idx = order[s : s + batch_size]
            enc = tok(
                [texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_tokens
            )
            res = model(**enc, output_hidden_states=True)
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = torch.stack([(h * m).sum(1) / m.sum(1) for h in res.hidden_states], 1)
            pooled = pooled / pooled.norm(dim=-1, keepdim=True)
            for j, i in enumerate(idx):
                out[i] = pooled[j].float().numpy()
    return np.stack(out)


def _mean_table(per_seed: list[dict]) -> dict:
    """Mean over seeds of nested ``{set: {row: {metric: value}}}`` / ``{set: {row: value}}`` dicts."""
    first = per_seed[0]
    if isinstance(first, dict):
        return {k: _mean_table([d[k] for d in per_seed]) for k in first}
    return float(np.mean(per_seed))


def main(argv=None) -> dict:
    import forgetting
    import torch
    from routing_layers import combine, layer_means, sample
    from routing_threshold import clinc_sample

    from promptbank.embed import DEFAULT_EMBEDDER, SentenceEmbedder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--smollm2", action="store_true", help="also route with SmolLM2-135M hidden states (slow)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    sets = {"cl4": list(forgetting.TASKS), "long": list(forgetting.STREAMS["long"]["L1"])}
    keys_per_label, queries_per_label, keys_per_intent, domains, n_oos = 16, 30, 10, None, 300
    if args.quick:
        seeds, sets = seeds[:1], {k: v[:4] for k, v in sets.items()}
        keys_per_label, queries_per_label, keys_per_intent, domains, n_oos = 4, 4, 3, 3, 20
    encoder = SentenceEmbedder(DEFAULT_EMBEDDER)._load()
    layers = [encoder.n_layers, encoder.n_layers // 2]  # the default routing embedding: last + middle layer

    def embed(texts):
        return combine(layer_means(encoder, texts), layers)

    oos_lines = (args.data / "clinc150" / "oos_test.jsonl").read_text(encoding="utf-8").splitlines()
    far_oos_texts = [json.loads(line)["text"] for line in oos_lines[:n_oos]]
    far_oos = embed(far_oos_texts)
    per_seed: dict[str, list] = {"rejection": [], "rankers": [], "surface": [], "smollm2": []}
    for seed in seeds:
        samples = {}
        for set_name, names in sets.items():
            kt, ktask, kgroup, qt, qtask = sample(args.data, names, keys_per_label, queries_per_label, seed)
            samples[set_name] = (kt, np.asarray(ktask), np.asarray(kgroup), qt, np.asarray(qtask), far_oos_texts)
        kt, ktask, kgroup, qt, qtask, oos = clinc_sample(args.data, keys_per_intent, seed, domains)
        samples["clinc"] = (kt, np.asarray(ktask), np.asarray(kgroup), qt, np.asarray(qtask), oos)
        rej, rk, surf, smol = {}, {}, {}, {}
        for set_name, (kt, ktask, kgroup, qt, qtask, oos) in samples.items():
            k, q = embed(kt), embed(qt)
            o = far_oos if oos is far_oos_texts else embed(oos)
            rej[set_name] = rejection(k, ktask, kgroup, q, qtask, o)
            rk[set_name] = rankers(k, ktask, kgroup, q, qtask)
            surf[set_name] = surface((k, q, o), (kt, qt, oos), ktask, kgroup, qtask)
            for label, r in surf[set_name].items():
                print(
                    f"seed {seed} {set_name:5s} {label:30s} top-1 {100 * r['top1']:.1f}  hit@1 {100 * r['hit@1']:.1f}  "
                    f"AUROC {r['auroc']:.3f}",
                    flush=True,
                )
            line = ", ".join(f"{name} {100 * v:.1f}" for name, v in rk[set_name].items())
            print(f"seed {seed} {set_name:5s} top-1: {line}", flush=True)
            for label, r in rej[set_name].items():
                print(
                    f"seed {seed} {set_name:5s} {label:24s} AUROC {r['auroc']:.3f}  hit@1 {100 * r['hit@1']:.1f}  "
                    f"rejected in-task {100 * r['in_task_rejected']:.1f} / out-of-scope {100 * r['oos_rejected']:.1f}",
                    flush=True,
                )
            if args.smollm2 and set_name != "clinc":
                from routing_layers import routing_accuracy

                ks, qs = smollm2_means(kt), smollm2_means(qt)
                n = ks.shape[1] - 1
                names = list(dict.fromkeys(ktask.tolist()))
                smol[set_name] = {"default MiniLM +mid": routing_accuracy(k, ktask, kgroup, q, qtask, names)}
                for ls in ([n // 3], [n // 2], [2 * n // 3], [n], [n // 2, n // 4], [n // 2, n // 3]):
                    acc = routing_accuracy(combine(ks, ls), ktask, kgroup, combine(qs, ls), qtask, names)
                    smol[set_name][f"SmolLM2 layers {ls}"] = acc
                for ls in ([n // 3], [n // 2]):
                    both = lambda a, b: (np.concatenate([a, b], 1) / np.sqrt(2)).astype(np.float32)  # noqa: E731
                    acc = routing_accuracy(
                        both(k, combine(ks, ls)), ktask, kgroup, both(q, combine(qs, ls)), qtask, names
                    )
                    smol[set_name][f"MiniLM +mid and SmolLM2 layers {ls}"] = acc
                for label, acc in smol[set_name].items():
                    print(
                        f"seed {seed} {set_name:5s} {label:40s} top-1 {100 * acc['top1']:.1f} hit@1 {100 * acc['hit@1']:.1f}"
                    )
        per_seed["rejection"].append(rej)
        per_seed["rankers"].append(rk)
        per_seed["surface"].append(surf)
        if smol:
            per_seed["smollm2"].append(smol)
    result = {
        "config": {**{k: str(v) for k, v in vars(args).items()}, "seeds": seeds, "alphas": list(ALPHAS)},
        "versions": versions(),
        "per_seed": per_seed,
        "mean": {k: _mean_table(v) for k, v in per_seed.items() if v},
        "wall_seconds": time.perf_counter() - t_start,
    }
    print(table(result["mean"]))
    write_result(result, args.out, "routing_alternatives", quick=args.quick)
    return result


def table(mean: dict) -> str:
    lines = ["| task set | ranker | top-1 |", "|---|---|---:|"]
    for set_name, rows in mean["rankers"].items():
        lines += [f"| {set_name} | {name} | {100 * v:.1f} |" for name, v in rows.items()]
    lines += [
        "",
        "| task set | rejection score | AUROC in-task vs out-of-scope | hit@1 | in-task rejected | out-of-scope rejected |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for set_name, rows in mean["rejection"].items():
        lines += [
            f"| {set_name} | {name} | {r['auroc']:.3f} | {100 * r['hit@1']:.1f} | {100 * r['in_task_rejected']:.1f} | "
            f"{100 * r['oos_rejected']:.1f} |"
            for name, r in rows.items()
        ]
    for key, column, with_auroc in (("surface", "routing keys", True), ("smollm2", "routing embedding", False)):
        if key not in mean:
            continue
        lines += ["", f"| task set | {column} | top-1 | hit@1 |" + (" AUROC |" if with_auroc else "")]
        lines.append("|---|---|---:|---:|" + ("---:|" if with_auroc else ""))
        for set_name, rows in mean[key].items():
            lines += [
                f"| {set_name} | {name} | {100 * r['top1']:.1f} | {100 * r['hit@1']:.1f} |"
                + (f" {r['auroc']:.3f} |" if with_auroc else "")
                for name, r in rows.items()
                if isinstance(r, dict)
            ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

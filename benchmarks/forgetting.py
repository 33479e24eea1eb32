"""Forgetting benchmark: tasks learned one after another on the all-MiniLM-L6-v2 encoder backbone.

    python benchmarks/forgetting.py                       # CL-4: 3 orders x 3 seeds, every system
    python benchmarks/forgetting.py --stream long         # 16 tasks from 14 datasets, 1 order, 1 seed
    python benchmarks/forgetting.py --quick               # 1 order, 1 seed, tiny slices: a smoke run (~2 min)
    python benchmarks/forgetting.py --routing-only        # CL-4 routing alone (keys only, no training; ~2 min)
    python benchmarks/forgetting.py --data /path/to/shared/data
    # the seeds in parallel processes, then one result:
    python benchmarks/forgetting.py --seeds 1 --first-seed 0 --out s0.json   # (and 1, 2 alongside)
    python benchmarks/forgetting.py --merge s0.json s1.json s2.json

Streams:
- ``cl4``: AG News, Amazon, DBpedia, Yahoo (LFPT5 splits, 16 train examples per class, 50 test per class),
  orders O1 dbpedia->amazon->yahoo->ag, O2 dbpedia->amazon->ag->yahoo, O3 yahoo->amazon->ag->dbpedia.
- ``long``: 16 tasks - sentiment (SST-2, MR, CR share one label set; SST-5), review stars (Amazon, Yelp share
  one), subjectivity, question type (TREC), topic (AG News, DBpedia, Yahoo), medical abstracts, UNFAIR-ToS, CFPB
  complaints, two CLINC150 domains; 16 train / 20 test examples per class, one fixed order.

Systems, measured in the same run on the same samples:
- promptbank: one deep soft prompt + linear head (+ the library's default embedding probe) per task, routed by
  the learned router on MiniLM keys (no task id at test time); also reported with the task given (oracle), and,
  when the tasks have probes, with the probes removed (the prompted heads alone, same trained tensors).
- frozen embeddings + per-task logistic head (sklearn) with the same routing: a strong trivial baseline.
- one shared deep prompt trained sequentially (a new head per task; old heads kept): forgets.
- sequential full fine-tuning and sequential LoRA (PEFT, r=8 on query/value) of the encoder, a new head per task,
  old heads kept (learning rates from ``efficiency.py``'s dev sweep); by default on the first order of each seed
  only (``--ft-orders all`` for every order), as they cost as much as everything else together.
- multitask joint training of one shared prompt + per-task heads on all tasks at once: an upper bound.
Metrics (DESIGN.md): accuracy matrix R[i][j] (accuracy on task j after learning task i), ACC (mean of last row),
BWT (mean of R[T][j] - R[j][j]), forgetting (mean of max earlier minus last), FWT (mean over j >= 2 of R[j][j]
minus the accuracy of promptbank's prompt trained on task j alone: what having learned the earlier tasks adds or
costs when learning task j, against learning it alone on the frozen backbone; 0 for promptbank, whose tasks are
independent), ACC after each task, routing hit@1 at batch size 1 (also label-aware: a query sent to another task
with the same label set counts), the routing confusion matrix, routed accuracy (label-aware: a prediction counts
when its label is right) and the oracle-vs-routed gap, wall time per system.
Writes benchmarks/results/forgetting[_long].json, a PNG (R heatmaps, ACC vs number of tasks, routing confusion),
and prints a markdown table. Warm start is off for promptbank here (each task's prompt is independent of the
order), so its per-task prompts are trained once per seed and reused across orders; the sequential baselines are
retrained for every order, except that an order resumes from the state another order of the same seed reached
after the same first tasks (O2 starts where O1 was after dbpedia -> amazon; random states included, so the
numbers equal a fresh run's: tested). promptbank's oracle accuracies are memoised on the sha256 of each task's
prompt and head tensors (recorded as ``task_digests``): a bit-identical task is not evaluated again, any changed
one is; its routed evaluation likewise on the set of (task, digest) pairs (the same tasks route the same in any
order). ``--precision bf16`` trains every system in bf16 mixed precision (``TrainConfig.precision``); evaluation
stays fp32.
promptbank, full FT and LoRA keep the state with the best dev accuracy, ties broken by dev loss (the library's
``TrainConfig.select_on`` default on encoders; 10 % of each task's train examples held out); the shared prompt
and multitask train on every example and keep their last state.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_common import (  # noqa: E402
    default_data_dir,
    file_routing_keys_only,
    require_native_bf16,
    routing_discriminant,
    without_probes,
)

from promptbank.embed import ROUTING_EMBEDDER  # noqa: E402

ROUTING = "lda"  # set from --routing
PRECISION = "fp32"  # set from --precision: every system's training forwards (TrainConfig.precision)
PROBE_REFIT = True  # set from --no-probe-refit: promptbank's probe refitted on train + dev (TrainConfig.probe_refit)
OTHER = {"lda": "knn", "knn": "lda"}
RESULTS = ROOT / "benchmarks" / "results"
TEST_FRACTION = 0.2  # datasets without an official test split: a fixed 80/20 split (seed 0)
# name -> (folder, train-pool file, test file or None: fixed split of the pool, CLINC150 domain or None)
DATASETS = {
    "ag": ("ag_news", "train.jsonl", "test.jsonl", None),
    "amazon": ("amazon_reviews", "train.jsonl", "test.jsonl", None),
    "dbpedia": ("dbpedia", "train.jsonl", "test.jsonl", None),
    "yahoo": ("yahoo_answers", "train.jsonl", "test.jsonl", None),
    "sst2": ("sst2", "train.jsonl", "test.jsonl", None),
    "sst5": ("sst5", "train.jsonl", "test.jsonl", None),
    "mr": ("mr", "all.jsonl", None, None),
    "cr": ("cr", "all.jsonl", None, None),
    "subj": ("subj", "all.jsonl", None, None),
    "yelp": ("yelp_reviews", "train.jsonl", "dev.jsonl", None),  # no test split: its dev split is the test set
    "trec": ("trec", "train.jsonl", "test.jsonl", None),
    "medical": ("medical_abstracts", "test.jsonl", None, None),  # only the official test split exists
    "unfair_tos": ("unfair_tos", "all.jsonl", None, None),
    "cfpb": ("cfpb_complaints", "train.jsonl", "test.jsonl", None),
    "clinc_banking": ("clinc150", "train.jsonl", "test.jsonl", "banking"),
    "clinc_travel": ("clinc150", "train.jsonl", "test.jsonl", "travel"),
}
STREAMS = {
    "cl4": {
        "O1": ["dbpedia", "amazon", "yahoo", "ag"],
        "O2": ["dbpedia", "amazon", "ag", "yahoo"],
        "O3": ["yahoo", "amazon", "ag", "dbpedia"],
    },
    "long": {  # fixed before any run: related tasks spread out
        "L1": [
            "sst2", "ag", "trec", "amazon", "medical", "subj", "dbpedia", "cfpb",
            "mr", "yahoo", "unfair_tos", "sst5", "clinc_banking", "cr", "yelp", "clinc_travel",
        ],
    },
}  # fmt: skip
TASKS = {"ag": "ag_news", "amazon": "amazon_reviews", "dbpedia": "dbpedia", "yahoo": "yahoo_answers"}  # CL-4
ORDERS = STREAMS["cl4"]
# promptbank's learn_task options in every CL benchmark run (step_budget.py varies some of them on held-out data)
LEARN_OPTIONS = dict(
    method="deep", batch_size=16, eval_every=10, patience=4, warm_start=False, progress=False, max_input_tokens=128,
    keep_train_state=False,
)  # fmt: skip


def _dataset_rows(data_dir: Path, name: str) -> tuple[list[str], list[dict], list[dict]]:
    """-> (labels, train pool rows, test rows) of one stream task."""
    from bench_common import pool_and_test, read_labels, read_rows

    folder, pool_file, test_file, domain = DATASETS[name]
    if domain is not None:  # one CLINC150 domain: its 15 intents
        labels = sorted(json.loads((data_dir / folder / "labels.json").read_text())["domains"][domain])
        keep = set(labels)
        pool = [r for r in read_rows(data_dir / folder / pool_file) if r["label"] in keep]
        test = [r for r in read_rows(data_dir / folder / test_file) if r["label"] in keep]
        return labels, pool, test
    return (read_labels(data_dir / folder), *pool_and_test(data_dir / folder, pool_file, test_file, TEST_FRACTION))


def sample_names(stream: str) -> list[str]:
    """The tasks of every order of ``stream``, in the order the samples are drawn (one random generator per seed
    runs through them): always all of them, so a run of some orders (``--orders O2,O3``) draws the same samples
    as a run of all."""
    return list(dict.fromkeys(t for order in STREAMS[stream].values() for t in order))


def load_stream(data_dir: Path, train_per_class: int, test_per_class: int, seed: int, names=None):
    """``{task: {"train": TaskData, "test": TaskData}}`` with ``train_per_class`` / ``test_per_class`` examples of
    each label drawn at random (all of a label's rows when it has fewer). ``names`` defaults to CL-4."""
    from promptbank.tasks import TaskData, load_task_data

    rng = random.Random(seed)
    out = {}
    for short in names or list(TASKS):
        labels, pool, test = _dataset_rows(data_dir, short)
        parts = {}
        for split, rows_in, per_class in (("train", pool, train_per_class), ("test", test, test_per_class)):
            data = load_task_data(rows_in, labels=labels)
            by = {}
            for ex in data.examples:
                by.setdefault(ex.target, []).append(ex)
            rows = [ex for lab in labels if lab in by for ex in rng.sample(by[lab], min(per_class, len(by[lab])))]
            rng.shuffle(rows)
            parts[split] = TaskData(kind="classification", examples=rows, labels=labels, source=str(DATASETS[short][0]))
        out[short] = parts
    return out


def metrics(R: np.ndarray, single: Sequence[float] | None = None) -> dict:
    """ACC, BWT (GEM), forgetting (Chaudhry) and ACC after each task of an accuracy matrix R[i][j] (row i: after
    learning task i); with ``single`` (accuracy of a model trained on task j alone, per column) also FWT: the mean
    over j >= 2 of R[j][j] - single[j]."""
    t = R.shape[0]
    acc = float(R[-1].mean())
    bwt = float(np.mean([R[-1, j] - R[j, j] for j in range(t - 1)])) if t > 1 else 0.0
    forg = float(np.mean([R[j:-1, j].max() - R[-1, j] for j in range(t - 1)])) if t > 1 else 0.0
    out = {
        "ACC": acc,
        "BWT": bwt,
        "forgetting": forg,
        "ACC_after_each_task": [float(R[i, : i + 1].mean()) for i in range(t)],
    }
    if single is not None:
        out["FWT"] = float(np.mean([R[j, j] - single[j] for j in range(1, t)])) if t > 1 else 0.0
    return out


# ----------------------------------------------------------------------------------------------- systems
def run_promptbank(backbone, embedder, stream, order, steps, seed, trained_cache, eval_cache=None, routed_cache=None):
    """Learn tasks in order; after each, evaluate every task learned so far with the task given (oracle).

    ``eval_cache`` memoises oracle accuracies on the sha256 of the task's soft prompt and head tensors (the
    accuracy is a function of those, the frozen backbone and the test set): a task whose tensors are bit-identical
    to an evaluated one is not run again (later rows of R, other orders of the same seed); any change to a prompt
    or head changes the digest and is evaluated afresh. The digests go into the result. ``routed_cache`` memoises
    the routed evaluation (every test query one at a time through the router) on the set of (task, digest) pairs:
    a bank holding bit-identical tasks routes the same, in whatever order they were added (checked: every
    routing number agreed across the orders of each seed when each order was routed separately)."""
    eval_cache = {} if eval_cache is None else eval_cache
    routed_cache = {} if routed_cache is None else routed_cache
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
                max_steps=steps,
                seed=seed,
                precision=PRECISION,
                probe_refit=PROBE_REFIT,
                **LEARN_OPTIONS,
            )
            t = bank._tasks[name]
            trained_cache[key] = (t, time.perf_counter() - t0)
        else:
            t = trained_cache[key][0]
            bank._insert(_Task(t.record, t.prompt, t.keys, t.train_state, t.head, key_groups=t.key_groups))
        for j in range(i + 1):
            R[i, j] = _oracle_accuracy(bank, order[j], stream[order[j]]["test"], eval_cache)
    digests = {n: _task_digest(bank, n) for n in order}
    key = tuple(sorted(digests.items()))
    if key not in routed_cache:  # the same tasks route alike whatever order they were added in
        routed_cache[key] = _routed_eval(bank, stream, sorted(order), eval_cache)
    got = routed_cache[key]
    gold_task, preds, plain_preds = got["gold_task"], got["preds"], got["plain_preds"]
    cols = [*order, None]
    confusion = np.zeros((len(order), len(cols)), dtype=int)  # gold task x routed task ("no task" last)
    for (task, _), g in zip(preds, gold_task):
        confusion[order.index(g), cols.index(task)] += 1
    out = {
        "task_digests": digests,
        "routing_hit@1": got["hit"],
        "routing_hit@1_label_aware": got["hit_label_aware"],
        "routing_top1_ignoring_threshold": got["top1"],
        "routed_ACC": _routed_acc(preds, got["gold_label"], gold_task, order),
        "routing_confusion": confusion.tolist(),
        "routing_discriminant": got["discriminant"],
        **got["other_scorer"],
    }
    if plain_preds is not None:  # ablation on the same trained tasks: the prompted heads alone (same routing)
        out["ACC_head_only"] = float(np.mean([got["plain_oracle"][n] for n in order]))
        out["routed_ACC_head_only"] = _routed_acc(plain_preds, got["gold_label"], gold_task, order)
    return R, out, bank


def _routed_eval(bank, stream, names, eval_cache: dict) -> dict:
    """Every test query of the tasks ``names`` routed one at a time (no task id): per query the gold task and
    label and the (task, output) predicted, with and without the embedding probes, plus the order-free routing
    numbers."""
    texts, gold_task, gold_label = [], [], []
    for name in names:
        for ex in stream[name]["test"].examples:
            texts.append(ex.input)
            gold_task.append(name)
            gold_label.append(ex.target)
    preds = [(p.task, p.output) for p in bank.predict(texts, batch_size=64)]
    labels_of = {n: tuple(stream[n]["test"].labels) for n in names}
    ranked = bank.route_many(texts)
    got = {
        "gold_task": gold_task,
        "gold_label": gold_label,
        "preds": preds,
        "hit": float(np.mean([t == g for (t, _), g in zip(preds, gold_task)])),  # "no task" counts as a miss
        "hit_label_aware": float(
            np.mean([t is not None and labels_of[t] == labels_of[g] for (t, _), g in zip(preds, gold_task)])
        ),
        "top1": float(np.mean([bool(r.ranked) and r.ranked[0][0] == g for r, g in zip(ranked, gold_task)])),
        "discriminant": routing_discriminant(bank),
        "other_scorer": _other_scorer(bank, texts, gold_task),
        "plain_preds": None,
    }
    plain = without_probes(bank, names)
    if plain is not None:
        got["plain_oracle"] = {n: _oracle_accuracy(plain, n, stream[n]["test"], eval_cache) for n in names}
        got["plain_preds"] = [(p.task, p.output) for p in plain.predict(texts, batch_size=64)]
    return got


def _routed_acc(preds, gold_label, gold_task, order) -> float:
    """Mean over tasks of the share of each task's queries predicted right (routed elsewhere: wrong)."""
    return float(
        np.mean([np.mean([o == y for (_, o), y, g in zip(preds, gold_label, gold_task) if g == n]) for n in order])
    )


def _task_digest(bank, name: str) -> str:
    """sha256 over a task's serving soft prompt and head tensors (layer / key order fixed)."""
    import hashlib

    t = bank._tasks[name]
    h = hashlib.sha256()
    for part in (t.prompt, t.head or {}):
        for k in sorted(part):
            h.update(str(k).encode())
            h.update(part[k].detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _oracle_accuracy(bank, name: str, test, eval_cache: dict) -> float:
    key = (name, _task_digest(bank, name))
    if key not in eval_cache:
        eval_cache[key] = bank.evaluate(test, task=name, batch_size=64)["accuracy"]
    return eval_cache[key]


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


def fit_logistic(embedder, train, seed: int):
    """The baseline's head: logistic regression on the frozen embeddings of ``train``'s inputs."""
    from sklearn.linear_model import LogisticRegression

    X = embedder.encode([ex.input for ex in train.examples])
    return LogisticRegression(max_iter=2000, C=10.0, random_state=seed).fit(X, [ex.target for ex in train.examples])


def run_logistic(embedder, stream, order, seed, router):
    """Frozen MiniLM embeddings + one logistic-regression head per task; same router as promptbank."""
    heads = {name: fit_logistic(embedder, stream[name]["train"], seed) for name in order}
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

    from promptbank.config import DEFAULT_LR_ENCODER, Method, PromptConfig, TrainConfig
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
        {"params": list(prompt.parameters()), "lr": DEFAULT_LR_ENCODER[Method.DEEP]},  # as promptbank's tasks
        {"params": [p for n, h in heads.items() if n in data_by_task for p in h.parameters()], "lr": 1e-2},
    ]
    tconf = TrainConfig(max_steps=steps, batch_size=16, progress=False, seed=seed, precision=PRECISION)
    train_loop(model, modules, len(rows), batch_loss, None, tconf, param_groups=groups, fold=prompt.fold)
    return prompt, heads


@torch.no_grad()
def _eval_shared(backbone, prompt, head, data):
    from promptbank.encoder import encode_texts, pooled

    seqs = encode_texts(backbone.tokenizer, [ex.input for ex in data.examples], 128)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # batches of similar length: little padding
    p = prompt.fold()
    correct = 0
    for s in range(0, len(order), 64):
        rows = order[s : s + 64]
        feats = pooled(backbone.model, backbone.tokenizer, [seqs[i] for i in rows], [p] * len(rows))
        pred = head(feats).argmax(-1)
        correct += sum(data.labels[int(k)] == data.examples[i].target for k, i in zip(pred, rows))
    return correct / len(seqs)


def run_sequential_shared(backbone, stream, order, steps, seed, prefixes=None):
    """One shared deep prompt trained task after task (new head per task); ``prefixes``: see
    :func:`_resume_prefix`."""
    prefixes = {} if prefixes is None else prefixes
    R = np.full((len(order), len(order)), np.nan)
    state, start = _resume_prefix(prefixes, order, R)
    prompt, heads = state if state is not None else (None, None)
    for i in range(start, len(order)):
        prompt, heads = _train_shared(backbone, {order[i]: stream[order[i]]["train"]}, steps, seed, prompt, heads)
        for j in range(i + 1):
            R[i, j] = _eval_shared(backbone, prompt, heads[order[j]], stream[order[j]]["test"])
        _keep_prefix(prefixes, order, i, R, lambda p=prompt, h=heads: copy.deepcopy((p, h)))
    return R


def _resume_prefix(prefixes: dict, order, R: np.ndarray):
    """Sequential baselines: the state after the longest already-trained prefix of ``order`` and where to go on.

    ``prefixes`` maps an order prefix (a tuple of task names) to ``(state, R rows)`` kept by :func:`_keep_prefix`
    for the prefixes that another order of the run starts with too (CL-4's O1 and O2 share dbpedia -> amazon).
    Training a stage depends only on the state before it (seeds and random states are part of the state), so
    resuming gives the same numbers as training the prefix again. Fills ``R``'s rows of the prefix; returns
    ``(state or None, first stage to train)``."""
    for k in range(len(order) - 1, 0, -1):
        hit = prefixes.get(tuple(order[:k]))
        if hit is not None:
            state, rows = hit
            R[:k, :k] = rows
            return copy.deepcopy(state), k
    return None, 0


def _keep_prefix(prefixes: dict, order, i: int, R: np.ndarray, snapshot) -> None:
    """After stage ``i``: keep ``snapshot()`` and R's rows so far if ``prefixes`` wants this prefix (its
    ``"wanted"`` entry: the prefixes shared by several orders of the run)."""
    key = tuple(order[: i + 1])
    if key in prefixes.get("wanted", ()):
        prefixes[key] = (snapshot(), R[: i + 1, : i + 1].copy())


def shared_prefixes(orders) -> set[tuple[str, ...]]:
    """The proper prefixes (1 .. T-1 tasks) that more than one of ``orders`` starts with."""
    import collections

    seen = collections.Counter(tuple(o[:k]) for o in orders for k in range(1, len(o)))
    return {p for p, c in seen.items() if c > 1}


def run_multitask(backbone, stream, order, steps, seed):
    prompt, heads = _train_shared(
        backbone, {n: stream[n]["train"] for n in order}, steps * len(order), seed, multitask=True
    )
    return {n: _eval_shared(backbone, prompt, heads[n], stream[n]["test"]) for n in order}


def _rows(data) -> list[dict]:
    return [{"text": ex.input, "label": ex.target} for ex in data.examples]


def run_sequential_encoder(backbone, stream, order, steps, seed, kind: str, prefixes=None) -> np.ndarray:
    """Sequential fine-tuning of one copy of the encoder (``kind="full_ft"``: every weight; ``"lora"``: one PEFT
    LoRA adapter, r=8 on query/value) task after task, a new zero-initialised head per task and old heads kept (so
    forgetting is the shared weights drifting). Same loop, schedule, batch, model selection (dev accuracy, then loss; 10 % of the
    task's train examples held out, as ``learn_task`` does) as promptbank; learning rates from efficiency.py's
    SST-2 dev sweep. ``prefixes``: see :func:`_resume_prefix`."""
    import efficiency

    from promptbank.config import TrainConfig
    from promptbank.tasks import split_dev

    prefixes = {} if prefixes is None else prefixes
    torch.manual_seed(seed)
    enc = efficiency.full_ft_encoder(backbone.model) if kind == "full_ft" else efficiency.lora_encoder(backbone.model)
    R = np.full((len(order), len(order)), np.nan)
    state, start = _resume_prefix(prefixes, order, R)
    heads = {}
    if state is not None:  # dropout draws from torch's generator: its state is part of the stage's state
        weights, heads, rng = state
        enc.load_state_dict(weights)
        torch.set_rng_state(rng)
    for i in range(start, len(order)):
        name = order[i]
        data = stream[name]["train"]
        train, dev = split_dev(data, 0.1, seed=seed)
        tconf = TrainConfig(
            max_steps=steps, batch_size=16, eval_every=10, patience=4, seed=seed, progress=False, max_input_tokens=128,
            precision=PRECISION,
        )  # fmt: skip
        enc.train()
        heads[name], _ = efficiency.train_encoder_classifier(
            enc, backbone.tokenizer, _rows(train), _rows(dev), data.labels, tconf, lr=efficiency.LR[kind], desc=kind
        )
        for j in range(i + 1):
            t = stream[order[j]]["test"]
            R[i, j] = efficiency.encoder_accuracy(enc, backbone.tokenizer, heads[order[j]], _rows(t), t.labels, 128)
        _keep_prefix(prefixes, order, i, R, lambda: copy.deepcopy((enc.state_dict(), heads, torch.get_rng_state())))
    return R


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
    for seed in range(args.first_seed, args.first_seed + args.seeds):
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
SYSTEMS = ["promptbank", "logistic", "shared", "full_ft", "lora", "multitask"]
SYSTEM_LABEL = {
    "promptbank": "promptbank",
    "logistic": "frozen emb + logistic head",
    "shared": "sequential shared prompt",
    "full_ft": "sequential full fine-tuning",
    "lora": "sequential LoRA",
    "multitask": "multitask (upper bound)",
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=default_data_dir())
    ap.add_argument("--stream", default="cl4", choices=list(STREAMS))
    ap.add_argument("--quick", action="store_true", help="1 order, 1 seed, 4/class train, 5/class test, 10 steps")
    ap.add_argument("--seeds", type=int, default=None, help="default: 3 (cl4), 1 (long)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="combine the runs of these result files (e.g. one seed each, run in parallel) into --out")  # fmt: skip
    ap.add_argument("--orders", default=None, help="default: every order of the stream")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per task (batch 16); 60 (cl4), 40 (long)")
    ap.add_argument("--train-per-class", type=int, default=16)
    ap.add_argument("--test-per-class", type=int, default=None, help="default: 50 (cl4), 20 (long)")
    ap.add_argument("--systems", default=None, help=f"comma list of {','.join(SYSTEMS)} (default: all for cl4; "
                    "long: all but full_ft, lora)")  # fmt: skip
    ap.add_argument("--ft-orders", default="first", choices=["first", "all"], help="orders for full_ft and lora")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--embedder", default=ROUTING_EMBEDDER, help="routing embedder (default: MiniLM + middle layer)")
    ap.add_argument("--routing", default="lda", choices=["lda", "knn"], help="routing scorer of the bank")
    ap.add_argument("--routing-only", action="store_true", help="no training: routing of both scorers / embedders")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument(
        "--no-probe-refit",
        action="store_true",
        help="promptbank's embedding probe fitted on the training part only (TrainConfig.probe_refit=False)",
    )
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="every system's training forwards: fp32, or bf16 mixed precision (TrainConfig.precision)",
    )
    args = ap.parse_args(argv)
    long = args.stream == "long"
    args.seeds = args.seeds if args.seeds is not None else (1 if long else 3)
    args.orders = args.orders or ",".join(STREAMS[args.stream])
    args.steps = args.steps if args.steps is not None else (40 if long else 60)
    args.test_per_class = args.test_per_class if args.test_per_class is not None else (20 if long else 50)
    args.systems = args.systems or ",".join(s for s in SYSTEMS if not (long and s in ("full_ft", "lora")))
    if args.quick:
        args.seeds, args.orders, args.steps, args.train_per_class, args.test_per_class = (
            1,
            args.orders.split(",")[0],
            10,
            4,
            5,
        )
    suffix = ("_long" if long else "") + ("_quick" if args.quick else "")
    args.out = args.out or RESULTS / f"forgetting{suffix}.json"
    if args.merge:
        result = merge(args.merge, args.out)
        print_table(result)
        return result
    require_native_bf16(args.precision)
    unknown = set(args.systems.split(",")) - set(SYSTEMS)
    if unknown:
        sys.exit(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    names = list(dict.fromkeys(t for o in args.orders.split(",") for t in STREAMS[args.stream][o]))
    missing = [DATASETS[n][0] for n in names if not (args.data / DATASETS[n][0]).is_dir()]
    if missing:
        sys.exit(
            f"no data under {args.data} (missing {', '.join(sorted(set(missing)))}/); pass --data or set PROMPTBANK_DATA"
        )
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    from promptbank.backbone import load_backbone
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
    result = run(args, backbone, load_embedder(args.embedder), t_start=t_start)
    print_table(result)
    return result


def run(args, backbone, embedder, *, t_start: float | None = None) -> dict:
    """Every requested system on every (seed, order) of ``args.stream``; writes ``args.out`` (+ .png)."""
    global ROUTING, PRECISION, PROBE_REFIT
    ROUTING, PRECISION = args.routing, args.precision
    PROBE_REFIT = not getattr(args, "no_probe_refit", False)
    t_start = time.perf_counter() if t_start is None else t_start
    embedder = _Memo(embedder)  # each text embedded once per run (keys, routing, the logistic baseline)
    systems = args.systems.split(",")
    orders = args.orders.split(",")
    names = sample_names(args.stream)
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        stream = load_stream(args.data, args.train_per_class, args.test_per_class, seed, names)
        trained, evals, routed_evals = {}, {}, {}  # per seed: trained tasks, oracle and routed evaluations by digest
        lists = [STREAMS[args.stream][o] for o in orders]
        ft_lists = lists if args.ft_orders == "all" else lists[:1]
        prefixes = {  # per seed and sequential system: states after order prefixes another order shares
            "shared": {"wanted": shared_prefixes(lists)},
            **{kind: {"wanted": shared_prefixes(ft_lists)} for kind in ("full_ft", "lora")},
        }
        mt = None
        for k, oname in enumerate(orders):
            order = STREAMS[args.stream][oname]
            run_ = {"seed": seed, "order": oname, "tasks": order}
            t0 = time.perf_counter()
            R, routed, bank = run_promptbank(
                backbone, embedder, stream, order, args.steps, seed, trained, evals, routed_evals
            )
            single = [float(R[j, j]) for j in range(len(order))]  # each prompt is trained on its task alone
            run_["promptbank"] = {
                "R": R.tolist(),
                **metrics(R, single),
                **routed,
                "seconds": time.perf_counter() - t0,
                "train_seconds": {n: trained[(n, seed)][1] for n in order},
            }
            run_["promptbank"]["oracle_routed_gap"] = run_["promptbank"]["ACC"] - run_["promptbank"]["routed_ACC"]
            if "logistic" in systems:
                t0 = time.perf_counter()
                router = lambda texts, bank=bank: [r.task for r in bank.route_many(texts)]  # noqa: E731
                run_["logistic_head"] = {
                    **run_logistic(embedder, stream, order, seed, router),
                    "seconds": time.perf_counter() - t0,
                }
            if "shared" in systems:
                t0 = time.perf_counter()
                R_seq = run_sequential_shared(backbone, stream, order, args.steps, seed, prefixes["shared"])
                run_["sequential_shared_prompt"] = {
                    "R": R_seq.tolist(),
                    **metrics(R_seq, single),
                    "seconds": time.perf_counter() - t0,
                }
            for kind, key in (("full_ft", "sequential_full_ft"), ("lora", "sequential_lora")):
                if kind in systems and (args.ft_orders == "all" or k == 0):
                    t0 = time.perf_counter()
                    R_enc = run_sequential_encoder(backbone, stream, order, args.steps, seed, kind, prefixes[kind])
                    run_[key] = {"R": R_enc.tolist(), **metrics(R_enc, single), "seconds": time.perf_counter() - t0}
            if "multitask" in systems:
                if mt is None:  # order-independent: once per seed
                    t0 = time.perf_counter()
                    mt = (run_multitask(backbone, stream, order, args.steps, seed), time.perf_counter() - t0)
                run_["multitask"] = {"per_task": mt[0], "ACC": float(np.mean(list(mt[0].values()))), "seconds": mt[1]}
            runs.append(run_)
            pb = run_["promptbank"]
            line = (
                f"seed {seed} {oname}: promptbank ACC {pb['ACC']:.3f} (routed {pb['routed_ACC']:.3f}, hit@1 "
                f"{pb['routing_hit@1']:.3f}, BWT {pb['BWT']:+.3f})"
            )
            for key in RUN_KEYS[1:]:
                if key in run_:
                    line += f"; {key} ACC {run_[key]['ACC']:.3f}" + (
                        f" BWT {run_[key]['BWT']:+.3f}" if "BWT" in run_[key] else ""
                    )
            print(line, flush=True)

    import transformers

    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "stream": {o: STREAMS[args.stream][o] for o in orders},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "wall_seconds": time.perf_counter() - t_start,
        "summary": summarize(runs, args.routing),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(runs, args.out.with_suffix(".png"), args.stream)
    return result


def merge(files: list[Path], out: Path) -> dict:
    """One result from several result files of the same stream and settings (seeds or orders run in separate
    processes): runs concatenated, summary recomputed, wall time the sum over files (the sum of processes'
    wall times, not elapsed time when they ran side by side). Writes ``out`` (+ .png)."""
    parts = [json.loads(Path(f).read_text()) for f in files]
    first = parts[0]
    ignore = {"seeds", "first_seed", "out", "merge", "orders", "ft_orders", "threads"}
    for f, p in zip(files, parts):
        diff = {k for k in set(first["config"]) | set(p["config"]) if k not in ignore}
        diff = {k for k in diff if first["config"].get(k) != p["config"].get(k)}
        if diff:
            sys.exit(f"{f}: settings differ from {files[0]} in {sorted(diff)}; not merged")
    runs = [r for p in parts for r in p["runs"]]
    seen = [(r["seed"], r["order"]) for r in runs]
    if len(set(seen)) != len(seen):
        sys.exit(f"the files repeat (seed, order) runs: {sorted(x for x in set(seen) if seen.count(x) > 1)}")
    config = dict(first["config"])
    config.update(
        seeds=len({r["seed"] for r in runs}),
        orders=",".join(dict.fromkeys(r["order"] for r in runs)),
        merged_from=[str(f) for f in files],
        out=str(out),
    )
    result = {
        "config": config,
        "stream": {o: s for p in parts for o, s in p["stream"].items()},
        "versions": first["versions"],
        "wall_seconds": sum(p["wall_seconds"] for p in parts),
        "wall_seconds_per_file": [p["wall_seconds"] for p in parts],
        "summary": summarize(runs, config.get("routing", "lda")),
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(runs, out.with_suffix(".png"), config.get("stream", "cl4"))
    return result


RUN_KEYS = [
    "promptbank",
    "logistic_head",
    "sequential_shared_prompt",
    "sequential_full_ft",
    "sequential_lora",
    "multitask",
]


def _mean_std(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.pstdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: list[dict], routing: str) -> dict:
    """Mean (population std) over runs of every metric, by system. A system absent from some runs (sequential
    full FT / LoRA on the first order only) is averaged over the runs that have it (``runs`` says how many)."""

    def agg(key: str, metric: str):
        vals = [r[key][metric] for r in runs if key in r and metric in r[key]]
        return _mean_std(vals) if vals else None

    other = OTHER[routing]
    out = {
        "promptbank (task given)": {m: agg("promptbank", m) for m in ("ACC", "BWT", "forgetting", "FWT")},
        "promptbank (routed)": {
            "ACC": agg("promptbank", "routed_ACC"),
            "hit@1": agg("promptbank", "routing_hit@1"),
            "hit@1 label-aware": agg("promptbank", "routing_hit@1_label_aware"),
            "oracle-routed gap": agg("promptbank", "oracle_routed_gap"),
        },
        f"routing top-1, no threshold ({routing})": {"hit@1": agg("promptbank", "routing_top1_ignoring_threshold")},
        "promptbank, prompted head alone (no embedding probe; task given)": {"ACC": agg("promptbank", "ACC_head_only")},
        "promptbank, prompted head alone (routed)": {"ACC": agg("promptbank", "routed_ACC_head_only")},
        f"routing hit@1, other scorer ({other})": {"hit@1": agg("promptbank", f"routing_hit@1_{other}")},
        f"routing top-1, other scorer ({other})": {"hit@1": agg("promptbank", f"routing_top1_{other}")},
    }
    if any("logistic_head" in r for r in runs):
        out["frozen emb + logistic head (task given)"] = {"ACC": agg("logistic_head", "ACC")}
        out["frozen emb + logistic head (routed)"] = {"ACC": agg("logistic_head", "routed_ACC")}
    for key, label in (
        ("sequential_shared_prompt", "sequential shared prompt"),
        ("sequential_full_ft", "sequential full fine-tuning"),
        ("sequential_lora", "sequential LoRA (r=8)"),
    ):
        if any(key in r for r in runs):
            out[label] = {m: agg(key, m) for m in ("ACC", "BWT", "forgetting", "FWT")}
            out[label]["runs"] = sum(key in r for r in runs)
    if any("multitask" in r for r in runs):
        out["multitask (upper bound)"] = {"ACC": agg("multitask", "ACC")}
    seconds = {key: agg(key, "seconds") for key in RUN_KEYS if any(key in r for r in runs)}
    out["seconds per run"] = {k: v for k, v in seconds.items() if v is not None}
    return out


def print_table(result: dict) -> None:
    cfg = result["config"]
    print(
        f"\n{cfg['stream']} ({cfg['train_per_class']}/class train, {cfg['test_per_class']}/class test), orders "
        f"{cfg['orders']}, {cfg['seeds']} seed(s), {cfg['steps']} steps/task; mean (std) over runs; wall "
        f"{result['wall_seconds'] / 60:.1f} min\n"
    )
    print("| system | ACC | BWT | forgetting | FWT | routing hit@1 | hit@1 label-aware |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, m in result["summary"].items():
        if name == "seconds per run":
            continue
        cells = [
            f"{100 * m[k][0]:.1f} ({100 * m[k][1]:.1f})" if m.get(k) is not None else ""
            for k in ("ACC", "BWT", "forgetting", "FWT", "hit@1", "hit@1 label-aware")
        ]
        if not any(cells):  # a metric these runs do not have (the probe ablation of runs without probes)
            continue
        runs = f" [{m['runs']} runs]" if "runs" in m else ""
        print(f"| {name}{runs} | " + " | ".join(cells) + " |")
    print(
        "\nseconds per (seed, order) run: "
        + ", ".join(f"{k} {v[0]:.0f}" for k, v in result["summary"]["seconds per run"].items())
    )


def _plot(runs: list[dict], path: Path, stream: str) -> None:
    """R heatmaps (promptbank, sequential baselines) of the first run, ACC after each task (mean over runs of the
    first order), routing confusion of the first run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    run = runs[0]
    keys = [k for k in ("promptbank", "sequential_shared_prompt", "sequential_full_ft", "sequential_lora") if k in run]
    n = len(run["tasks"])
    size = 3.2 if n <= 6 else 5.5
    fig, axes = plt.subplots(1, len(keys) + 2, figsize=(size * (len(keys) + 2), size))
    for ax, key in zip(axes, keys):
        R = np.array(run[key]["R"], dtype=float)
        ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(n), run["tasks"], rotation=90, fontsize=7)
        ax.set_yticks(range(n), [f"after {t}" for t in run["tasks"]], fontsize=7)
        if n <= 6:
            for i in range(n):
                for j in range(n):
                    if not np.isnan(R[i, j]):
                        ax.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w", fontsize=7)
        ax.set_title(key.replace("_", " "), fontsize=9)
    ax = axes[len(keys)]
    first = [r for r in runs if r["order"] == run["order"]]
    for key in keys:
        curves = np.array([r[key]["ACC_after_each_task"] for r in first if key in r])
        ax.plot(range(1, n + 1), 100 * curves.mean(0), marker="o", label=key.replace("_", " "))
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("ACC so far (%)")
    ax.legend(fontsize=7)
    ax.set_title(f"ACC vs tasks, order {run['order']}", fontsize=9)
    ax = axes[-1]
    C = np.array(run["promptbank"]["routing_confusion"], dtype=float)
    ax.imshow(C / np.maximum(C.sum(1, keepdims=True), 1), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(n + 1), [*run["tasks"], "none"], rotation=90, fontsize=7)
    ax.set_yticks(range(n), run["tasks"], fontsize=7)
    ax.set_title("routing (rows: gold task)", fontsize=9)
    fig.suptitle(f"{stream}: seed {run['seed']}, order {run['order']}")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()

"""RAG on XQuAD-en with the real default models: base model vs tuned soft prompts, retrieval and answers.

    python benchmarks/rag.py --train --bank banks/rag   # train the two soft prompts (if not in the bank), benchmark
    python benchmarks/rag.py --bank banks/rag           # benchmark a trained bank
    python benchmarks/rag.py --quick                    # smoke run: a few training steps and questions (minutes)

Data: XQuAD-en (``--data``, default ../shared/data), split by article (:func:`langchain_promptbank.xquad.
split_by_article`: 29 train / 5 dev / 14 test articles). Soft prompts are trained on train articles only; every
choice (the answer prompt's method, the rewrite weight) is made on dev; numbers are on the test questions.

- Retrieval corpus: all 240 paragraphs, :class:`FaissRetriever` with all-MiniLM-L6-v2 (``PromptBankEmbeddings()``).
  Recall@1/@5 of the gold paragraph with the question as query, with the query-understanding rewrite alone
  (``query_mode="replace"``), question and rewrite as one text (``"append"``), and fused
  (``"fuse"``: cos(question, doc) + w * cos(rewrite, doc), w chosen on dev from a grid that includes 0).
- Answers: SQuAD EM/F1 (normalised, max over the reference answers) of the first line of the output, for the
  plain backbone with the chain's instruction (system prompt, chat template) and for the answer-synthesis soft
  prompt; given the gold paragraph (reader only) and end to end with the retrieved top-k paragraphs.
- Latency: median ms per question at batch size 1 on a fixed subset of the test questions, through the same
  calls the LCEL chain makes (``chain.invoke`` for the end-to-end rows); the chain's answers are compared with
  the benchmark's batched answers (``chain_agreement``).

Metric runs are batched (``--batch-size``) and answers are cached by exact input: an end-to-end question whose
retrieved passages equal the gold one reuses the reader-only answer for the same input. Greedy decoding.
Writes benchmarks/results/rag.json (+ rag.png), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
DEFAULT_BANK = ROOT / "banks" / "rag"

RETRIEVAL_MODES = ("question", "rewrite", "append", "fuse")
RETRIEVAL_LABELS = {
    "question": "question only (no query understanding)",
    "rewrite": "rewrite only (`replace`)",
    "append": "question + rewrite as one text (`append`)",
    "fuse": "question and rewrite fused (`fuse`, w on dev)",
}


@dataclass
class Config:
    k: int = 1  # passages given to the answer step end to end
    recall_ks: tuple[int, ...] = (1, 5)
    n_test: int | None = None  # None: all test questions
    n_dev: int | None = None  # None: all dev questions (rewrite weight, method choice)
    n_latency: int = 16
    batch_size: int = 8
    max_tokens: int = 32  # new tokens for answers and rewrites (PTunedLLM.max_tokens, as in the chain)
    weight_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
    answer_task: str = "answer_synthesis"
    rewrite_task: str = "query_rewrite"
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _chunks(items: Sequence, size: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    with tqdm(total=len(items), desc=desc, unit="q", disable=not progress or not items, leave=False) as bar:
        for s in range(0, len(items), size):
            chunk = items[s : s + size]
            yield chunk
            bar.update(len(chunk))


# --------------------------------------------------------------------------------------------------
# core (model-agnostic; tests run these on a tiny model)
# --------------------------------------------------------------------------------------------------


def scores(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """SQuAD EM and F1 (percent) of the first line of each prediction, max over each question's gold answers."""
    from langchain_promptbank.xquad import exact_match, f1_score, first_line

    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions for {len(golds)} questions")
    preds = [first_line(p) for p in predictions]
    n = len(preds)
    return {
        "em": 100 * sum(exact_match(p, g) for p, g in zip(preds, golds)) / max(n, 1),
        "f1": 100 * sum(f1_score(p, g) for p, g in zip(preds, golds)) / max(n, 1),
        "n": n,
    }


def rewrite(llm, questions: Sequence[str], task: str, cfg: Config) -> list[str]:
    """The query-understanding rewrite of each question (batched generation through :class:`PTunedLLM`)."""
    out: list[str] = []
    for chunk in _chunks(list(questions), max(cfg.batch_size, 16), f"rewrite ({task})", cfg.progress):
        msgs = llm.batch(list(chunk), task=task, max_tokens=cfg.max_tokens)
        out += [m.content.strip() for m in msgs]
    return out


def rankings(retriever, vectors, depth: int) -> list[list[int]]:
    """Paragraph ids (``metadata["pid"]``) of the ``depth`` best documents for each query vector."""
    return [[d.metadata["pid"] for d in retriever.search_by_vector(v, k=depth)] for v in vectors]


def mode_vectors(embed: Callable, questions: Sequence[str], rewrites: Sequence[str], mode: str, weight: float):
    """Query vectors of each retrieval mode (what ``build_rag_chain(query_mode=...)`` searches with)."""
    from langchain_promptbank.retrievers import fuse_vectors

    if mode == "question":
        return embed(list(questions))
    if mode == "rewrite":
        return embed([r or q for q, r in zip(questions, rewrites)])
    if mode == "append":
        return embed([f"{q}\n{r}" if r else q for q, r in zip(questions, rewrites)])
    if mode == "fuse":
        qv, rv = embed(list(questions)), embed([r or q for q, r in zip(questions, rewrites)])
        return [fuse_vectors([a, b], [1.0, weight]) for a, b in zip(qv, rv)]
    raise ValueError(f"unknown retrieval mode {mode!r}")


def choose_weight(retriever, embed, questions, rewrites, gold: Sequence[int], grid: Sequence[float], ks) -> dict:
    """The rewrite weight of ``fuse`` with the best dev recall@1 (then recall@k of the larger ks; ties: smaller
    weight). The grid includes 0 (the question alone), so on dev fusing never lowers recall@1."""
    from langchain_promptbank.retrievers import fuse_vectors
    from langchain_promptbank.xquad import recall_at_k

    if 0.0 not in grid:
        raise ValueError("the weight grid must include 0 (the question alone)")
    qv, rv = embed(list(questions)), embed([r or q for q, r in zip(questions, rewrites)])
    table = []
    for w in sorted(grid):
        ranked = rankings(retriever, [fuse_vectors([a, b], [1.0, w]) for a, b in zip(qv, rv)], max(ks))
        table.append({"weight": w, **{f"recall@{k}": 100 * recall_at_k(ranked, gold, k) for k in ks}})
    best = max(table, key=lambda r: (*(r[f"recall@{k}"] for k in sorted(ks)), -r["weight"]))
    return {"weight": best["weight"], "grid": table}


class AnswerCache:
    """Answers by exact model input (task, messages): identical inputs are generated once."""

    def __init__(self) -> None:
        self.table: dict[tuple, str] = {}
        self.generated = 0
        self.seconds = 0.0

    def answers(self, llm, items: Sequence[tuple[str, list[str]]], task: str | None, cfg: Config, desc: str):
        """Answer each ``(question, passages)`` as the chain does (:func:`answer_messages`), batched."""
        from langchain_promptbank import answer_messages

        msgs = [answer_messages(q, ps, answer_task=task) for q, ps in items]
        keys = [(task, tuple(m.content for m in ms)) for ms in msgs]
        todo = sorted(
            {k: i for i, k in enumerate(keys) if k not in self.table}.items(), key=lambda kv: len(kv[0][1][-1])
        )
        t = time.perf_counter()
        for chunk in _chunks(todo, cfg.batch_size, desc, cfg.progress):
            out = llm.batch([msgs[i] for _, i in chunk], task=task, max_tokens=cfg.max_tokens)
            for (key, _), m in zip(chunk, out):
                self.table[key] = m.content
        self.seconds += time.perf_counter() - t
        self.generated += len(todo)
        return [self.table[k] for k in keys]


def _median_ms(fn: Callable[[Any], Any], items: Sequence) -> tuple[float, list[Any]]:
    times, outs = [], []
    for x in items:
        t = time.perf_counter()
        outs.append(fn(x))
        times.append(1000 * (time.perf_counter() - t))
    return (statistics.median(times) if times else float("nan")), outs


def run_benchmark(bank, rows: Sequence[dict], cfg: Config, embeddings=None) -> dict:
    """Retrieval recall, answer EM/F1 and latency on the test articles of ``rows`` (XQuAD rows), with ``bank``
    holding ``cfg.answer_task`` and ``cfg.rewrite_task``. The retrieval corpus is every paragraph of ``rows``,
    embedded with ``embeddings`` (default ``PromptBankEmbeddings()``: all-MiniLM-L6-v2's sentence embedding,
    not the bank's routing embedder)."""
    from langchain_core.documents import Document

    from langchain_promptbank import FaissRetriever, PromptBankEmbeddings, PTunedLLM, build_rag_chain
    from langchain_promptbank.xquad import paragraphs, recall_at_k, sample_rows, split_by_article

    for task in (cfg.answer_task, cfg.rewrite_task):
        if task not in bank.tasks:
            raise ValueError(f"the bank has no task {task!r} (tasks: {', '.join(bank.tasks) or 'none'}); train first")
    t_start = time.perf_counter()
    split = split_by_article(rows)
    test, dev = sample_rows(split["test"], cfg.n_test), sample_rows(split["dev"], cfg.n_dev)
    corpus = paragraphs(rows)
    pid = {c: i for i, c in enumerate(corpus)}
    emb = embeddings if embeddings is not None else PromptBankEmbeddings()
    retriever = FaissRetriever(
        documents=[Document(c, metadata={"pid": i}) for i, c in enumerate(corpus)], embeddings=emb, k=cfg.k
    )
    llm = PTunedLLM(bank=bank, max_tokens=cfg.max_tokens)
    depth = max(max(cfg.recall_ks), cfg.k)
    result: dict[str, Any] = {
        "n": {"corpus_paragraphs": len(corpus), "test_questions": len(test), "dev_questions": len(dev)},
        "retrieval_embedder": emb.embedder.name,
        "split": {s: sorted({r["title"] for r in split[s]}) for s in ("train", "dev", "test")},
    }

    # ---- query understanding: dev picks the fusion weight, test measures
    _log(f"rewriting {len(dev)} dev + {len(test)} test questions")
    t = time.perf_counter()
    dev_rw = rewrite(llm, [r["question"] for r in dev], cfg.rewrite_task, cfg)
    test_rw = rewrite(llm, [r["question"] for r in test], cfg.rewrite_task, cfg)
    rewrite_s = time.perf_counter() - t
    choice = choose_weight(
        retriever,
        emb.embed_documents,
        [r["question"] for r in dev],
        dev_rw,
        [pid[r["context"]] for r in dev],
        cfg.weight_grid,
        cfg.recall_ks,
    )
    weight = choice["weight"]
    _log(f"rewrite weight chosen on dev: {weight}")
    gold = [pid[r["context"]] for r in test]
    ranked = {
        m: rankings(
            retriever, mode_vectors(emb.embed_documents, [r["question"] for r in test], test_rw, m, weight), depth
        )
        for m in RETRIEVAL_MODES
    }
    result["retrieval"] = {
        m: {f"recall@{k}": 100 * recall_at_k(ranked[m], gold, k) for k in cfg.recall_ks} for m in RETRIEVAL_MODES
    }
    result["rewrite_weight"] = choice
    result["rewrite_examples"] = [
        {"question": r["question"], "rewrite": w, "gold_paragraph_rank1": ranked["fuse"][i][0] == gold[i]}
        for i, (r, w) in enumerate(zip(test[:5], test_rw[:5]))
    ]
    result["rewrite_seconds_per_question_batched"] = rewrite_s / max(len(dev) + len(test), 1)

    # ---- answers
    golds = [r["answers"] for r in test]
    cache = AnswerCache()
    answers: dict[str, list[str]] = {}
    configs = {  # name: (answer task, retrieval mode or None for the gold paragraph)
        "base_gold": (None, None),
        "tuned_gold": (cfg.answer_task, None),
        "base_e2e": (None, "question"),
        "tuned_e2e": (cfg.answer_task, "question"),
        "base_qu_e2e": (None, "fuse"),
        "tuned_qu_e2e": (cfg.answer_task, "fuse"),
    }
    for name, (task, mode) in configs.items():
        items = [
            (r["question"], [r["context"]] if mode is None else [corpus[p] for p in ranked[mode][i][: cfg.k]])
            for i, r in enumerate(test)
        ]
        before = cache.generated
        answers[name] = cache.answers(llm, items, task, cfg, f"answer {name}")
        _log(f"{name}: {cache.generated - before} answers generated")
    result["answers"] = {name: scores(answers[name], golds) for name in configs}
    result["answer_generation"] = {
        "generated": cache.generated,
        "seconds": cache.seconds,
        "seconds_per_generated_answer_batched": cache.seconds / max(cache.generated, 1),
    }
    result["answer_examples"] = [
        {"question": r["question"], "gold": r["answers"], **{n: answers[n][i] for n in ("base_gold", "tuned_gold")}}
        for i, r in enumerate(test[:8])
    ]

    # ---- latency at batch size 1 through the chain's calls
    lat_rows = test[: cfg.n_latency]
    _log(f"latency on {len(lat_rows)} questions")
    latency: dict[str, float] = {}
    qs = [r["question"] for r in lat_rows]
    latency["retrieval_question"], _ = _median_ms(lambda q: retriever.invoke(q, k=depth), qs)
    rw_ms, lat_rw = _median_ms(lambda q: llm.invoke(q, task=cfg.rewrite_task, max_tokens=cfg.max_tokens), qs)
    lat_rw = [m.content.strip() for m in lat_rw]
    searches = {
        "rewrite": lambda x: retriever.invoke(x[1] or x[0], k=depth),
        "append": lambda x: retriever.invoke(f"{x[0]}\n{x[1]}" if x[1] else x[0], k=depth),
        "fuse": lambda x: retriever.search_fused([x[0], x[1] or x[0]], [1.0, weight], k=depth),
    }
    for m, fn in searches.items():
        latency[f"retrieval_{m}"] = rw_ms + _median_ms(fn, list(zip(qs, lat_rw)))[0]
    latency["rewrite_generation"] = rw_ms
    from langchain_promptbank import answer_messages

    for name, task in (("base_gold", None), ("tuned_gold", cfg.answer_task)):
        latency[name], _ = _median_ms(
            lambda r, task=task: llm.invoke(
                answer_messages(r["question"], [r["context"]], answer_task=task), task=task
            ),
            lat_rows,
        )
    agree, total = 0, 0
    for name, (task, mode) in configs.items():
        if mode is None:
            continue
        chain = build_rag_chain(
            llm,
            retriever,
            rewrite_task=cfg.rewrite_task if mode == "fuse" else None,
            answer_task=task,
            k=cfg.k,
            query_mode="fuse",
            rewrite_weight=weight,
        )
        latency[name], outs = _median_ms(chain.invoke, qs)
        for i, out in enumerate(outs):
            total += 1
            agree += out["answer"] == answers[name][i]
    result["latency_ms"] = latency
    result["chain_agreement"] = {"same_answer": agree, "of": total}
    result["seconds"] = time.perf_counter() - t_start
    return result


# --------------------------------------------------------------------------------------------------
# training (model selection on dev)
# --------------------------------------------------------------------------------------------------


def train(
    backbone, embedder, rows: Sequence[dict], cfg: Config, methods: Sequence[str], options: dict, bank_dir: Path
) -> tuple:
    """Train one answer prompt per method (own bank each), keep the one with the best dev F1, then learn the
    rewrite prompt in that bank. Returns ``(bank, report)``.

    Each candidate is saved to ``<bank_dir>.candidates/<method>`` as soon as it is trained (and reused from
    there by a later run), and the winner to ``bank_dir`` before the rewrite prompt is trained, so a crash loses
    at most the prompt being trained."""
    from langchain_promptbank import PTunedLLM
    from langchain_promptbank.xquad import learn_rag_task, sample_rows, split_by_article
    from promptbank import PromptBank

    split = split_by_article(rows)
    train_rows = split["train"][: options.get("max_train")] if options.get("max_train") else split["train"]
    dev_loss_rows = sample_rows(split["dev"], options.get("dev_size", 32))
    dev_eval = sample_rows(split["dev"], cfg.n_dev)
    answer_opts = options.get("answer", {})
    report: dict[str, Any] = {
        "train_questions": len(train_rows),
        "dev_questions_loss": len(dev_loss_rows),
        "dev_questions_eval": len(dev_eval),
        "candidates": {},
    }
    best = None
    for method in methods:
        cand_dir = bank_dir.with_name(bank_dir.name + ".candidates") / method
        if (cand_dir / "promptbank.json").is_file():
            bank = PromptBank.load(cand_dir, backbone=backbone, embedder=embedder)
            rec = bank.tasks[cfg.answer_task]
            _log(f"{method}: reusing the answer prompt saved in {cand_dir}")
        else:
            bank = PromptBank(backbone, embedder)
            _log(f"training {cfg.answer_task} with {method} on {len(train_rows)} questions")
            rec = learn_rag_task(
                bank, cfg.answer_task, "answer", train_rows, dev_loss_rows, {**answer_opts, "method": method},
                progress=cfg.progress,
            )  # fmt: skip
            bank.save(cand_dir)
        llm = PTunedLLM(bank=bank, max_tokens=cfg.max_tokens)
        preds = AnswerCache().answers(
            llm, [(r["question"], [r["context"]]) for r in dev_eval], cfg.answer_task, cfg, f"dev {method}"
        )
        dev_scores = scores(preds, [r["answers"] for r in dev_eval])
        _log(f"{method}: dev EM {dev_scores['em']:.1f} F1 {dev_scores['f1']:.1f} ({rec.steps} steps)")
        report["candidates"][method] = {"dev": dev_scores, "record": _record(rec)}
        if best is None or dev_scores["f1"] > best[0]:
            best = (dev_scores["f1"], method, bank)
    assert best is not None
    report["answer_method"] = best[1]
    bank = best[2]
    bank.save(bank_dir)
    _log(f"training {cfg.rewrite_task} on {len(train_rows)} questions")
    rec = learn_rag_task(
        bank, cfg.rewrite_task, "rewrite", train_rows, dev_loss_rows, options.get("rewrite", {}), progress=cfg.progress
    )
    report["rewrite"] = _record(rec)
    return bank, report


def _record(rec) -> dict:
    keep = ("name", "kind", "prompt_config", "steps", "best_step", "dev_loss", "train_seconds", "num_train", "num_dev")
    d = asdict(rec) if not isinstance(rec, dict) else rec
    out = {k: d.get(k) for k in keep}
    tc = d.get("train_config", {})
    out["train_config"] = {k: tc.get(k) for k in ("max_steps", "batch_size", "lr", "eval_every", "max_input_tokens")}
    return out


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------

ANSWER_ROWS = [
    ("base_gold", "base model + instruction", "gold paragraph"),
    ("tuned_gold", "answer-synthesis soft prompt", "gold paragraph"),
    ("base_e2e", "base model + instruction", "retrieved, question"),
    ("tuned_e2e", "answer-synthesis soft prompt", "retrieved, question"),
    ("base_qu_e2e", "base model + instruction", "retrieved, question + rewrite (fuse)"),
    ("tuned_qu_e2e", "answer-synthesis soft prompt", "retrieved, question + rewrite (fuse)"),
]


def table(result: dict, cfg: Config) -> str:
    ks = cfg.recall_ks
    lat = result["latency_ms"]
    lines = [
        "| retrieval (240 paragraphs, MiniLM) | " + " | ".join(f"recall@{k}" for k in ks) + " | median latency |",
        "|---|" + "---:|" * (len(ks) + 1),
    ]
    for m in RETRIEVAL_MODES:
        label = RETRIEVAL_LABELS[m].replace("w on dev", f"w = {result['rewrite_weight']['weight']:g} on dev")
        vals = " | ".join(f"{result['retrieval'][m][f'recall@{k}']:.1f}" for k in ks)
        lines.append(f"| {label} | {vals} | {lat[f'retrieval_{m}']:.0f} ms |")
    lines += [
        "",
        f"| answers (k = {cfg.k} passage end to end) | context | EM | F1 | median latency |",
        "|---|---|---:|---:|---:|",
    ]
    for key, who, ctx in ANSWER_ROWS:
        a = result["answers"][key]
        lines.append(f"| {who} | {ctx} | {a['em']:.1f} | {a['f1']:.1f} | {lat[key]:.0f} ms |")
    return "\n".join(lines)


def plot(result: dict, cfg: Config, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = range(len(RETRIEVAL_MODES))
    width = 0.8 / len(cfg.recall_ks)
    for j, k in enumerate(cfg.recall_ks):
        vals = [result["retrieval"][m][f"recall@{k}"] for m in RETRIEVAL_MODES]
        ax1.bar([i + j * width for i in x], vals, width, label=f"recall@{k}")
    ax1.set_xticks([i + width * (len(cfg.recall_ks) - 1) / 2 for i in x], RETRIEVAL_MODES)
    ax1.set_ylim(0, 100)
    ax1.set_title(f"Retrieval on test ({result['n']['test_questions']} questions)")
    ax1.legend(loc="lower right")
    keys = [k for k, _, _ in ANSWER_ROWS]
    for j, metric in enumerate(("em", "f1")):
        ax2.bar(
            [i + j * 0.4 for i in range(len(keys))],
            [result["answers"][k][metric] for k in keys],
            0.4,
            label=metric.upper(),
        )
    ax2.set_xticks([i + 0.2 for i in range(len(keys))], keys, rotation=20)
    ax2.set_title(f"Answers on test (end to end: top-{cfg.k})")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def _import_all() -> None:
    """Import every promptbank / langchain_promptbank module now: a long run then keeps one consistent version of
    the code even if the source files change while it runs (lazy imports would otherwise mix versions)."""
    import importlib
    import pkgutil

    import langchain_promptbank
    import promptbank

    for pkg in (promptbank, langchain_promptbank):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            importlib.import_module(info.name)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="datasets folder with xquad_en/ (../shared/data)")
    ap.add_argument("--bank", type=Path, default=None, help=f"bank folder (default {DEFAULT_BANK.relative_to(ROOT)})")
    ap.add_argument("--train", action="store_true", help="train the soft prompts missing from the bank, then save it")
    ap.add_argument("--train-only", action="store_true", help="with --train: stop after training")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: tiny training into a temporary bank, few questions"
    )
    ap.add_argument("--answer-methods", default="prompt_tuning,deep", help="answer-prompt methods compared on dev")
    ap.add_argument("--steps", type=int, default=None, help="training steps per prompt (default: xquad.*_TRAINING)")
    ap.add_argument("--k", type=int, default=1, help="passages given to the answer step end to end")
    ap.add_argument("--n-test", type=int, default=None, help="test questions (default all; deterministic sample)")
    ap.add_argument("--n-dev", type=int, default=None, help="dev questions for model selection (default all)")
    ap.add_argument("--n-latency", type=int, default=16, help="test questions timed at batch size 1")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default results/rag[_quick].json)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    _import_all()
    import torch

    torch.set_num_threads(args.threads)
    from langchain_promptbank.xquad import load_xquad
    from promptbank import PromptBank

    cfg = Config(k=args.k, n_test=args.n_test, n_dev=args.n_dev, n_latency=args.n_latency, batch_size=args.batch_size)
    cfg.progress = not args.no_progress
    options: dict[str, Any] = {}
    methods = [m.strip() for m in args.answer_methods.split(",") if m.strip()]
    if args.steps:
        options = {"answer": {"max_steps": args.steps}, "rewrite": {"max_steps": args.steps}}
    tmp = None
    if args.quick:
        tmp = tempfile.TemporaryDirectory(prefix="rag_quick_")
        bank_dir = Path(tmp.name) / "bank"
        args.train = True
        methods = methods[:1]
        cfg.n_test, cfg.n_dev, cfg.n_latency = args.n_test or 12, args.n_dev or 8, min(args.n_latency, 2)
        small = {"max_steps": args.steps or 4, "batch_size": 2, "eval_every": 2}
        options = {"answer": small, "rewrite": small, "max_train": 16, "dev_size": 4}
    else:
        bank_dir = args.bank or DEFAULT_BANK
    try:
        rows = load_xquad(args.data)
    except (FileNotFoundError, ValueError) as e:
        print(f"rag.py: error: {e}", file=sys.stderr)
        return 1

    t0 = time.perf_counter()
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()}
    train_report = None
    have_bank = (bank_dir / "promptbank.json").is_file()
    if have_bank:
        bank = PromptBank.load(bank_dir)
    elif args.train:
        bank = PromptBank.from_pretrained()
    else:
        print(
            f"rag.py: error: no bank at {bank_dir}; train one with: python benchmarks/rag.py --train --bank {bank_dir}",
            file=sys.stderr,
        )
        return 1
    missing = [t for t in (cfg.answer_task, cfg.rewrite_task) if t not in bank.tasks]
    if missing and not args.train:
        print(f"rag.py: error: the bank at {bank_dir} lacks {missing}; add --train to train them", file=sys.stderr)
        return 1
    if missing:
        if cfg.answer_task in bank.tasks:  # only the rewrite prompt is missing: no method choice needed
            from langchain_promptbank.xquad import learn_rag_task, sample_rows, split_by_article

            split = split_by_article(rows)
            rec = learn_rag_task(
                bank, cfg.rewrite_task, "rewrite", split["train"], sample_rows(split["dev"], 32),
                options.get("rewrite"), progress=cfg.progress,
            )  # fmt: skip
            train_report = {"rewrite": _record(rec)}
        else:
            bank, train_report = train(bank.backbone, bank.embedder, rows, cfg, methods, options, bank_dir)
        bank.save(bank_dir)
        train_report["seconds"] = time.perf_counter() - t0
        _log(f"saved the bank to {bank_dir}")
        if not args.quick:
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / "rag_train.json").write_text(json.dumps(train_report, indent=2, default=float) + "\n")
        if args.train_only:
            print(json.dumps(train_report, indent=2, default=float))
            return 0

    import langchain_core
    import transformers

    result = {
        "command": "python benchmarks/rag.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra"}
        | {"data": str(args.data), "bank": str(bank_dir)},
        "backbone": bank.backbone.name,
        "embedder": bank.embedder.name,
        "tasks": {n: _record(bank.tasks[n]) for n in (cfg.answer_task, cfg.rewrite_task)},
        "train": train_report,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "langchain_core": langchain_core.__version__,
            "python": platform.python_version(),
        },
        "machine": machine,
    }
    result |= run_benchmark(bank, rows, cfg)
    result["machine"]["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - t0
    out = args.out or RESULTS / ("rag_quick.json" if args.quick else "rag.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    png = out.with_suffix(".png")
    drew = plot(result, cfg, png)
    print(table(result, cfg))
    print(
        f"\nn = {result['n']['test_questions']} test questions ({len(result['split']['test'])} articles), "
        f"latency on {min(cfg.n_latency, result['n']['test_questions'])}; chain agreement "
        f"{result['chain_agreement']['same_answer']}/{result['chain_agreement']['of']}; total {result['total_s'] / 60:.1f} min"
    )
    print(f"Wrote {out}" + (f" and {png}" if drew else " (matplotlib not installed: no chart)"))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The RAG benchmark's pieces (benchmarks/rag.py, langchain_promptbank.xquad) on known inputs and, end to end, on a
tiny model with a synthetic XQuAD-shaped slice: SQuAD metrics, recall@k, the split by article, training rows,
fused retrieval and the chain's "fuse" mode."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import fast_options

pytest.importorskip("langchain_core")

from langchain_core.documents import Document  # noqa: E402
from langchain_core.retrievers import BaseRetriever  # noqa: E402

from langchain_promptbank import (  # noqa: E402
    DEFAULT_REWRITE_WEIGHT,
    FaissRetriever,
    PromptBankEmbeddings,
    PTunedLLM,
    answer_messages,
    build_rag_chain,
    format_answer_input,
)
from langchain_promptbank.retrievers import fuse_vectors  # noqa: E402
from langchain_promptbank.xquad import (  # noqa: E402
    answer_rows,
    answer_sentence,
    exact_match,
    f1_score,
    first_line,
    learn_rag_task,
    load_xquad,
    normalize_answer,
    paragraphs,
    recall_at_k,
    rewrite_rows,
    sample_rows,
    split_by_article,
)

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    """benchmarks/rag.py as a module (benchmarks/ is not a package)."""
    if "rag_bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("rag_bench", ROOT / "benchmarks" / "rag.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["rag_bench"] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
    return sys.modules["rag_bench"]


TOPICS = [
    ("Rivers", "The Rhine flows through six countries. It is 1,230 km long.", "How long is the Rhine?", "1,230 km"),
    ("Birds", "Penguins cannot fly. They swim in cold water near Antarctica.", "Where do penguins swim?", "cold water"),
    ("Space", "Mars has two moons. They are called Phobos and Deimos.", "How many moons has Mars?", "two"),
    ("Music", "Mozart wrote his first symphony at age eight. He lived in Vienna.", "Where did Mozart live?", "Vienna"),
    ("Food", "Bread is baked from flour and water. Yeast makes it rise.", "What makes bread rise?", "Yeast"),
    (
        "Trees",
        "Oaks can live for a thousand years. Their fruit is the acorn.",
        "What is the fruit of oaks?",
        "the acorn",
    ),
]


def synthetic_rows() -> list[dict]:
    """Six articles with two XQuAD-style questions each (answer spans checked against the context)."""
    rows = []
    for i, (title, context, question, answer) in enumerate(TOPICS):
        start = context.index(answer)
        first = context.split(". ")[0]
        rows.append(
            {
                "id": f"q{i}a",
                "title": title,
                "context": context,
                "question": question,
                "answers": [answer],
                "answer_starts": [start],
            }
        )
        rows.append(
            {
                "id": f"q{i}b",
                "title": title,
                "context": context,
                "question": f"What is said first about {title.lower()}?",
                "answers": [first, first.split()[1]],
                "answer_starts": [0, context.index(first.split()[1])],
            }
        )
    return rows


# ---------------------------------------------------------------------- metrics
def test_squad_normalisation_em_f1():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert normalize_answer("an Apple a day") == "apple day"
    assert exact_match("the Rhine.", ["Rhine"]) == 1.0
    assert exact_match("Rhine river", ["Rhine", "Danube"]) == 0.0
    assert f1_score("cat sat", ["the cat"]) == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert f1_score("cat sat", ["dog", "sat cat"]) == 1.0  # max over gold answers, order free
    assert f1_score("", ["cat"]) == 0.0 and f1_score("the", ["a"]) == 1.0  # both empty after normalisation
    assert first_line("\n  Vienna \nbecause ...") == "Vienna" and first_line("  ") == ""
    bench = _bench()
    s = bench.scores(["Vienna\nextra", "two moons", "x"], [["Vienna"], ["two"], ["y"]])
    assert s == {"em": pytest.approx(100 / 3), "f1": pytest.approx(100 * (1 + 2 / 3) / 3), "n": 3}
    with pytest.raises(ValueError):
        bench.scores(["a"], [])


def test_recall_at_k():
    ranked = [[3, 1, 2], [0, 2, 1], [2, 0, 1]]
    gold = [1, 0, 5]
    assert recall_at_k(ranked, gold, 1) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, gold, 2) == pytest.approx(2 / 3)
    assert recall_at_k(ranked, gold, 10) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        recall_at_k(ranked, gold, 0)
    with pytest.raises(ValueError):
        recall_at_k(ranked, gold[:2], 1)


# ---------------------------------------------------------------------- data
def test_split_by_article_is_disjoint_deterministic_and_complete():
    rows = synthetic_rows()
    split = split_by_article(rows)
    titles = {s: {r["title"] for r in split[s]} for s in split}
    assert titles["train"] and titles["dev"] and titles["test"]
    assert not (titles["train"] & titles["test"]) and not (titles["train"] & titles["dev"])
    assert not (titles["dev"] & titles["test"])
    assert not (set(paragraphs(split["train"])) & set(paragraphs(split["test"])))
    assert sum(len(v) for v in split.values()) == len(rows)
    assert (len(titles["test"]), len(titles["dev"]), len(titles["train"])) == (2, 1, 3)
    again = split_by_article(list(reversed(rows)))  # independent of row order
    assert {s: {r["id"] for r in again[s]} for s in again} == {s: {r["id"] for r in split[s]} for s in split}
    with pytest.raises(ValueError):
        split_by_article(rows[:4])  # two articles cannot make three splits
    sample = sample_rows(rows, 5)
    assert len(sample) == 5 and sample == sample_rows(rows, 5) and sample_rows(rows, None) == rows


def test_training_rows_and_loading(tmp_path):
    rows = synthetic_rows()
    a = answer_rows(rows[:1])[0]
    assert a == {"input": format_answer_input(rows[0]["question"], [rows[0]["context"]]), "target": "1,230 km"}
    assert rewrite_rows(rows[:1])[0]["target"] == "It is 1,230 km long."
    assert answer_sentence("One. Two is 2! Three?", 12, "2") == "Two is 2!"
    with pytest.raises(ValueError):
        answer_sentence("short", 50, "x")

    path = tmp_path / "xquad_en" / "test.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert load_xquad(tmp_path) == rows == load_xquad(path)
    path.write_text('{"id": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="test.jsonl:1"):
        load_xquad(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_xquad(tmp_path / "nowhere")


# ---------------------------------------------------------------------- fused retrieval
def test_search_fused_is_the_weighted_sum_of_cosines(hashing_embedder):
    emb = PromptBankEmbeddings(hashing_embedder)
    texts = [t[1] for t in TOPICS]
    retriever = FaissRetriever(texts=texts, embeddings=emb, k=3)
    q, r = "How long is the Rhine?", "Penguins swim in cold water."
    assert retriever.search_fused([q, r], [1.0, 0.0], k=3) == retriever.invoke(q, k=3)
    docs = np.asarray(emb.embed_documents(texts))
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    qv, rv = (np.asarray(v) / np.linalg.norm(v) for v in emb.embed_documents([q, r]))
    want = np.argsort(-(docs @ qv + 0.7 * (docs @ rv)), kind="stable")[:3]
    got = [texts.index(d.page_content) for d in retriever.search_fused([q, r], [1.0, 0.7], k=3)]
    assert got == list(want)
    assert np.allclose(fuse_vectors([qv, rv], [1.0, 0.7]), qv + 0.7 * rv, atol=1e-6)
    for bad in ([1.0], [-1.0, 1.0], [0.0, 0.0], [float("nan"), 1.0]):
        with pytest.raises(ValueError):
            retriever.search_fused([q, r], bad)


# ---------------------------------------------------------------------- end to end on a tiny model
@pytest.fixture(scope="module")
def rag_bank(_tiny_backbone_proto):
    from promptbank import PromptBank
    from promptbank.embed import HashingEmbedder

    bank = PromptBank(_tiny_backbone_proto, HashingEmbedder(dim=128))
    split = split_by_article(synthetic_rows())
    for name, role in (("answer_synthesis", "answer"), ("query_rewrite", "rewrite")):
        opts = fast_options(max_steps=2, batch_size=2, eval_every=2, max_input_tokens=400, max_target_tokens=16)
        learn_rag_task(bank, name, role, split["train"], split["dev"], opts, progress=False)
    return bank


def test_chain_fuse_mode(rag_bank):
    llm = PTunedLLM(bank=rag_bank, max_tokens=6)
    retriever = FaissRetriever(texts=[t[1] for t in TOPICS], embeddings=PromptBankEmbeddings(bank=rag_bank), k=2)
    q = "Where did Mozart live?"
    out = build_rag_chain(
        llm, retriever, rewrite_task="query_rewrite", answer_task="answer_synthesis", query_mode="fuse", k=2
    ).invoke(q)
    rewrite = llm.invoke(q, task="query_rewrite").content.strip()
    assert out["rewrite"].strip() == rewrite and out["query"] == q
    want = (
        retriever.search_fused([q, rewrite], [1.0, DEFAULT_REWRITE_WEIGHT], k=2)
        if rewrite
        else retriever.invoke(q, k=2)
    )
    assert out["docs"] == want
    assert (
        out["answer"]
        == llm.invoke(answer_messages(q, out["docs"], answer_task="answer_synthesis"), task="answer_synthesis").content
    )

    class Plain(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager):
            return [Document(query)]

    with pytest.raises(TypeError, match="search_fused"):
        build_rag_chain(llm, Plain(), rewrite_task="query_rewrite", query_mode="fuse")
    with pytest.raises(ValueError):
        build_rag_chain(llm, retriever, query_mode="fuse", rewrite_weight=-1.0)


def test_run_benchmark_on_tiny_model(rag_bank):
    bench = _bench()
    cfg = bench.Config(n_latency=2, max_tokens=4, batch_size=3, progress=False, weight_grid=(0.0, 1.0))
    rows = synthetic_rows()
    result = bench.run_benchmark(rag_bank, rows, cfg, embeddings=PromptBankEmbeddings(bank=rag_bank))
    assert result["n"] == {"corpus_paragraphs": 6, "test_questions": 4, "dev_questions": 2}
    assert result["retrieval_embedder"] == "hashing-128"
    assert result["rewrite_weight"]["weight"] in (0.0, 1.0)
    grid = {g["weight"]: g["recall@1"] for g in result["rewrite_weight"]["grid"]}
    assert grid[result["rewrite_weight"]["weight"]] >= grid[0.0]  # never below the question alone on dev
    for mode in bench.RETRIEVAL_MODES:
        r = result["retrieval"][mode]
        assert 0 <= r["recall@1"] <= r["recall@5"] <= 100
    for name, s in result["answers"].items():
        assert s["n"] == 4 and 0 <= s["em"] <= s["f1"] <= 100, name
        assert result["latency_ms"][name] > 0
    # the LCEL chain, run at batch size 1, gives the answers the benchmark computed in batches
    assert result["chain_agreement"]["same_answer"] == result["chain_agreement"]["of"] == 8
    md = bench.table(result, cfg)
    assert md.count("\n|") >= 12 and "recall@5" in md
    with pytest.raises(ValueError, match="no task"):
        bench.run_benchmark(type(rag_bank)(rag_bank.backbone, rag_bank.embedder), rows, cfg, embeddings=None)

"""RAG in LCEL with langchain-core only: question -> (rewrite) -> retrieve -> answer, with optional soft prompts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

from .chat_models import PTunedLLM

ANSWER_TEMPLATE = "Context:\n{context}\n\nQuestion: {question}"
"""The answer-synthesis input (what an answer-synthesis soft prompt is trained on, see
:func:`format_answer_input`)."""

DEFAULT_SYSTEM_PROMPT = (
    "Answer the question using only the context. Reply with the answer alone, as briefly as possible."
)
"""Instruction for the plain backbone when no answer-synthesis task is given."""


def format_docs(docs: Sequence[Document]) -> str:
    """Passages joined by blank lines, in retrieval order."""
    return "\n\n".join(d.page_content for d in docs)


def format_answer_input(question: str, docs: Sequence[Document] | Sequence[str]) -> str:
    """The text an answer-synthesis soft prompt sees: passages, then the question (:data:`ANSWER_TEMPLATE`).

    Train the answer-synthesis task on ``{"input": format_answer_input(q, passages), "target": answer}`` rows so
    that the chain shows the soft prompt exactly what it was trained on.
    """
    texts = [d if isinstance(d, str) else d.page_content for d in docs]
    return ANSWER_TEMPLATE.format(context="\n\n".join(texts), question=question)


DEFAULT_REWRITE_WEIGHT = 0.25
"""Weight of the rewrite against the question (weight 1) in ``query_mode="fuse"``: the best dev recall@1 of
``benchmarks/rag.py`` (XQuAD-en dev articles, grid 0-2) for the trained ``query_rewrite`` prompt and MiniLM."""


def answer_messages(
    question: str,
    docs: Sequence[Document] | Sequence[str],
    *,
    answer_task: str | None = None,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> list[BaseMessage]:
    """The messages the RAG chain sends to answer ``question`` from ``docs``.

    With ``answer_task`` (a soft prompt that sees the last human message only): one human message,
    :func:`format_answer_input`. Without: ``system_prompt``, then the same text, for the plain backbone's chat
    template.
    """
    text = format_answer_input(question, docs)
    if answer_task is not None:
        return [HumanMessage(text)]
    return [SystemMessage(system_prompt), HumanMessage(text)]


def build_rag_chain(
    llm: BaseChatModel,
    retriever: BaseRetriever,
    *,
    rewrite_task: str | None = None,
    answer_task: str | None = None,
    k: int | None = 4,
    query_mode: Literal["replace", "append", "fuse"] = "replace",
    rewrite_weight: float = DEFAULT_REWRITE_WEIGHT,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> Runnable[Any, dict[str, Any]]:
    """A RAG chain: ``{"question"}`` (or a plain string) -> ``{"question", "query", "docs", "answer"}``, plus
    ``"rewrite"`` when ``rewrite_task`` is given.

    1. ``rewrite`` / ``query``: with ``rewrite_task``, the query-understanding soft prompt rewrites the question.
       ``query_mode="replace"``: the rewrite is the query; ``"append"``: the query is question and rewrite in
       one text; ``"fuse"``: documents are ranked by ``cos(question, doc) + rewrite_weight * cos(rewrite, doc)``
       (one exact search; needs a retriever with ``search_fused``, e.g.
       :class:`~langchain_promptbank.FaissRetriever`) and the query is the question. Without ``rewrite_task``
       the question is the query. An empty rewrite falls back to the question.
    2. ``docs``: ``retriever`` on the query (``k`` passed per call to retrievers that take it, e.g.
       :class:`~langchain_promptbank.FaissRetriever`; ``None`` keeps the retriever's own).
    3. ``answer``: with ``answer_task``, that soft prompt answers :func:`format_answer_input` (passages +
       question); without it the plain backbone answers the same text after ``system_prompt``
       (:func:`answer_messages`).

    ``llm`` is a :class:`PTunedLLM` (any chat model works when no task is given). Each step is a
    ``RunnablePassthrough.assign``, so intermediate values stay in the output and traces.
    """
    if query_mode not in ("replace", "append", "fuse"):
        raise ValueError(f"query_mode must be 'replace', 'append' or 'fuse', got {query_mode!r}")
    if (rewrite_task or answer_task) and not isinstance(llm, PTunedLLM):
        raise TypeError(f"rewrite_task/answer_task need a PTunedLLM, got {type(llm).__name__}")
    if not (isinstance(rewrite_weight, (int, float)) and rewrite_weight >= 0 and math.isfinite(rewrite_weight)):
        raise ValueError(f"rewrite_weight must be a finite number >= 0, got {rewrite_weight!r}")
    fuse = query_mode == "fuse" and rewrite_task is not None
    if fuse and not callable(getattr(retriever, "search_fused", None)):
        raise TypeError(
            f"query_mode='fuse' needs a retriever with search_fused(queries, weights, k=) such as FaissRetriever; "
            f"got {type(retriever).__name__}"
        )

    def with_task(task: str | None) -> Runnable:
        return llm.bind(task=task) if isinstance(llm, PTunedLLM) else llm

    steps: list[Runnable] = [RunnableLambda(_as_question, name="question")]
    if rewrite_task is not None:
        rewrite = itemgetter("question") | with_task(rewrite_task) | StrOutputParser()
        steps.append(RunnablePassthrough.assign(rewrite=rewrite))
        combine = RunnableLambda(
            lambda x: _combine_query(x["question"], x["rewrite"], query_mode), name="combine_query"
        )
        steps.append(RunnablePassthrough.assign(query=combine))
    else:
        steps.append(RunnablePassthrough.assign(query=itemgetter("question")))

    if fuse:

        def fused(x: dict[str, Any]) -> list[Document]:
            rewrite = x["rewrite"].strip()
            if not rewrite:
                return retriever.invoke(x["question"], **({"k": k} if k is not None else {}))
            return retriever.search_fused([x["question"], rewrite], [1.0, float(rewrite_weight)], k=k)

        retrieve: Runnable = RunnableLambda(fused, name="fused_retrieve")
    else:
        retrieve = itemgetter("query") | (retriever.bind(k=k) if k is not None else retriever)
    steps.append(RunnablePassthrough.assign(docs=retrieve))

    def messages(x: dict[str, Any]) -> list[BaseMessage]:
        return answer_messages(x["question"], x["docs"], answer_task=answer_task, system_prompt=system_prompt)

    answer = RunnableLambda(messages, name="answer_messages") | with_task(answer_task) | StrOutputParser()
    steps.append(RunnablePassthrough.assign(answer=answer))
    chain = steps[0]
    for step in steps[1:]:
        chain = chain | step
    return chain.with_config(run_name="promptbank_rag")


def _as_question(x: Any) -> dict[str, Any]:
    if isinstance(x, str):
        return {"question": x}
    if isinstance(x, dict) and isinstance(x.get("question"), str):
        return dict(x)
    raise TypeError(f"the RAG chain takes a question string or a dict with a 'question' string, got {x!r}")


def _combine_query(question: str, rewrite: str, mode: str) -> str:
    rewrite = rewrite.strip()
    if not rewrite or mode == "fuse":  # an empty rewrite would retrieve nothing useful; "fuse" searches with both
        return question
    return rewrite if mode == "replace" else f"{question}\n{rewrite}"

"""RAG in LCEL with langchain-core only: question -> (rewrite) -> retrieve -> answer, with optional soft prompts."""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any, Literal

from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
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


def build_rag_chain(
    llm: BaseChatModel,
    retriever: BaseRetriever,
    *,
    rewrite_task: str | None = None,
    answer_task: str | None = None,
    k: int | None = 4,
    query_mode: Literal["replace", "append"] = "replace",
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
) -> Runnable[Any, dict[str, Any]]:
    """A RAG chain: ``{"question"}`` (or a plain string) -> ``{"question", "query", "docs", "answer"}``.

    1. ``query``: with ``rewrite_task``, the query-understanding soft prompt rewrites the question
       (``query_mode="replace"``: the rewrite is the query; ``"append"``: question and rewrite together);
       without it the question is the query.
    2. ``docs``: ``retriever`` on the query (``k`` passed per call to retrievers that take it, e.g.
       :class:`~langchain_promptbank.FaissRetriever`; ``None`` keeps the retriever's own).
    3. ``answer``: with ``answer_task``, that soft prompt answers :func:`format_answer_input` (passages +
       question); without it the plain backbone answers the same text after ``system_prompt``.

    ``llm`` is a :class:`PTunedLLM` (any chat model works when no task is given). Each step is a
    ``RunnablePassthrough.assign``, so intermediate values stay in the output and traces.
    """
    if query_mode not in ("replace", "append"):
        raise ValueError(f"query_mode must be 'replace' or 'append', got {query_mode!r}")
    if (rewrite_task or answer_task) and not isinstance(llm, PTunedLLM):
        raise TypeError(f"rewrite_task/answer_task need a PTunedLLM, got {type(llm).__name__}")

    def with_task(task: str | None) -> Runnable:
        return llm.bind(task=task) if isinstance(llm, PTunedLLM) else llm

    if rewrite_task is None:
        query: Runnable = itemgetter("question")
    else:
        rewrite = itemgetter("question") | with_task(rewrite_task) | StrOutputParser()
        query = RunnablePassthrough.assign(rewrite=rewrite) | RunnableLambda(
            lambda x: _combine_query(x["question"], x["rewrite"], query_mode), name="combine_query"
        )
    retrieve = itemgetter("query") | (retriever.bind(k=k) if k is not None else retriever)

    def answer_messages(x: dict[str, Any]) -> list:
        text = format_answer_input(x["question"], x["docs"])
        if answer_task is not None:
            return [HumanMessage(text)]
        return [SystemMessage(system_prompt), HumanMessage(text)]

    answer = RunnableLambda(answer_messages, name="answer_messages") | with_task(answer_task) | StrOutputParser()
    return (
        RunnableLambda(_as_question, name="question")
        | RunnablePassthrough.assign(query=query)
        | RunnablePassthrough.assign(docs=retrieve)
        | RunnablePassthrough.assign(answer=answer)
    ).with_config(run_name="promptbank_rag")


def _as_question(x: Any) -> dict[str, Any]:
    if isinstance(x, str):
        return {"question": x}
    if isinstance(x, dict) and isinstance(x.get("question"), str):
        return dict(x)
    raise TypeError(f"the RAG chain takes a question string or a dict with a 'question' string, got {x!r}")


def _combine_query(question: str, rewrite: str, mode: str) -> str:
    rewrite = rewrite.strip()
    if not rewrite:  # an empty rewrite would retrieve nothing useful
        return question
    return rewrite if mode == "replace" else f"{question}\n{rewrite}"

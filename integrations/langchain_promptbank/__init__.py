"""LangChain integration of promptbank: a chat model with per-task soft prompts, embeddings, a FAISS retriever
and RAG chains (langchain-core only).

>>> from langchain_promptbank import PTunedLLM
>>> llm = PTunedLLM(bank_path="my_bank", task="auto")   # route each question to its soft prompt
>>> llm.invoke("my card was charged twice").response_metadata["task"]
"""

from __future__ import annotations

from ._runtime import clear_cache
from .chat_models import PTunedLLM
from .embeddings import PromptBankEmbeddings
from .rag import (
    ANSWER_TEMPLATE,
    DEFAULT_REWRITE_WEIGHT,
    answer_messages,
    build_rag_chain,
    format_answer_input,
    format_docs,
)
from .retrievers import FaissRetriever
from .xquad import ANSWER_TASK, REWRITE_TASK, train_rag_prompts

__all__ = [
    "ANSWER_TASK",
    "ANSWER_TEMPLATE",
    "DEFAULT_REWRITE_WEIGHT",
    "REWRITE_TASK",
    "FaissRetriever",
    "PTunedLLM",
    "PromptBankEmbeddings",
    "answer_messages",
    "build_rag_chain",
    "clear_cache",
    "format_answer_input",
    "format_docs",
    "train_rag_prompts",
]

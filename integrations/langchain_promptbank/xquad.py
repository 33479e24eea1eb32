"""XQuAD-en for the two RAG soft prompts: data, split by article, training rows, training, SQuAD-style metrics.

XQuAD's English file is a 48-article, 240-paragraph, 1,190-question subset of the SQuAD v1.1 dev set (rows
``{id, title, context, question, answers, answer_starts}``, see ``../shared/data/xquad_en``). Everything here is
deterministic and model-free except :func:`train_rag_prompts`.

>>> rows = load_xquad("../shared/data")
>>> split = split_by_article(rows)                 # {"train", "dev", "test"}: disjoint sets of articles
>>> answer_rows(split["train"])[0]                 # {"input": format_answer_input(q, [context]), "target": ...}
>>> rewrite_rows(split["train"])[0]                # {"input": question, "target": the sentence holding the answer}
>>> train_rag_prompts(bank, "../shared/data")      # learns "answer_synthesis" and "query_rewrite" in ``bank``
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptbank.metrics import exact_match, f1_score, normalize_answer  # noqa: F401 - re-exported

from .rag import format_answer_input

ANSWER_TASK = "answer_synthesis"
"""Task name of the answer-synthesis soft prompt (passages + question -> short answer)."""
REWRITE_TASK = "query_rewrite"
"""Task name of the query-understanding soft prompt (question -> a passage-like sentence for retrieval)."""

SPLITS = ("train", "dev", "test")
REQUIRED_FIELDS = ("id", "title", "context", "question", "answers", "answer_starts")

# Training settings of the bank whose numbers are in the README (see train_rag_prompts). The answer prompt's
# method was chosen on dev: deep prompts, dev EM/F1 39.5/49.8, vs prompt tuning 36.0/49.3 (benchmarks/rag.py).
ANSWER_TRAINING: dict[str, Any] = {
    "method": "deep",
    "max_steps": 100,
    "batch_size": 4,
    "eval_every": 20,
    "patience": 3,
    "max_input_tokens": 768,
    # the input is the passages, then the question (format_answer_input): a longer one keeps its first and last
    # tokens, so loses passage text, not the question (the default for generation tasks, said here because it
    # matters; no XQuAD-en input is over 768 SmolLM2 tokens, the longest is 648; longer retrieved contexts may be)
    "truncation_side": "middle",
    "max_target_tokens": 32,
    "warm_start": False,
}
REWRITE_TRAINING: dict[str, Any] = {
    "method": "prompt_tuning",
    "max_steps": 100,
    "batch_size": 8,
    "eval_every": 20,
    "patience": 3,
    "max_input_tokens": 64,
    "max_target_tokens": 64,
    "warm_start": False,
}


# ---------------------------------------------------------------------- data
def load_xquad(data: str | Path = "../shared/data") -> list[dict[str, Any]]:
    """XQuAD-en rows from ``data`` (the datasets folder holding ``xquad_en/test.jsonl``, the ``xquad_en`` folder
    itself, or the JSONL file). Raises ``FileNotFoundError`` / ``ValueError`` naming the file and line."""
    path = Path(data).expanduser()
    for candidate in (path, path / "test.jsonl", path / "xquad_en" / "test.jsonl"):
        if candidate.is_file():
            path = candidate
            break
    else:
        raise FileNotFoundError(
            f"no XQuAD-en data at {data}: expected the datasets folder (with xquad_en/test.jsonl), "
            "the xquad_en folder or its test.jsonl"
        )
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            missing = [k for k in REQUIRED_FIELDS if k not in row] if isinstance(row, dict) else REQUIRED_FIELDS
            if missing:
                raise ValueError(f"{path}:{n}: an XQuAD row needs fields {list(REQUIRED_FIELDS)}; missing {missing}")
            if not row["answers"] or len(row["answers"]) != len(row["answer_starts"]):
                raise ValueError(f"{path}:{n}: answers and answer_starts must be non-empty and of equal length")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _title_key(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def split_by_article(
    rows: Sequence[dict[str, Any]], *, test_fraction: float = 0.3, dev_fraction: float = 0.1
) -> dict[str, list[dict[str, Any]]]:
    """Split rows into ``train`` / ``dev`` / ``test`` by article (``title``), so no paragraph or article is shared.

    Articles are ordered by the sha256 of their title (deterministic, independent of row order); the first
    ``round(test_fraction * n)`` are test, the next ``max(1, round(dev_fraction * n))`` dev (for model selection),
    the rest train. On the 48 XQuAD articles: 14 test, 5 dev, 29 train. Rows keep their order within a split.
    """
    if not 0 < test_fraction < 1 or not 0 < dev_fraction < 1 or test_fraction + dev_fraction >= 1:
        raise ValueError(f"need 0 < test_fraction, dev_fraction and a sum < 1; got {test_fraction}, {dev_fraction}")
    titles = sorted({r["title"] for r in rows}, key=_title_key)
    if len(titles) < 3:
        raise ValueError(f"need at least 3 articles to split by article, got {len(titles)}")
    n_test = min(max(1, round(test_fraction * len(titles))), len(titles) - 2)
    n_dev = min(max(1, round(dev_fraction * len(titles))), len(titles) - n_test - 1)
    which = {t: "test" for t in titles[:n_test]}
    which.update({t: "dev" for t in titles[n_test : n_test + n_dev]})
    which.update({t: "train" for t in titles[n_test + n_dev :]})
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r in rows:
        out[which[r["title"]]].append(r)
    return out


def sample_rows(rows: Sequence[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """A deterministic sample of ``n`` rows (the ``n`` smallest sha256 of their ``id``), in their original order;
    all rows when ``n`` is ``None`` or at least ``len(rows)``."""
    if n is None or n >= len(rows):
        return list(rows)
    if n < 1:
        raise ValueError(f"sample size must be >= 1, got {n}")
    keep = set(sorted(range(len(rows)), key=lambda i: _title_key(str(rows[i]["id"])))[:n])
    return [r for i, r in enumerate(rows) if i in keep]


def paragraphs(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The distinct paragraphs (``context``) of ``rows``, in order of first appearance: the retrieval corpus."""
    return list(dict.fromkeys(r["context"] for r in rows))


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text`` (split after . ! ? before a capital/digit)."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        spans.append((start, m.start()))
        start = m.end()
    spans.append((start, len(text)))
    return [(s, e) for s, e in spans if text[s:e].strip()]


def answer_sentence(context: str, answer_start: int, answer: str) -> str:
    """The sentence(s) of ``context`` that contain the answer span ``[answer_start, answer_start + len(answer))``."""
    end = answer_start + max(len(answer), 1)
    hit = [(s, e) for s, e in sentence_spans(context) if s < end and e > answer_start]
    if not hit:
        raise ValueError(f"answer span {answer_start}..{end} is outside the context ({len(context)} characters)")
    return context[hit[0][0] : hit[-1][1]].strip()


def answer_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Answer-synthesis rows: ``{"input": format_answer_input(question, [gold paragraph]), "target": answer}``.

    The input is built by the RAG chain's own :func:`~langchain_promptbank.format_answer_input`, so training and
    serving show the soft prompt the same text; the target is the first reference answer (a short span).
    """
    return [{"input": format_answer_input(r["question"], [r["context"]]), "target": r["answers"][0]} for r in rows]


def rewrite_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """Query-understanding rows: ``{"input": question, "target": the gold paragraph's sentence holding the answer}``.

    HyDE-style: the rewrite is trained to look like the passage that answers the question, so that its embedding
    lands near that passage's.
    """
    return [
        {"input": r["question"], "target": answer_sentence(r["context"], r["answer_starts"][0], r["answers"][0])}
        for r in rows
    ]


# ---------------------------------------------------------------------- metrics (SQuAD v1.1 evaluation script)
# (in promptbank.metrics, shared with PromptBank.evaluate; imported here for the benchmark and older callers)


def first_line(text: str) -> str:
    """The first non-empty line of a generated answer, stripped (what is scored; models may ramble on)."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def recall_at_k(ranked: Sequence[Sequence[Any]], gold: Sequence[Any], k: int) -> float:
    """Fraction of queries whose gold item is among the first ``k`` of their ranking."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(ranked) != len(gold):
        raise ValueError(f"got {len(ranked)} rankings for {len(gold)} gold items")
    if not gold:
        return 0.0
    return sum(g in list(r)[:k] for r, g in zip(ranked, gold)) / len(gold)


# ---------------------------------------------------------------------- training
@dataclass
class RagTraining:
    """What :func:`train_rag_prompts` did: the two task records and the split sizes."""

    answer: Any
    rewrite: Any
    split_sizes: dict[str, dict[str, int]]


def learn_rag_task(
    bank,
    name: str,
    role: str,
    train: Sequence[dict[str, Any]],
    dev: Sequence[dict[str, Any]],
    options: dict[str, Any] | None = None,
    *,
    progress: bool = True,
):
    """Learn one RAG soft prompt in ``bank`` from XQuAD rows: ``role`` is ``"answer"`` (:func:`answer_rows`,
    :data:`ANSWER_TRAINING`) or ``"rewrite"`` (:func:`rewrite_rows`, :data:`REWRITE_TRAINING`); ``options``
    update the defaults (``method`` plus :class:`promptbank.TrainConfig` fields). Returns the task record."""
    if role not in ("answer", "rewrite"):
        raise ValueError(f"role must be 'answer' or 'rewrite', got {role!r}")
    make, defaults = (answer_rows, ANSWER_TRAINING) if role == "answer" else (rewrite_rows, REWRITE_TRAINING)
    opts = {**defaults, "progress": progress, **(options or {})}
    method = opts.pop("method")
    return bank.learn_task(name, make(train), method=method, dev=make(dev), kind="generation", **opts)


def train_rag_prompts(
    bank,
    data: str | Path = "../shared/data",
    *,
    answer_task: str = ANSWER_TASK,
    rewrite_task: str = REWRITE_TASK,
    answer_options: dict[str, Any] | None = None,
    rewrite_options: dict[str, Any] | None = None,
    max_train: int | None = None,
    dev_size: int | None = 32,
    progress: bool = True,
) -> RagTraining:
    """Learn the answer-synthesis and query-understanding soft prompts on XQuAD-en's train articles.

    Both use the train split of :func:`split_by_article` for training and ``dev_size`` questions of its dev split
    (:func:`sample_rows`; each evaluation runs them all) for the dev loss (early stopping, best prompt kept); test
    articles are never seen. ``answer_options`` / ``rewrite_options`` update :data:`ANSWER_TRAINING` /
    :data:`REWRITE_TRAINING` (``method`` plus :class:`promptbank.TrainConfig` fields). ``max_train`` keeps the
    first N training questions (smoke runs). Tasks already in the bank are kept, not retrained. Save the bank
    afterwards with ``bank.save(folder)``.
    """
    split = split_by_article(load_xquad(data))
    train = split["train"][:max_train] if max_train else split["train"]
    dev = sample_rows(split["dev"], dev_size)
    sizes = {s: {"articles": len({r["title"] for r in split[s]}), "questions": len(split[s])} for s in SPLITS}
    sizes["train"]["questions_used"] = len(train)
    sizes["dev"]["questions_for_dev_loss"] = len(dev)
    records = {}
    for name, role, options in ((answer_task, "answer", answer_options), (rewrite_task, "rewrite", rewrite_options)):
        if name in bank.tasks:
            records[name] = bank.tasks[name]
        else:
            records[name] = learn_rag_task(bank, name, role, train, dev, options, progress=progress)
    return RagTraining(answer=records[answer_task], rewrite=records[rewrite_task], split_sizes=sizes)

"""Task data: load JSONL / JSON / CSV / TSV files or Python lists into a validated :class:`TaskData`.

Two kinds of task:

* classification -- rows ``{"text": str, "label": str}``; the label set comes from the ``labels`` argument or,
  failing that, from the data (order of first appearance).
* generation -- rows ``{"input": str, "target": str}``.

Every problem with the data raises :class:`~promptbank.errors.DataError` whose message starts with
``"<source>:<line>: "`` (file path or ``"<list>"``, and the 1-based file line or list row), so a bad row can be
found and fixed without guessing.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import json
import logging
import os
import random
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from promptbank.config import TRUNCATION_SIDES
from promptbank.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Example",
    "TaskData",
    "TaskKind",
    "check_label_words",
    "label_texts",
    "load_task_data",
    "check_truncation_side",
    "cut_to_tokens",
    "keep_ids",
    "split_dev",
    "truncate_inputs",
    "warn_long_targets",
]

logger = logging.getLogger(__name__)

TaskKind = Literal["classification", "generation"]

_KINDS: tuple[str, ...] = get_args(TaskKind)
# (input field, target field) of a row, per kind.
_FIELDS: dict[str, tuple[str, str]] = {
    "classification": ("text", "label"),
    "generation": ("input", "target"),
}
_LIST_SOURCE = "<list>"
_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass(frozen=True)
class Example:
    """One row of task data, already stripped and validated.

    Attributes:
        input: classification: the ``"text"`` field; generation: the ``"input"`` field.
        target: classification: the label name; generation: the ``"target"`` field.
        line: 1-based position for error messages (JSONL/JSON/CSV: the file line where the row starts;
            list: row index + 1), or ``None`` when unknown.
        uncut: the input as given, when :func:`truncate_inputs` cut ``input`` (else ``None``): what the routing
            embedder reads, since at inference it embeds a query whole.
    """

    input: str
    target: str
    line: int | None = None
    uncut: str | None = None

    @property
    def whole_input(self) -> str:
        """The input as given (before any cut): what routing and the embedding probe embed."""
        return self.input if self.uncut is None else self.uncut


@dataclass
class TaskData:
    """The validated examples of one task.

    Attributes:
        kind: ``"classification"`` or ``"generation"``.
        examples: the rows, in source order.
        labels: classification only: the label names (as given, else in order of first appearance);
            ``None`` for generation.
        source: where the rows came from (a file path or ``"<list>"``); used in messages.
    """

    kind: TaskKind
    examples: list[Example]
    labels: list[str] | None
    source: str

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "generation" and self.labels is not None:
            raise ValueError("labels must be None for a generation task")
        if self.kind == "classification" and self.labels is None:
            raise ValueError("labels must be given for a classification task")

    def __len__(self) -> int:
        return len(self.examples)


# ---------------------------------------------------------------------------- loading


def load_task_data(
    data: TaskData | str | os.PathLike[str] | Sequence[Any],
    *,
    kind: TaskKind | None = None,
    labels: Sequence[str] | None = None,
    source: str | None = None,
    columns: Mapping[str, str] | None = None,
    skip_invalid: bool = False,
    min_labels: int = 2,
) -> TaskData:
    """Load and validate task data.

    Args:
        data: one of

            * a :class:`TaskData` -- returned after checking it against ``kind`` and ``labels`` (a new object
              carrying ``labels`` when those differ from its own);
            * a path (``str`` or ``os.PathLike``) to ``.jsonl`` (one JSON object per line, blank lines skipped),
              ``.json`` (a JSON list of objects), ``.csv`` or ``.tsv`` (header row required), all UTF-8;
            * a list/tuple of dicts (rows as in the files);
            * a list/tuple of 2-item tuples/lists ``(text, label)`` or ``(input, target)``;
            * a table: a dict of equal-length columns (``{"text": [...], "label": [...]}``, as a Hugging Face
              ``Dataset[:]`` slice gives), a pandas or polars ``DataFrame``, or any other iterable of rows (a
              Hugging Face ``Dataset``, a generator); row numbers stand for line numbers in messages.
            * a ``.parquet`` path (needs ``pyarrow``: ``pip install pyarrow``).

            Classification rows are ``{"text", "label"}``, generation rows ``{"input", "target"}``; other fields
            are ignored. Text is stripped of surrounding whitespace; integer labels/targets become ``str(x)``.
        kind: ``"classification"`` or ``"generation"``. Inferred from the first row's fields when ``None``
            (2-item tuple rows default to classification).
        labels: classification only: the allowed label names, in canonical order. Every row's label must be one
            of them. When ``None``, the labels are those found in the data, in order of first appearance, and
            there must be at least ``min_labels``.
        source: name used for the data in messages. Default: the path as given, or ``"<list>"``.
        columns: where the fields are when the data names them otherwise: ``{field: column}`` with fields among
            ``"text"``, ``"label"``, ``"input"``, ``"target"`` and the column (CSV/TSV) or key (JSON, dicts) that
            holds each, e.g. ``{"text": "sentence", "label": "rating"}``. A mapped column takes the field's place
            (a column already named like the field is then ignored). Rows given as pairs have no names to map.
        skip_invalid: drop the rows that fail a check of their own instead of raising: an empty, missing or
            non-string text or label, a label outside ``labels``, a JSONL line that is not a JSON object, a CSV row
            with the wrong number of fields. One warning says how many rows were dropped, of how many, and why
            the first was (and the rest are logged at INFO level). Problems with the whole data still raise: a
            missing file or column, an unreadable file, no valid row left, fewer than ``min_labels`` labels.
        min_labels: classification data without ``labels``: the fewest distinct labels it must hold. 2 (default)
            is what training needs; data to evaluate a task on may hold a single label (``min_labels=1``, what
            :meth:`promptbank.PromptBank.evaluate` passes).

    Returns:
        The validated :class:`TaskData`.

    Raises:
        DataError: anything wrong with the data (message starts with ``"<source>:<line>: "`` where a line is
            known): missing file, unsupported extension, invalid JSON or UTF-8, missing fields/columns, empty or
            non-string text, unknown or too few labels, no rows, duplicate names in ``labels``.
        ValueError: ``kind`` is not a known kind.
        TypeError: ``data`` is none of the accepted types.
    """
    if kind is not None and kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if isinstance(min_labels, bool) or not isinstance(min_labels, int) or min_labels < 1:
        raise ValueError(f"min_labels must be an int >= 1, got {min_labels!r}")

    skipped: list[DataError] | None = [] if skip_invalid else None
    if isinstance(data, TaskData):
        if columns:
            raise DataError(
                "columns= applies to files and rows with named fields, not to a TaskData", source=data.source
            )
        return _check_task_data(data, kind=kind, labels=labels, source=source, min_labels=min_labels)

    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        src = source if source is not None else os.fspath(data)
        mapping = _check_columns(columns, src)
        rows = _read_file(path, src, kind, mapping, skipped)
    elif isinstance(data, (list, tuple)):
        src = source if source is not None else _LIST_SOURCE
        mapping = _check_columns(columns, src)
        rows = [(row, i + 1) for i, row in enumerate(data)]
    elif (table := _table_rows(data)) is not None:
        src = source if source is not None else f"<{type(data).__name__}>"
        mapping = _check_columns(columns, src)
        rows = [(row, i + 1) for i, row in enumerate(table)]
    else:
        raise TypeError(
            "data must be a TaskData, a path to a .jsonl/.json/.csv/.tsv/.parquet file, a list of dicts or "
            "(text, label) pairs, a dict of equal-length columns, a pandas / polars DataFrame or another iterable "
            f"of rows (a Hugging Face Dataset); got {type(data).__name__}"
        )

    if not rows and not skipped:
        raise DataError("no rows: the data set is empty", source=src)
    total = len(rows) + len(skipped or [])
    if mapping:
        rows = _each_row(rows, lambda row, line: _map_fields(row, mapping, line, src), skipped)

    label_list = _check_labels_arg(labels, src)
    if kind is None:
        kind = _first_kind(rows, src, skipped)
    if kind == "generation" and label_list is not None:
        raise DataError(
            "labels apply only to classification tasks, but kind is 'generation'",
            source=src,
        )

    examples = [ex for ex, _ in _each_row(rows, lambda row, line: _make_example(row, line, kind, src), skipped)]
    if skipped is not None and label_list is not None:
        allowed = set(label_list)
        skipped += [
            DataError(_unknown_label_message(ex.target, label_list), source=src, line=ex.line)
            for ex in examples
            if ex.target not in allowed
        ]
        examples = [ex for ex in examples if ex.target in allowed]
    if skipped:
        _report_skipped(skipped, total, src, kept=len(examples))

    if kind == "classification":
        label_list = _resolve_labels(examples, label_list, src, min_labels)
    data_out = TaskData(kind=kind, examples=examples, labels=label_list, source=src)
    logger.debug(
        "loaded %d %s examples from %s%s",
        len(data_out),
        kind,
        src,
        f" ({len(label_list)} labels)" if label_list is not None else "",
    )
    return data_out


def _each_row(rows: list[tuple[Any, int]], fn: Any, skipped: list[DataError] | None) -> list[tuple[Any, int]]:
    """``fn(row, line)`` of each row, as ``(result, line)``; with ``skipped`` (a list), a row whose check raises
    :class:`DataError` is dropped and its error appended there instead of raised."""
    out = []
    for row, line in rows:
        try:
            out.append((fn(row, line), line))
        except DataError as exc:
            if skipped is None:
                raise
            skipped.append(exc)
    return out


def _first_kind(rows: list[tuple[Any, int]], src: str, skipped: list[DataError] | None) -> TaskKind:
    """The kind of the first row (of the first row it can be told from, when skipping invalid rows)."""
    if not rows:
        raise _no_valid_rows(skipped or [], src)
    first_error = None
    for row, line in rows if skipped is not None else rows[:1]:
        try:
            return _infer_kind(row, line, src)
        except DataError as exc:
            first_error = first_error or exc
    raise first_error


def _no_valid_rows(skipped: list[DataError], src: str) -> DataError:
    first = f"; the first: {skipped[0]}" if skipped else ""
    return DataError(f"no valid rows: all {len(skipped)} rows were skipped as invalid{first}", source=src)


def _report_skipped(skipped: list[DataError], total: int, src: str, *, kept: int) -> None:
    """One warning for the rows dropped by ``skip_invalid`` (each one logged at INFO); an error if none is left."""
    if not kept:
        raise _no_valid_rows(skipped, src)
    skipped.sort(key=lambda e: e.line or 0)
    for exc in skipped:
        logger.info("skipped invalid row: %s", exc)
    warnings.warn(
        f"{src}: skipped {len(skipped)} invalid row(s) of {total} (skip_invalid); the first: {skipped[0]}",
        stacklevel=3,
    )


def _check_task_data(
    data: TaskData,
    *,
    kind: TaskKind | None,
    labels: Sequence[str] | None,
    source: str | None,
    min_labels: int = 2,
) -> TaskData:
    """Validate an existing TaskData against the requested ``kind``/``labels`` (without ``labels``: its own
    labels, at least ``min_labels`` of them)."""
    src = data.source
    if kind is not None and data.kind != kind:
        raise DataError(
            f"the data is a {data.kind} task, but kind={kind!r} was requested",
            source=src,
        )
    if not data.examples:
        raise DataError("no rows: the data set is empty", source=src)
    label_list = _check_labels_arg(labels, src)
    changed: dict[str, Any] = {}
    if label_list is not None:
        if data.kind != "classification":
            raise DataError(
                "labels apply only to classification tasks, but kind is 'generation'",
                source=src,
            )
        _resolve_labels(data.examples, label_list, src)
        if label_list != data.labels:
            changed["labels"] = label_list
    elif data.kind == "classification" and len(data.labels or []) < min_labels:
        raise DataError(f"a classification task needs at least {min_labels} labels, got {data.labels!r}", source=src)
    if source is not None and source != data.source:
        changed["source"] = source
    return dataclasses.replace(data, **changed) if changed else data


def _check_labels_arg(labels: Sequence[str] | None, src: str) -> list[str] | None:
    """Normalise the ``labels`` argument: strings (ints allowed), stripped, non-empty, unique, at least 2."""
    if labels is None:
        return None
    if isinstance(labels, str):
        raise DataError(
            f"labels must be a sequence of label names, not a string ({labels!r})",
            source=src,
        )
    out: list[str] = []
    for i, label in enumerate(labels):
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(
                f"labels[{i}] must be a string, got {type(label).__name__} ({label!r})",
                source=src,
            )
        name = str(label).strip()
        if not name:
            raise DataError(f"labels[{i}] is empty", source=src)
        if name in out:
            raise DataError(f"duplicate label {name!r} in labels {list(labels)!r}", source=src)
        out.append(name)
    if len(out) < 2:
        raise DataError(f"a classification task needs at least 2 labels, got {out!r}", source=src)
    return out


def _resolve_labels(examples: list[Example], label_list: list[str] | None, src: str, min_labels: int = 2) -> list[str]:
    """Check every label against ``label_list``, or collect the labels in order of first appearance (at least
    ``min_labels`` of them)."""
    if label_list is not None:
        allowed = set(label_list)
        for ex in examples:
            if ex.target not in allowed:
                raise DataError(
                    _unknown_label_message(ex.target, label_list),
                    source=src,
                    line=ex.line,
                )
        return label_list
    found = list(dict.fromkeys(ex.target for ex in examples))
    if len(found) < min_labels:
        held = f"every row has label {found[0]!r}" if len(found) == 1 else f"the data holds only {found!r}"
        raise DataError(
            f"a classification task needs at least {min_labels} distinct labels, but {held}"
            " (pass labels=[...] if the data holds only some of them)",
            source=src,
        )
    if min_labels >= 2 and len(found) >= _MANY_LABELS and len(found) > len(examples) / 2:
        longest = max(found, key=len)
        warnings.warn(
            f"{src}: {len(found)} distinct labels in {len(examples)} rows (most labels occur once; the longest: "
            f"{_short(longest)}): is the label column the right one? If the texts and labels are swapped, name "
            "the columns (columns={'text': ..., 'label': ...}; CLI: --columns text=...,label=...)",
            stacklevel=3,
        )
    return found


def check_label_words(label_words: Any, kind: str, labels: Sequence[str] | None) -> dict[str, str] | None:
    """Validate a verbalizer: ``{label: text}``, the words a causal LM reads and writes for some of a
    classification task's labels (``"ABBR"`` -> ``"abbreviation"``); labels left out are their own text.

    Returns the mapping with its texts stripped, in label order (``None`` for ``None`` or an empty mapping);
    integer keys name the labels they print as (``{1: "terrible"}`` for label ``"1"``).
    Raises ``ValueError`` for a generation task, a key that is not one of ``labels``, a text that is not a
    non-empty string, or two labels that would share a text.
    """
    if label_words is None or (isinstance(label_words, dict) and not label_words):
        return None
    if not hasattr(label_words, "items") or isinstance(label_words, (str, bytes)):
        raise ValueError(
            f"label_words must be a mapping {{label: text}}, got {type(label_words).__name__} ({_short(label_words)})"
        )
    if kind != "classification" or not labels:
        raise ValueError("label_words apply only to classification tasks (a generation task has no labels)")
    words: dict[Any, Any] = {}
    for key, text in label_words.items():  # integer labels are their str(), as in the data
        name = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
        if name in words:
            raise ValueError(f"label_words name label {name!r} twice")
        words[name] = text
    unknown = [k for k in words if k not in labels]
    if unknown:
        raise ValueError(
            f"label_words name {', '.join(repr(k) for k in unknown[:5])}, not among the task's labels "
            f"({', '.join(repr(x) for x in labels[:20])}{', ...' if len(labels) > 20 else ''})"
        )
    out: dict[str, str] = {}
    for lab in labels:
        if lab not in words:
            continue
        text = words[lab]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"label_words[{lab!r}] must be a non-empty string, got {_short(text)}")
        out[lab] = text.strip()
    owner: dict[str, str] = {}
    for lab, text in zip(labels, label_texts(labels, out)):
        if text in owner:
            raise ValueError(
                f"labels {owner[text]!r} and {lab!r} would both be written {text!r}: each label needs its own text"
            )
        owner[text] = lab
    return out


def label_texts(labels: Sequence[str], label_words: Mapping[str, str] | None) -> list[str]:
    """The text a causal LM reads and writes for each of ``labels`` (its label word, else the label itself)."""
    words = label_words or {}
    return [words.get(lab, lab) for lab in labels]


def _unknown_label_message(label: str, allowed: list[str]) -> str:
    return f"unknown label {label!r}; allowed labels: {', '.join(repr(x) for x in allowed)}"


def _infer_kind(row: Any, line: int, src: str) -> TaskKind:
    """Infer the kind from the first row: its field names, or classification for a (text, label) pair."""
    if not isinstance(row, dict):
        return "classification"
    has_cls = "text" in row or "label" in row
    has_gen = "input" in row or "target" in row
    if has_cls and has_gen:
        raise DataError(
            f"cannot infer the task kind: the row has both classification and generation fields "
            f"({_field_list(row)}); pass kind='classification' or kind='generation'",
            source=src,
            line=line,
        )
    if has_gen:
        return "generation"
    if has_cls:
        return "classification"
    raise DataError(
        "cannot infer the task kind: expected fields 'text' and 'label' (classification) or 'input' and "
        f"'target' (generation); the row has fields: {_field_list(row)}"
        f"{_columns_hint(_FIELDS['classification'], list(row), row)}",
        source=src,
        line=line,
    )


def _field_list(row: dict[str, Any]) -> str:
    return ", ".join(repr(k) for k in row) if row else "(none)"


# Training data with at least this many labels, more than half as many as rows, draws a warning (swapped columns?)
_MANY_LABELS = 10
_INPUT_FIELDS = {pair[0] for pair in _FIELDS.values()}  # "text", "input": the field that holds the long value


# Words in column names that say which field a column is, for the missing-column hint
_NAME_HINTS: dict[str, tuple[str, ...]] = {
    "text": ("text", "sentence", "review", "abstract", "body", "content", "document", "utterance", "comment",
             "message", "query", "question", "narrative", "description", "title"),
    "label": ("label", "class", "category", "rating", "star", "sentiment", "intent", "topic", "tag", "condition"),
    "input": ("input", "question", "prompt", "query", "source", "context", "text", "instruction"),
    "target": ("target", "answer", "output", "response", "summary", "completion", "reference"),
}  # fmt: skip


def _named_for(column: str, field: str) -> bool:
    low = column.lower()
    return any(word in low for word in _NAME_HINTS.get(field, ()))


def _columns_hint(fields: Sequence[str], names: Sequence[str], sample: Mapping[str, Any] | None = None) -> str:
    """How to name the data's own fields for the missing ``fields``, as an example mapping.

    A spare column whose name says which field it is (``review`` -> text, ``stars`` -> label, ``answer`` ->
    target; :data:`_NAME_HINTS`) is taken for that field; the rest are guessed from a ``sample`` row's values: the
    input field (``text`` / ``input``) gets the column with the longest value, the output field (``label`` /
    ``target``) the one with the shortest (a label is a short code or word; a text is a sentence or more), and the
    hint says it is a guess. Without a sample, or with too few spare columns, it names placeholders: pairing by
    position gets files with the label column first backwards, and a reversed mapping loads (each text becomes a
    label) instead of failing."""
    known = {name for pair in _FIELDS.values() for name in pair}
    spare = [str(n) for n in names if n not in known]
    if sample is None or len(spare) < len(fields):
        mapping = {f: f"{f.upper()}_COLUMN" for f in fields}
        guess = ""
    else:
        left = sorted(spare, key=lambda c: len(str(sample.get(c, ""))))  # shortest value first
        mapping = {}
        for f in fields:  # by name first: a column named for exactly one of the missing fields
            named = [c for c in left if _named_for(c, f) and not any(_named_for(c, g) for g in fields if g != f)]
            if named:
                mapping[f] = named[-1] if f in _INPUT_FIELDS else named[0]
                left.remove(mapping[f])
        for f in sorted(fields, key=lambda f: f not in _INPUT_FIELDS):  # then by value: the input field first
            if f not in mapping:
                mapping[f] = left.pop() if f in _INPUT_FIELDS else left.pop(0)
        mapping = {f: mapping[f] for f in fields}
        guess = " (a guess from the column names and the first row's values: check it)"
    cli = ",".join(f"{f}={c}" for f, c in mapping.items())
    return f"; if the data names them otherwise, say which, e.g. columns={mapping!r} (CLI: --columns {cli}){guess}"


def _make_example(row: Any, line: int, kind: TaskKind, src: str) -> Example:
    """Turn one raw row (dict or 2-item pair) into a stripped, validated Example."""
    in_field, out_field = _FIELDS[kind]
    if isinstance(row, dict):
        for name in (in_field, out_field):
            if name not in row:
                lacking = [f for f in (in_field, out_field) if f not in row]
                raise DataError(
                    f"missing field {name!r} (a {kind} row needs {in_field!r} and {out_field!r}); "
                    f"the row has fields: {_field_list(row)}{_columns_hint(lacking, list(row), row)}",
                    source=src,
                    line=line,
                )
        raw_in, raw_out = row[in_field], row[out_field]
    elif isinstance(row, (list, tuple)):
        if len(row) != 2:
            raise DataError(
                f"a row must be a dict or a 2-item ({in_field}, {out_field}) pair, got a "
                f"{type(row).__name__} of {len(row)} items",
                source=src,
                line=line,
            )
        raw_in, raw_out = row
    else:
        raise DataError(
            f"a row must be an object with fields {in_field!r} and {out_field!r}, got {type(row).__name__} "
            f"({_short(row)})",
            source=src,
            line=line,
        )

    if not isinstance(raw_in, str):
        if isinstance(raw_in, float) and raw_in != raw_in:  # NaN: how a DataFrame holds an empty cell
            raise DataError(f"field {in_field!r} is empty (NaN)", source=src, line=line)
        raise DataError(
            f"field {in_field!r} must be a string, got {type(raw_in).__name__} ({_short(raw_in)})",
            source=src,
            line=line,
        )
    text = raw_in.strip()
    if not text:
        raise DataError(f"field {in_field!r} is empty", source=src, line=line)

    # Integer labels/targets (e.g. {"label": 3} in JSON, numpy integers from a DataFrame) are accepted as their
    # decimal string.
    if isinstance(raw_out, Integral) and not isinstance(raw_out, bool):
        raw_out = int(raw_out)
    if isinstance(raw_out, bool) or not isinstance(raw_out, (str, int)):
        raise DataError(
            f"field {out_field!r} must be a string, got {type(raw_out).__name__} ({_short(raw_out)})",
            source=src,
            line=line,
        )
    target = str(raw_out).strip()
    if not target:
        raise DataError(f"field {out_field!r} is empty", source=src, line=line)
    return Example(input=text, target=target, line=line)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------------------ files


def _check_columns(columns: Mapping[str, str] | None, src: str) -> dict[str, str]:
    """The ``columns`` argument checked: ``{field: column}``, fields known, columns non-empty strings."""
    if not columns:
        return {}
    if not isinstance(columns, Mapping):
        raise DataError(f"columns must map field names to column names, got {type(columns).__name__}", source=src)
    fields = [f for pair in _FIELDS.values() for f in pair]
    out: dict[str, str] = {}
    for field, column in columns.items():
        if field not in fields:
            raise DataError(
                f"columns: unknown field {field!r}; fields are {', '.join(repr(f) for f in fields)}", source=src
            )
        if not isinstance(column, str) or not column.strip():
            raise DataError(f"columns: the column for {field!r} must be a non-empty string, got {column!r}", source=src)
        out[field] = column.strip()
    return out


def _check_mapped(mapping: Mapping[str, str], names: list[str], lacks: str, has: str, src: str, line: int) -> None:
    """Raise unless every column ``mapping`` names is among ``names`` (a header's columns or a row's keys)."""
    missing = [column for column in mapping.values() if column not in names]
    if missing:
        raise DataError(
            f"{lacks} {', '.join(repr(c) for c in missing)} named in columns=; {has}: "
            f"{', '.join(repr(n) for n in names) or '(nothing)'}",
            source=src,
            line=line,
        )


def _map_fields(row: Any, mapping: Mapping[str, str], line: int, src: str) -> Any:
    """A dict row with each mapped column moved to its field's name (the column must be there)."""
    if not isinstance(row, dict):
        raise DataError(
            "columns= maps named fields, but this row is not an object with named fields", source=src, line=line
        )
    _check_mapped(mapping, list(row), "the row has no field(s)", "the row has", src, line)
    out = {k: v for k, v in row.items() if k not in mapping}
    out.update({field: row[column] for field, column in mapping.items()})
    return out


def _read_file(
    path: Path,
    src: str,
    kind: TaskKind | None,
    mapping: Mapping[str, str] | None = None,
    skipped: list[DataError] | None = None,
) -> list[tuple[Any, int]]:
    """Read a data file into ``(row, line)`` pairs (``mapping``: ``{field: column}``, for the CSV header check;
    ``skipped``: where JSONL lines and CSV rows that cannot be rows go, instead of raising)."""
    if not path.exists():
        raise DataError("file not found", source=src)
    if not path.is_file():
        raise DataError("not a regular file", source=src)
    ext = path.suffix.lower()
    if ext not in _EXTENSIONS:
        raise DataError(
            f"unsupported file extension {path.suffix!r}; supported: {', '.join(_EXTENSIONS)}",
            source=src,
        )
    if ext == ".parquet":
        return [(row, i + 1) for i, row in enumerate(_read_parquet(path, src))]
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read the file: {exc.strerror or exc}", source=src) from exc
    lines = _decode_lines(raw, src)
    if ext == ".jsonl":
        return _parse_jsonl(lines, src, skipped)
    if ext == ".json":
        return _parse_json("".join(lines), src)
    return _parse_csv(
        lines, src, kind, delimiter="\t" if ext == ".tsv" else ",", mapping=mapping or {}, skipped=skipped
    )


def _read_parquet(path: Path, src: str) -> list[dict[str, Any]]:
    """The rows of a Parquet file as dicts (pyarrow, imported only here)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet files needs pyarrow: pip install pyarrow", source=src) from None
    try:
        return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"cannot read the Parquet file: {exc}", source=src) from None


def _table_rows(data: Any) -> list[Any] | None:
    """The rows of a table-like ``data`` (a dict of equal-length columns, a pandas or polars DataFrame, any other
    iterable of rows), or ``None`` when ``data`` is none of those."""
    if isinstance(data, (str, bytes, bytearray)):
        return None
    if callable(getattr(data, "to_dicts", None)):  # polars
        return list(data.to_dicts())
    if hasattr(data, "columns") and callable(getattr(data, "to_dict", None)):  # pandas
        return list(data.to_dict(orient="records"))
    if isinstance(data, Mapping):
        cols = dict(data)
        split = next((k for k, v in cols.items() if hasattr(v, "column_names") or isinstance(v, Mapping)), None)
        if split is not None:  # a Hugging Face DatasetDict, or a dict of splits
            raise DataError(
                f"a dict of data sets ({', '.join(map(repr, cols))}), not of columns: pass one of them, "
                f"e.g. data[{split!r}]",
                source=f"<{type(data).__name__}>",
            )
        bad = [k for k, v in cols.items() if isinstance(v, (str, bytes)) or not hasattr(v, "__len__")]
        if bad or not cols:
            raise DataError(
                "a dict is read as columns of equal length ({field: [values]}), but "
                + (f"{bad[0]!r} holds {type(cols[bad[0]]).__name__}" if bad else "it has no columns")
                + "; pass one row as a list of one dict",
                source="<dict>",
            )
        lengths = {k: len(v) for k, v in cols.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(
                "the columns differ in length: " + ", ".join(f"{k!r} {n}" for k, n in lengths.items()),
                source="<dict>",
            )
        return [dict(zip(cols, values)) for values in zip(*cols.values())]
    if isinstance(data, Iterable):
        return list(data)
    return None


def _decode_lines(raw: bytes, src: str) -> list[str]:
    """Decode UTF-8 bytes line by line (keeping line ends), so a bad byte is reported with its line."""
    if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark, as written by some spreadsheet programs
        raw = raw[3:]
    lines: list[str] = []
    for number, chunk in enumerate(raw.splitlines(keepends=True), start=1):
        try:
            lines.append(chunk.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(
                f"the file is not valid UTF-8: byte 0x{chunk[exc.start]:02x} at column {exc.start + 1} "
                "(re-save the file as UTF-8)",
                source=src,
                line=number,
            ) from None
    return lines


def _json_limit(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return f"value out of range ({str(exc).split(';')[0]})"


def _parse_jsonl(lines: list[str], src: str, skipped: list[DataError] | None = None) -> list[tuple[Any, int]]:
    """Each non-blank line's JSON object, with its line number (``skipped``: see :func:`_read_file`)."""
    numbered = [(text, number) for number, text in enumerate(lines, start=1) if text.strip()]
    return _each_row(numbered, lambda text, number: _jsonl_object(text, number, src), skipped)


def _jsonl_object(text: str, number: int, src: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", source=src, line=number) from None
    except (ValueError, RecursionError) as exc:  # over-deep nesting, integers over the digit limit
        raise DataError(f"invalid JSON: {_json_limit(exc)}", source=src, line=number) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"each line must be a JSON object, got {_json_type(obj)} ({_short(obj)})",
            source=src,
            line=number,
        )
    return obj


def _parse_json(text: str, src: str) -> list[tuple[Any, int]]:
    """Parse a JSON list of objects, recording the file line where each element starts."""
    try:
        top = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one object per line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise DataError(
            f"invalid JSON: {exc.msg} (column {exc.colno}){hint}",
            source=src,
            line=exc.lineno,
        ) from None
    except (ValueError, RecursionError) as exc:  # over-deep nesting, integers over the digit limit
        raise DataError(f"invalid JSON: {_json_limit(exc)}", source=src, line=1) from None
    if not isinstance(top, list):
        raise DataError(
            f"expected a JSON list of objects, got {_json_type(top)}",
            source=src,
            line=1,
        )

    # The text is valid JSON and a list, so walking it with raw_decode cannot fail; it gives each
    # element's offset, hence its line.
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    rows: list[tuple[Any, int]] = []
    for _ in range(len(top)):
        pos = _skip_json_space(text, pos)
        line = text.count("\n", 0, pos) + 1
        obj, pos = decoder.raw_decode(text, pos)
        pos = _skip_json_space(text, pos) + 1  # past ',' or ']'
        if not isinstance(obj, dict):
            raise DataError(
                f"each list element must be a JSON object, got {_json_type(obj)} ({_short(obj)})",
                source=src,
                line=line,
            )
        rows.append((obj, line))
    return rows


def _skip_json_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_type(obj: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        type(None): "null",
    }
    return names.get(type(obj), "a number")


def _parse_csv(
    lines: list[str],
    src: str,
    kind: TaskKind | None,
    *,
    delimiter: str,
    mapping: Mapping[str, str],
    skipped: list[DataError] | None = None,
) -> list[tuple[Any, int]]:
    """Parse CSV/TSV with a header row (checked to have the columns ``kind`` needs); rows become dicts."""
    reader = csv.reader(lines, delimiter=delimiter)
    what = "TSV" if delimiter == "\t" else "CSV"
    try:
        header = next(reader, None)
        # Skip leading blank lines.
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)
    except csv.Error as exc:
        raise DataError(f"invalid {what}: {exc}", source=src, line=reader.line_num) from None
    if header is None:
        return []
    header_line = reader.line_num
    columns = [name.strip() for name in header]
    _check_mapped(mapping, columns, f"the {what} header has no column(s)", "the header has", src, header_line)
    # the header as the fields will be named (the mapping is applied to each row afterwards)
    sources = set(mapping.values())
    _check_csv_header(
        [c for c in columns if c not in sources] + list(mapping),
        header_line,
        kind,
        src,
        what,
        lambda: _first_csv_row(lines, delimiter, columns, header_line),
    )

    rows: list[tuple[Any, int]] = []
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader, None)
        except csv.Error as exc:
            raise DataError(f"invalid {what}: {exc}", source=src, line=reader.line_num) from None
        if cells is None:
            break
        # A blank line, or a row of empty cells as spreadsheets write them.
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(columns):
            hint = " (an unquoted delimiter?)" if len(cells) > len(columns) else ""
            exc = DataError(
                f"the row has {len(cells)} fields but the header has {len(columns)}{hint}",
                source=src,
                line=start,
            )
            if skipped is None:
                raise exc
            skipped.append(exc)
            continue
        rows.append((dict(zip(columns, cells, strict=True)), start))
    return rows


def _first_csv_row(lines: list[str], delimiter: str, columns: list[str], header_line: int) -> dict[str, str] | None:
    """The first non-blank data row after the header as ``{column: cell}`` (``None`` when there is none or it
    cannot be parsed): what a missing-column hint guesses the columns from."""
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        for cells in reader:
            if reader.line_num > header_line and any(cell.strip() for cell in cells):
                return dict(zip(columns, cells)) if len(cells) == len(columns) else None
    except csv.Error:
        return None
    return None


def _check_csv_header(
    columns: list[str], line: int, kind: TaskKind | None, src: str, what: str, sample: Any = None
) -> None:
    """Raise unless the header has both columns of ``kind`` (of either kind when ``kind`` is None); ``sample``:
    a callable giving the first data row, for the hint."""
    present = set(columns)
    kinds = _KINDS if kind is None else (kind,)
    if any(all(name in present for name in _FIELDS[k]) for k in kinds):
        return
    # Name the missing columns of the kind the header comes closest to.
    best = max(kinds, key=lambda k: sum(name in present for name in _FIELDS[k]))
    missing = [name for name in _FIELDS[best] if name not in present]
    expected = " or ".join(f"{_FIELDS[k][0]!r} and {_FIELDS[k][1]!r}" for k in kinds)
    raise DataError(
        f"the {what} header is missing required column(s) {', '.join(repr(n) for n in missing)} "
        f"(expected {expected}); the header has: {', '.join(repr(c) for c in columns) or '(nothing)'}"
        f"{_columns_hint(missing, columns, sample() if sample is not None else None)}",
        source=src,
        line=line,
    )


# -------------------------------------------------------------------------- dev split


def split_dev(
    data: TaskData,
    fraction: float = 0.1,
    *,
    seed: int = 0,
    min_dev: int = 1,
    max_dev: int | None = None,
) -> tuple[TaskData, TaskData]:
    """Split off a held-out dev set, deterministically.

    The dev size is ``clamp(round(fraction * n), min_dev, max_dev)``, and at most ``n - 1`` so that train is
    never empty. Classification splits are stratified: dev takes from each label in proportion to its size,
    every label with at least 2 examples gives at least one dev example when the dev size allows, and a label
    keeps at least one train example whenever possible. Both parts keep the rows' original order.

    Args:
        data: the task data (at least 2 examples).
        fraction: share of examples for dev, in ``[0, 1)``.
        seed: seed of the ``random.Random`` that picks the dev rows.
        min_dev: smallest dev size (``>= 0``).
        max_dev: largest dev size, or ``None`` for no limit.

    Returns:
        ``(train, dev)``, two :class:`TaskData` with the same kind, labels and source as ``data``.

    Raises:
        DataError: ``data`` has fewer than 2 examples.
        ValueError: ``fraction``, ``min_dev`` or ``max_dev`` out of range.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    if min_dev < 0:
        raise ValueError(f"min_dev must be >= 0, got {min_dev!r}")
    if max_dev is not None and max_dev < min_dev:
        raise ValueError(f"max_dev ({max_dev!r}) must be >= min_dev ({min_dev!r})")
    n = len(data)
    if n < 2:
        raise DataError(
            f"need at least 2 examples to split off a dev set, got {n}",
            source=data.source,
        )

    k = max(round(fraction * n), min_dev)
    if max_dev is not None:
        k = min(k, max_dev)
    k = min(k, n - 1)

    rng = random.Random(seed)
    if data.kind == "classification":
        groups: dict[str, list[int]] = {label: [] for label in data.labels or []}
        for i, ex in enumerate(data.examples):
            groups.setdefault(ex.target, []).append(i)
        members = [idx for idx in groups.values() if idx]
        for idx in members:
            rng.shuffle(idx)
        take = _allocate([len(idx) for idx in members], k)
        dev_idx = {i for idx, t in zip(members, take, strict=True) for i in idx[:t]}
    else:
        dev_idx = set(rng.sample(range(n), k))

    train = [ex for i, ex in enumerate(data.examples) if i not in dev_idx]
    dev = [ex for i, ex in enumerate(data.examples) if i in dev_idx]
    labels = list(data.labels) if data.labels is not None else None
    logger.debug("split %s: %d train, %d dev (seed %d)", data.source, len(train), len(dev), seed)
    return (
        TaskData(kind=data.kind, examples=train, labels=labels, source=data.source),
        TaskData(
            kind=data.kind,
            examples=dev,
            labels=list(labels) if labels is not None else None,
            source=data.source,
        ),
    )


def _allocate(counts: list[int], k: int) -> list[int]:
    """How many dev examples each group gives: ``k`` in total, stratified.

    First one from each group of >= 2 (largest groups first, while ``k`` lasts), then the rest by largest
    deficit against the proportional share ``k * count / n``. Each group keeps one example for train unless
    that makes ``k`` impossible.
    """
    n = sum(counts)
    caps = [c - 1 for c in counts]
    if sum(caps) < k:
        caps = list(counts)
    take = [0] * len(counts)
    used = 0
    for g in sorted(range(len(counts)), key=lambda g: (-counts[g], g)):
        if used == k:
            break
        if counts[g] >= 2 and caps[g] >= 1:
            take[g] = 1
            used += 1
    # Max-heap on (share - taken); ties go to the earlier group.
    heap = [(-(k * c / n - t), g) for g, (c, t) in enumerate(zip(counts, take, strict=True)) if t < caps[g]]
    heapq.heapify(heap)
    while used < k:
        _, g = heapq.heappop(heap)
        take[g] += 1
        used += 1
        if take[g] < caps[g]:
            heapq.heappush(heap, (-(k * counts[g] / n - take[g]), g))
    return take


# ------------------------------------------------------------------------- truncation


_KEPT = {"right": "first tokens", "left": "last tokens", "middle": "first and last tokens"}


def check_truncation_side(side: Any) -> str:
    """``side`` if it is one of :data:`TRUNCATION_SIDES`, else ``ValueError``."""
    if side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {', '.join(map(repr, TRUNCATION_SIDES))}, got {side!r}")
    return side


def keep_ids(ids: Sequence[int], keep: int, side: str = "right") -> list[int]:
    """The ``keep`` tokens of ``ids`` that a cut on ``side`` keeps (all of them when ``keep >= len(ids)``):
    ``"right"`` the first ``keep``, ``"left"`` the last ``keep``, ``"middle"`` the first ``ceil(keep / 2)`` and the
    last ``floor(keep / 2)``."""
    ids = list(ids)
    check_truncation_side(side)
    if keep >= len(ids):
        return ids
    if keep <= 0:
        return []
    if side == "right":
        return ids[:keep]
    if side == "left":
        return ids[len(ids) - keep :]
    head = (keep + 1) // 2
    return ids[:head] + ids[len(ids) - (keep - head) :]


def truncate_inputs(
    data: TaskData, tokenizer: PreTrainedTokenizerBase, max_tokens: int, *, hint: str = "", side: str = "right"
) -> TaskData:
    """Cut every input longer than ``max_tokens`` tokens down to ``max_tokens`` tokens, on ``side``
    (:data:`TRUNCATION_SIDES`: ``"right"`` keeps the first tokens, ``"left"`` the last, ``"middle"`` both ends).

    Tokens are counted with ``tokenizer(text, add_special_tokens=False)["input_ids"]``; a cut input is the
    decoded kept tokens (``skip_special_tokens=True``), shortened further if re-tokenizing it would still exceed
    ``max_tokens``; it keeps the text as given in ``Example.uncut``. Targets are left alone. One ``UserWarning`` reports how many inputs were cut, the limit, what
    was kept and where the first one is, followed by ``hint`` (what the caller's user can do about it).

    Args:
        data: the task data.
        tokenizer: a Hugging Face tokenizer (the backbone's).
        max_tokens: the largest input length in tokens (``>= 1``).
        hint: text appended to the warning (e.g. ``"; raise max_input_tokens to keep more"``).
        side: where to cut.

    Returns:
        A new :class:`TaskData` with the cut inputs, or ``data`` itself when no input was too long.

    Raises:
        ValueError: ``max_tokens < 1``, or an unknown ``side``.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}")
    check_truncation_side(side)

    examples: list[Example] = []
    first: tuple[int, Example] | None = None
    n_cut = 0
    for i, ex in enumerate(data.examples):
        ids = _token_ids(tokenizer, ex.input)
        if len(ids) <= max_tokens:
            examples.append(ex)
            continue
        n_cut += 1
        if first is None:
            first = (i, ex)
        examples.append(dataclasses.replace(ex, input=_cut_ids(tokenizer, ids, max_tokens, side), uncut=ex.whole_input))

    if first is None:
        return data
    index, ex = first
    where = f"{data.source}:{ex.line}" if ex.line is not None else f"{data.source} row {index + 1}"
    warnings.warn(
        f"truncated {n_cut} of {len(data)} inputs to {max_tokens} tokens, keeping each one's {_KEPT[side]} (first: "
        f"{where}){hint}",
        UserWarning,
        stacklevel=2,
    )
    return dataclasses.replace(data, examples=examples)


def warn_long_targets(data: TaskData, tokenizer: PreTrainedTokenizerBase, max_tokens: int, *, hint: str = "") -> int:
    """Warn once (``UserWarning``) if generation targets are too long for ``max_tokens`` target tokens, the cap
    :func:`promptbank.causal.encode_target` applies in training (with the end-of-text token: at most
    ``max_tokens - 1`` of the target's own tokens stay). Returns how many targets that cuts; classification data
    (labels) is not checked: 0."""
    if data.kind != "generation":
        return 0
    n_cut, first = 0, None
    for i, ex in enumerate(data.examples):
        if len(_token_ids(tokenizer, " " + ex.target)) >= max_tokens:
            n_cut += 1
            if first is None:
                first = f"{data.source}:{ex.line}" if ex.line is not None else f"{data.source} row {i + 1}"
    if n_cut:
        warnings.warn(
            f"cut {n_cut} of {len(data)} targets to their first {max_tokens - 1} tokens and the end-of-text token "
            f"(first: {first}); generation stops after {max_tokens} new tokens by default{hint}",
            UserWarning,
            stacklevel=2,
        )
    return n_cut


def cut_to_tokens(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int, side: str = "right") -> str:
    """``text`` cut to ``max_tokens`` tokens on ``side`` as :func:`truncate_inputs` cuts a training input (the
    same string for the same text, limit and side), or ``text`` itself when it fits. No warning."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens!r}")
    check_truncation_side(side)
    ids = _token_ids(tokenizer, text)
    return text if len(ids) <= max_tokens else _cut_ids(tokenizer, ids, max_tokens, side)


def _token_ids(tokenizer, text: str) -> list[int]:
    # verbose=False: counting a text longer than the model's limit is the point here, not a mistake to warn of
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _cut_ids(tokenizer, ids: list[int], max_tokens: int, side: str = "right") -> str:
    """The decoded tokens of ``ids`` that a cut on ``side`` keeps, as many as re-tokenize to at most ``max_tokens``
    tokens: decoding then re-tokenizing is not always the identity (BPE merges across a cut), so shorten until the
    result fits."""
    keep = max_tokens
    text = tokenizer.decode(keep_ids(ids, keep, side), skip_special_tokens=True)
    while keep > 1 and len(_token_ids(tokenizer, text)) > max_tokens:
        keep -= 1
        text = tokenizer.decode(keep_ids(ids, keep, side), skip_special_tokens=True)
    return text

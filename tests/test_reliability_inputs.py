"""Bad input everywhere (issue 6, item 5): property-based tests (hypothesis) of the task-data loaders and the CLI's
argument handling. Every failure must be a documented exception whose message names the offending source and
line or value -- never a stack trace from deep inside a parser."""

from __future__ import annotations

import csv
import io
import json
import string
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from promptbank.cli import build_parser, main  # noqa: E402
from promptbank.errors import DataError  # noqa: E402
from promptbank.tasks import load_task_data  # noqa: E402

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(["text", "label", "input", "target", "other", ""])
rows = st.one_of(
    st.dictionaries(field_names, json_values, max_size=4),
    st.tuples(json_values, json_values),
    st.lists(json_values, max_size=3),
    json_values,
)


def _check_error(e: Exception, source: str) -> None:
    assert isinstance(e, DataError), f"{type(e).__name__}: {e}"
    assert str(e).startswith(f"{source}:"), str(e)
    assert "Traceback" not in str(e)


# ---------------------------------------------------------------------------------------------- data loaders


@FAST
@given(data=st.lists(rows, max_size=6), kind=st.sampled_from([None, "classification", "generation"]))
def test_any_list_of_rows_loads_or_raises_a_data_error_naming_the_row(data, kind):
    try:
        td = load_task_data(data, kind=kind)
    except Exception as e:  # noqa: BLE001 - the property: only DataError, with its source
        _check_error(e, "<list>")
        return
    assert len(td) == len(data) and all(ex.input and ex.target for ex in td.examples)


@FAST
@given(raw=st.binary(max_size=300), ext=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
@example(raw=b"text,label\n\xff,a\n", ext=".csv")
@example(raw=b"\xef\xbb\xbftext\tlabel\na\tb\nc\td\n", ext=".tsv")
def test_any_file_bytes_load_or_raise_a_data_error_naming_the_file(tmp_path_factory, raw, ext):
    path = tmp_path_factory.mktemp("data") / f"data{ext}"
    path.write_bytes(raw)
    try:
        load_task_data(path)
    except Exception as e:  # noqa: BLE001
        _check_error(e, str(path))


@pytest.mark.parametrize(
    "raw, ext",
    [
        (b"[" * 5000, ".json"),
        (b"[" * 5000 + b"\n", ".jsonl"),
        (b'{"text": "a", "label": ' + b"9" * 5000 + b"}", ".jsonl"),
    ],
    ids=["deep-json", "deep-jsonl", "huge-int"],
)
def test_json_bombs_in_data_files_raise_data_errors(tmp_path, raw, ext):
    path = tmp_path / f"data{ext}"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=rf"{path}:1: invalid JSON"):
        load_task_data(path)


text_cells = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip()
)


@FAST
@given(
    examples=st.lists(st.tuples(text_cells, st.sampled_from(["pos", "neg", "a b", "ü"])), min_size=2, max_size=8),
    ext=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]),
)
def test_valid_rows_written_in_any_format_read_back_the_same(tmp_path_factory, examples, ext):
    labels = list(dict.fromkeys(lab for _, lab in examples))
    hypothesis.assume(len(labels) >= 2)
    path = tmp_path_factory.mktemp("data") / f"data{ext}"
    records = [{"text": t, "label": lab} for t, lab in examples]
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif ext == ".json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, ["text", "label"], delimiter="\t" if ext == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(records)
        path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    td = load_task_data(path)
    assert [(ex.input, ex.target) for ex in td.examples] == [(t.strip(), lab) for t, lab in examples]
    assert td.labels == labels


# ---------------------------------------------------------------------------------------------- CLI arguments

COMMANDS = ["learn", "list", "route", "predict", "generate", "remove", "eval", "demo", "nope"]
OPTIONS = [
    "--steps", "--lr", "--batch-size", "--tokens", "--layers", "--seed", "--top-k", "--max-new-tokens",
    "--temperature", "--method", "--kind", "--init", "--task", "--json", "--file", "--bank", "--quiet", "-v",
]  # fmt: skip
words = st.one_of(
    st.sampled_from(COMMANDS + OPTIONS),
    st.text(alphabet=string.printable, max_size=12),
    st.integers(-5, 5).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
)


@FAST
@given(argv=st.lists(words, max_size=6))
def test_any_argv_parses_or_exits_with_a_usage_error(argv, capsys):
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as e:
        assert e.code in (0, 2)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if e.code == 2:
            assert "error:" in err


@FAST
@given(
    option=st.sampled_from(["--steps", "--batch-size", "--tokens", "--seed", "--lr", "--layers"]),
    value=st.one_of(st.text(max_size=10), st.integers(-3, 3).map(str), st.floats().map(str)),
)
def test_numeric_options_accept_valid_values_or_name_the_bad_one(option, value, capsys):
    parser = build_parser()
    try:
        args = parser.parse_args(["learn", "t", "d.jsonl", option, value])
    except SystemExit as e:
        assert e.code == 2
        err = capsys.readouterr().err
        assert option in err or repr(value) in err or value in err, err
        return
    parsed = getattr(args, option.lstrip("-").replace("-", "_"))
    if option == "--layers":
        assert parsed and all(isinstance(x, int) and x >= 0 for x in parsed)
    elif option == "--lr":
        assert parsed > 0 and parsed != float("inf")
    elif option == "--seed":
        assert isinstance(parsed, int)
    else:
        assert isinstance(parsed, int) and parsed >= 1


@FAST
@given(
    command=st.sampled_from(["list", "route", "predict", "remove", "eval"]),
    rest=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=10), max_size=3),
)
def test_commands_on_a_missing_bank_fail_with_one_line(tmp_path_factory, command, rest, capsys):
    bank = tmp_path_factory.mktemp("cli") / "no_bank"
    rc = main(["--bank", str(bank), command, *rest])
    err = capsys.readouterr().err
    assert rc in (1, 2), (rc, err)
    assert "Traceback" not in err
    if rc == 1:
        assert len(err.strip().splitlines()) == 1 and err.startswith("promptbank: error: "), err
        assert not Path(bank).exists()  # a failed command creates nothing

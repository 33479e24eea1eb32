"""Tests for the command line (``promptbank.cli.main``), run in-process on a tiny backbone saved to a folder and
the hashing embedder: exit codes, one-line errors, ``--json`` output and the learn -> list -> route -> predict ->
remove round trip."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
import warnings
from pathlib import Path

import pytest
from conftest import make_tiny_model, make_tiny_tokenizer

from promptbank.cli import main
from promptbank.errors import TaskNotFoundError

BILLING = [
    ("I was charged twice on my invoice", "billing"),
    ("refund the duplicate payment on my card", "billing"),
    ("my invoice shows the wrong price", "billing"),
    ("the card payment was billed two times", "billing"),
    ("I cannot log in after the password reset", "account"),
    ("reset my password please, login fails", "account"),
    ("my account is locked after a login attempt", "account"),
    ("change the email on my account login", "account"),
]
WEATHER = [
    ("heavy rain and thunder expected tonight", "storm"),
    ("a storm with strong wind is coming", "storm"),
    ("thunder and lightning over the hills", "storm"),
    ("wind and rain warning for the coast", "storm"),
    ("clear blue sky and warm sunshine today", "sunny"),
    ("sunshine all afternoon with a clear sky", "sunny"),
    ("a warm sunny day at the beach", "sunny"),
    ("bright sun and no clouds in the sky", "sunny"),
]
FAST = ["--steps", "3", "--batch-size", "4", "--tokens", "4", "--quiet"]


def _write_jsonl(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows), encoding="utf-8")
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("promptbank: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A tiny saved backbone plus two small data files, built once for the module."""
    root = tmp_path_factory.mktemp("cli")
    tok = make_tiny_tokenizer()
    model = make_tiny_model(len(tok))
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    _write_jsonl(root / "billing.jsonl", BILLING)
    _write_jsonl(root / "weather.jsonl", WEATHER)
    return root


@pytest.fixture(scope="module")
def model_opts(workdir) -> list[str]:
    return ["--backbone", str(workdir / "tiny"), "--embedder", "hashing"]


@pytest.fixture(scope="module")
def learned_bank(workdir, model_opts) -> Path:
    """A bank with tasks "billing" (prompt tuning) and "weather" (deep prompt on layers 0 and 1), learned
    through the CLI. Tests that change a bank copy it first."""
    bank = workdir / "bank"
    assert main([*model_opts, "learn", "billing", str(workdir / "billing.jsonl"), "--bank", str(bank), *FAST]) == 0
    # Global options after the command name work too.
    assert (
        main(
            [
                "learn",
                "weather",
                str(workdir / "weather.jsonl"),
                "--bank",
                str(bank),
                "--method",
                "deep",
                "--layers",
                "1",
                *model_opts,
                *FAST,
            ]
        )
        == 0
    )
    return bank


@pytest.fixture
def bank_copy(learned_bank, tmp_path) -> Path:
    dest = tmp_path / "bank"
    shutil.copytree(learned_bank, dest)
    return dest


# ---------------------------------------------------------------------------------------------- round trip


def test_learn_prints_summary_and_creates_bank(workdir, model_opts, tmp_path, capsys):
    bank = tmp_path / "new_bank"
    rc, out, err = run(
        capsys,
        *model_opts,
        "learn",
        "billing",
        str(workdir / "billing.jsonl"),
        "--bank",
        str(bank),
        *FAST,
        "--seed",
        "1",
        "--lr",
        "0.05",
    )
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 1
    assert "learned 'billing'" in out and "3 steps" in out and "dev loss" in out and "dev accuracy" in out
    assert "warm start from none" in out
    assert (bank / "promptbank.json").is_file()


def test_learn_precision_bf16_is_recorded(workdir, model_opts, tmp_path, capsys, monkeypatch):
    from promptbank import train

    monkeypatch.setattr(train, "_cpu_has_native_bf16", lambda: True)  # the bf16 path on any CPU
    bank = tmp_path / "b16"
    argv = [*model_opts, "learn", "billing", str(workdir / "billing.jsonl"), "--bank", str(bank), *FAST]
    rc, out, err = run(capsys, *argv, "--precision", "bf16")
    assert rc == 0, err
    manifest = json.loads((bank / "promptbank.json").read_text())
    assert manifest["tasks"]["billing"]["train_config"]["precision"] == "bf16"
    rc, _, err = run(capsys, *argv, "--precision", "fp16")
    assert rc == 2 and "invalid choice: 'fp16'" in err
    monkeypatch.setattr(train, "_cpu_has_native_bf16", lambda: False)  # emulated bf16: fp32, one warning line
    argv[argv.index(str(bank))] = str(tmp_path / "b16_emulated")
    rc, _, err = run(capsys, *argv, "--precision", "bf16")
    assert rc == 0 and "promptbank: warning: precision='bf16': this CPU has no native bf16" in err
    manifest = json.loads((tmp_path / "b16_emulated" / "promptbank.json").read_text())
    assert manifest["tasks"]["billing"]["train_config"]["precision"] == "fp32"


def test_library_warnings_print_as_one_line(workdir, model_opts, tmp_path, capsys):
    """A warning from the library (here: inputs cut to the token limit) is one 'promptbank: warning:' line, not
    Python's file:line format with the source line; --debug keeps Python's format (which pytest records instead of
    printing: the warning is then not on stderr)."""
    data = tmp_path / "long.jsonl"
    rows = [{"text": "word " * 400, "label": "a"}] + [{"text": f"short {i}", "label": "ab"[i % 2]} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for debug in (False, True):
        argv = [
            *model_opts,
            *(["--debug"] if debug else []),
            "learn",
            "t",
            str(data),
            "--bank",
            str(tmp_path / f"b{debug}"),
        ]
        with warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            rc, _, err = run(capsys, *argv, *FAST)
        assert rc == 0, err
        lines = [line for line in err.splitlines() if "truncated 1 of" in line]
        if debug:
            assert not lines and any("truncated 1 of" in str(w.message) for w in recorded)
        else:
            assert lines == [line for line in err.splitlines() if "warning" in line.lower()]
            assert len(lines) == 1 and lines[0].startswith("promptbank: warning: truncated 1 of 9 inputs to 256 tokens")


def test_learn_warm_starts_from_a_stored_task(workdir, model_opts, bank_copy, capsys):
    rc, out, err = run(
        capsys, *model_opts, "learn", "billing2", str(workdir / "billing.jsonl"), "--bank", str(bank_copy), *FAST
    )
    assert rc == 0, err
    assert "warm start from billing" in out
    rc, out, _ = run(
        capsys,
        *model_opts,
        "learn",
        "billing3",
        str(workdir / "billing.jsonl"),
        "--bank",
        str(bank_copy),
        *FAST,
        "--no-warm-start",
    )
    assert rc == 0 and "warm start from none" in out


def test_list_shows_a_table_of_tasks(learned_bank, capsys):
    rc, out, _ = run(capsys, "list", "--bank", str(learned_bank))
    assert rc == 0
    header, *rows = out.strip().splitlines()
    assert header.split() == ["NAME", "KIND", "METHOD", "TOKENS", "LABELS", "DEV_ACC", "STEPS"]
    assert [r.split()[:5] for r in rows] == [
        ["billing", "classification", "prompt_tuning", "4", "2"],
        ["weather", "classification", "deep", "4", "2"],
    ]


def test_list_json(learned_bank, capsys):
    rc, out, _ = run(capsys, "list", "--json", "--bank", str(learned_bank))
    assert rc == 0
    tasks = json.loads(out)
    assert [t["name"] for t in tasks] == ["billing", "weather"]
    assert tasks[0]["labels"] == ["billing", "account"] and tasks[0]["steps"] == 3
    assert tasks[1]["method"] == "deep" and tasks[1]["layers"] == [0, 1]
    assert tasks[0]["variants"] == ["main"] and tasks[0]["truncation_side"] == "right"  # auto, for classification
    assert tasks[0]["max_input_tokens"] == 256 and tasks[0]["imported_from"] is None
    assert tasks[0]["threshold"] is None  # the learned router's thresholds come from all keys: route shows them


def test_list_json_gives_the_stored_threshold_of_a_cosine_routed_bank(bank_copy, capsys):
    from promptbank.storage import manifest_digest

    path = bank_copy / "promptbank.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["index"]["scorer"] = "knn"
    manifest["manifest_sha256"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest), encoding="utf-8")
    rc, out, _ = run(capsys, "list", "--json", "--bank", str(bank_copy))
    stored = manifest["tasks"]["billing"]["threshold"]
    assert rc == 0 and json.loads(out)[0]["threshold"] == stored and isinstance(stored, float)


def test_list_uses_bank_from_environment(learned_bank, monkeypatch, capsys):
    monkeypatch.setenv("PROMPTBANK_BANK", str(learned_bank))
    rc, out, _ = run(capsys, "list")
    assert rc == 0 and "billing" in out


def test_bank_option_before_the_command(learned_bank, tmp_path, monkeypatch, capsys):
    """--bank works before the command name as after it (the one after wins); without either, $PROMPTBANK_BANK;
    the demo keeps its own default (None: it picks a folder) instead of the environment's bank."""
    from promptbank.cli import build_parser, resolve_bank

    rc, out, _ = run(capsys, "--bank", str(learned_bank), "list")
    assert rc == 0 and "billing" in out
    rc, out, err = run(capsys, "--bank", str(tmp_path / "none"), "list", "--bank", str(learned_bank))
    assert rc == 0 and "billing" in out
    monkeypatch.setenv("PROMPTBANK_BANK", str(learned_bank))
    assert resolve_bank(build_parser().parse_args(["list"])).bank == str(learned_bank)
    assert resolve_bank(build_parser().parse_args(["demo"])).bank is None
    assert resolve_bank(build_parser().parse_args(["--bank", "x", "demo"])).bank == "x"


def test_route_ranks_tasks(learned_bank, capsys):
    texts = ["I was charged twice on my card invoice", "thunder and rain storm tonight"]
    rc, out, _ = run(capsys, "route", *texts, "--bank", str(learned_bank))
    assert rc == 0
    assert "1. billing" in out and "1. weather" in out and "->" in out

    rc, out, _ = run(capsys, "route", *texts, "--json", "--top-k", "1", "--bank", str(learned_bank))
    assert rc == 0
    routes = json.loads(out)
    assert [r["text"] for r in routes] == texts
    assert [r["ranked"][0]["task"] for r in routes] == ["billing", "weather"]
    assert all(len(r["ranked"]) == 1 and r["task"] in (None, "billing", "weather") for r in routes)
    for r in routes:  # the decision and the threshold it was made by
        first = r["ranked"][0]
        assert r["score"] == first["score"] and r["threshold"] == first["threshold"]
        guard_ok = r["guard"] is None or r["guard"]["score"] >= r["guard"]["threshold"]
        assert r["task"] == (first["task"] if r["score"] >= r["threshold"] and guard_ok else None)


def test_route_says_why_a_query_went_to_no_task(learned_bank, capsys, monkeypatch):
    from promptbank.lda import GaussianRouter

    monkeypatch.setattr(GaussianRouter, "threshold", lambda self, name: 0.0)  # scores are < 0: every query rejected
    rc, out, _ = run(capsys, "route", "thunder and rain storm tonight", "--json", "--bank", str(learned_bank))
    got = json.loads(out)[0]
    assert rc == 0 and got["task"] is None and got["threshold"] == 0.0 and got["score"] < 0
    rc, out, _ = run(capsys, "route", "thunder and rain storm tonight", "--bank", str(learned_bank))
    first = got["ranked"][0]
    assert f"(no task: {first['task']} scores {got['score']:.4f}, under its threshold 0.0000)" in out
    assert f"1. {first['task']}  {first['score']:.4f}  (threshold 0.0000)" in out
    assert out.rstrip().endswith("`promptbank add-routing-examples TASK TEXT...`; no training)")  # what to do about it


def test_route_names_the_guard_a_query_failed(learned_bank, capsys, monkeypatch):
    from promptbank.lda import GaussianRouter

    unguarded = GaussianRouter.route_guarded

    def guarded(self, x, top_k=3):  # the same ranking, with the other task as a guard the query fails
        ranked, _ = unguarded(self, x, top_k=top_k)
        return ranked, [(next(n for n in self.names if n != r[0][0]), -50.0) for r in ranked]

    monkeypatch.setattr(GaussianRouter, "route_guarded", guarded)
    monkeypatch.setattr(GaussianRouter, "threshold", lambda self, name: -40.0)  # the first task passes it
    rc, out, _ = run(capsys, "route", "thunder and rain storm tonight", "--json", "--bank", str(learned_bank))
    got = json.loads(out)[0]
    assert rc == 0 and got["task"] is None and got["score"] >= got["threshold"]
    other = got["guard"]["task"]
    assert other != got["ranked"][0]["task"] and got["guard"]["score"] == -50.0 and got["guard"]["threshold"] == -40.0
    rc, out, _ = run(capsys, "route", "thunder and rain storm tonight", "--bank", str(learned_bank))
    assert (
        f"(no task: {got['ranked'][0]['task']} ranks first by label groups, but {other}, first by whole tasks, "
        "scores -50.0000, under its threshold -40.0000)"
    ) in out


def test_predict_routes_and_prints_output_task_and_score(learned_bank, capsys):
    rc, out, _ = run(capsys, "predict", "refund my invoice payment", "--bank", str(learned_bank))
    assert rc == 0
    header, row = out.strip().splitlines()
    assert header.split() == ["OUTPUT", "TASK", "SCORE", "TEXT"]
    assert row.split()[0] in ("billing", "account", "-")

    rc, out, _ = run(capsys, "predict", "refund my invoice payment", "sunny sky", "--json", "--bank", str(learned_bank))
    preds = json.loads(out)
    assert rc == 0 and len(preds) == 2
    for p in preds:
        assert set(p) == {"text", "output", "task", "route_score", "label_scores"}
        assert p["route_score"] is not None


def test_predict_with_task_and_file(learned_bank, tmp_path, capsys):
    queries = tmp_path / "queries.jsonl"
    queries.write_text('{"text": "strong wind on the coast"}\n\n"clear sky"\n', encoding="utf-8")
    rc, out, err = run(
        capsys, "predict", "--task", "weather", "--file", str(queries), "--json", "--bank", str(learned_bank)
    )
    assert rc == 0, err
    preds = json.loads(out)
    assert [p["text"] for p in preds] == ["strong wind on the coast", "clear sky"]
    assert all(p["task"] == "weather" and p["output"] in ("storm", "sunny") for p in preds)
    assert all(p["route_score"] is None and set(p["label_scores"]) == {"storm", "sunny"} for p in preds)


def test_predict_reads_csv_and_named_fields(learned_bank, tmp_path, capsys):
    """--file takes CSV/TSV with a header too; --columns names the text's column (or JSONL key); a file without
    one is a one-line error naming the columns it has."""
    table = tmp_path / "queries.csv"
    table.write_text('id,query\n1,"strong wind, on the coast"\n2,clear sky\n', encoding="utf-8")
    args = ["predict", "--task", "weather", "--file", str(table), "--json", "--bank", str(learned_bank)]
    rc, out, err = run(capsys, *args, "--columns", "text=query")
    assert rc == 0, err
    assert [p["text"] for p in json.loads(out)] == ["strong wind, on the coast", "clear sky"]
    rc, _, err = run(capsys, *args)
    assert rc == 1
    assert_one_line_error(err, "queries.csv:1", "no column 'text' or 'input'", "'id', 'query'", "--columns text=COLUMN")

    rows = tmp_path / "queries.jsonl"
    rows.write_text('{"query": "gale warning"}\n', encoding="utf-8")
    rc, out, err = run(
        capsys, "route", "--file", str(rows), "--columns", "text=query", "--json", "--bank", str(learned_bank)
    )
    assert rc == 0, err
    assert [r["text"] for r in json.loads(out)] == ["gale warning"]


def test_predict_reads_json_lists_and_parquet(learned_bank, tmp_path, capsys):
    """--file also takes a JSON list (strings or objects) and Parquet; a bad element is named by its number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    listed = tmp_path / "queries.json"
    listed.write_text('[\n  "clear sky",\n  {"text": "gale warning"}\n]\n', encoding="utf-8")
    table = tmp_path / "queries.parquet"
    pq.write_table(pa.table({"id": [1, 2], "query": ["strong wind", "sunny spells"]}), table)
    base = ["predict", "--task", "weather", "--json", "--bank", str(learned_bank)]
    rc, out, err = run(capsys, *base, "--file", str(listed))
    assert rc == 0, err
    assert [p["text"] for p in json.loads(out)] == ["clear sky", "gale warning"]
    rc, out, err = run(capsys, *base, "--file", str(table), "--columns", "text=query")
    assert rc == 0, err
    assert [p["text"] for p in json.loads(out)] == ["strong wind", "sunny spells"]
    rc, _, err = run(capsys, *base, "--file", str(table))  # no text column: named by its row
    assert rc == 1
    assert_one_line_error(err, "queries.parquet: row 1", 'an object with a "text" string')
    listed.write_text('["clear sky", 7]', encoding="utf-8")
    rc, _, err = run(capsys, *base, "--file", str(listed))
    assert rc == 1
    assert_one_line_error(err, "queries.json: element 2")


def test_generate(learned_bank, capsys):
    rc, out, err = run(
        capsys,
        "generate",
        "rain tonight",
        "--task",
        "weather",
        "--max-new-tokens",
        "3",
        "--json",
        "--bank",
        str(learned_bank),
    )
    assert rc == 0, err
    (gen,) = json.loads(out)
    assert gen["task"] == "weather" and isinstance(gen["output"], str)


def test_generate_shows_a_progress_bar_past_one_batch_unless_quiet(learned_bank, capsys):
    texts = [f"rain tonight {i}" for i in range(17)]  # 16 rows per batch
    args = ["generate", *texts, "--task", "weather", "--max-new-tokens", "2", "--json", "--bank", str(learned_bank)]
    rc, out, err = run(capsys, *args)
    assert rc == 0 and "generate" in err and "/17" in err
    rc, quiet_out, err = run(capsys, *args, "--quiet")
    assert rc == 0 and "generate" not in err and quiet_out == out


def test_eval_reports_task_and_routed_accuracy(workdir, learned_bank, capsys):
    rc, out, _ = run(capsys, "eval", "billing", str(workdir / "billing.jsonl"), "--bank", str(learned_bank))
    assert rc == 0 and out.startswith("billing: accuracy ") and "on 8 examples" in out

    rc, out, _ = run(
        capsys, "eval", "billing", str(workdir / "billing.jsonl"), "--routed", "--json", "--bank", str(learned_bank)
    )
    result = json.loads(out)
    assert rc == 0 and result["task"] == "billing" and result["n"] == 8
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["routed"]["accuracy"] <= 1


def test_eval_on_a_file_of_one_label(learned_bank, tmp_path, capsys):
    rows = [{"query": text, "queue": label} for text, label in BILLING if label == "billing"]
    one = tmp_path / "billing_only.jsonl"
    _write_jsonl(one, [(r["query"], r["queue"]) for r in rows])
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got = []
    for path, extra in ((one, []), (renamed, ["--columns", "text=query,label=queue"])):
        rc, out, err = run(
            capsys, "eval", "billing", str(path), "--routed", "--json", *extra, "--bank", str(learned_bank)
        )
        assert rc == 0, err
        got.append(json.loads(out))
    assert got[0] == got[1] and got[0]["n"] == len(rows) and 0 <= got[0]["accuracy"] <= 1
    foreign = tmp_path / "foreign.jsonl"
    _write_jsonl(foreign, [("my invoice is wrong", "billing"), ("it is raining", "weather")])
    rc, _, err = run(capsys, "eval", "billing", str(foreign), "--bank", str(learned_bank))
    assert rc == 1
    assert_one_line_error(err, "foreign.jsonl:2: unknown label 'weather'; allowed labels: ")


def test_eval_skip_invalid_rows(workdir, learned_bank, tmp_path, capsys):
    """--skip-invalid drops the bad rows of a messy file with one warning line; without it the first one stops."""
    messy = tmp_path / "messy.jsonl"
    good = (workdir / "billing.jsonl").read_text(encoding="utf-8").splitlines()
    messy.write_text("\n".join([good[0], '{"text": "", "label": "x"}', "not json", *good[1:]]) + "\n", encoding="utf-8")
    rc, _, err = run(capsys, "eval", "billing", str(messy), "--bank", str(learned_bank))
    assert rc == 1
    assert_one_line_error(err, "messy.jsonl:3", "invalid JSON")  # the file is parsed before rows are checked
    rc, out, err = run(capsys, "eval", "billing", str(messy), "--skip-invalid", "--bank", str(learned_bank))
    assert rc == 0, err
    assert "on 8 examples" in out
    warnings = [line for line in err.splitlines() if line.startswith("promptbank: warning:")]
    assert len(warnings) == 1 and "skipped 2 invalid row(s) of 10" in warnings[0] and "messy.jsonl:2" in warnings[0]


def test_eval_reports_generation_scores(workdir, bank_copy, model_opts, capsys):
    qa = workdir / "qa.jsonl"
    rows = [{"input": f"capital of country {i}?", "target": f"city {i % 3}"} for i in range(8)]
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert main(["learn", "qa", str(qa), "--bank", str(bank_copy), *FAST]) == 0
    summary = capsys.readouterr().out
    assert "learned 'qa' (generation" in summary and "answers scored by `promptbank eval qa DATA`" in summary
    rc, out, err = run(capsys, "eval", "qa", str(qa), "--bank", str(bank_copy))
    assert rc == 0, err
    assert out.startswith("qa: exact match ") and ", F1 " in out and "target loss" in out and "on 8 examples" in out
    rc, out, _ = run(
        capsys, "eval", "qa", str(qa), "--routed", "--json", "--max-new-tokens", "3", "--bank", str(bank_copy)
    )
    got = json.loads(out)
    assert rc == 0 and got["task"] == "qa" and got["n"] == 8 and set(got["routed"]) == {"exact_match", "f1", "n"}
    assert 0 <= got["f1"] <= 1 and got["loss"] > 0
    rc, _, err = run(capsys, "eval", "billing", str(qa), "--bank", str(bank_copy))
    assert rc == 1
    assert_one_line_error(err, "classification task", "generation data")
    rc, _, err = run(capsys, "eval", "qa", str(qa), "--max-new-tokens", "0", "--bank", str(bank_copy))
    assert rc != 0 and "--max-new-tokens must be >= 1" in err


def test_columns_name_the_fields_of_other_data(workdir, bank_copy, capsys):
    """--columns maps a CSV's own column names for learn (data and --dev), eval and compare; a bad spec or a
    missing column is a one-line error."""
    reviews = workdir / "reviews.csv"
    rows = [("great battery", "pos"), ("broke in a day", "neg"), ("love the screen", "pos"), ("awful", "neg")] * 3
    reviews.write_text("id,review,stars\n" + "".join(f"{i},{t},{lab}\n" for i, (t, lab) in enumerate(rows)))
    cols = ["--columns", "text=review,label=stars"]
    rc, out, err = run(
        capsys, "learn", "reviews", str(reviews), *cols, "--dev", str(reviews), "--bank", str(bank_copy), *FAST
    )
    assert rc == 0, err
    assert "learned 'reviews' (classification, 2 labels" in out
    rc, out, err = run(capsys, "eval", "reviews", str(reviews), *cols, "--json", "--bank", str(bank_copy))
    assert rc == 0, err
    assert json.loads(out)["n"] == len(rows)
    rc, out, err = run(capsys, "compare", "reviews", str(reviews), *cols, "--json", "--bank", str(bank_copy))
    assert rc == 0 and json.loads(out)["variants"][0]["n"] == len(rows)

    rc, _, err = run(capsys, "eval", "reviews", str(reviews), "--columns", "text", "--bank", str(bank_copy))
    assert rc == 1
    assert_one_line_error(err, "--columns takes FIELD=COLUMN pairs")
    rc, _, err = run(
        capsys, "eval", "reviews", str(reviews), "--columns", "text=body,label=stars", "--bank", str(bank_copy)
    )
    assert rc == 1
    assert_one_line_error(err, "reviews.csv:1", "no column(s) 'body'")
    rc, _, err = run(capsys, "eval", "reviews", str(reviews), "--bank", str(bank_copy))  # without --columns
    assert rc == 1
    assert_one_line_error(err, "missing required column(s) 'text', 'label'")


def test_remove_saves_the_bank(bank_copy, capsys):
    rc, out, _ = run(capsys, "remove", "weather", "--bank", str(bank_copy))
    assert rc == 0 and "removed 'weather'" in out
    rc, out, _ = run(capsys, "list", "--json", "--bank", str(bank_copy))
    assert [t["name"] for t in json.loads(out)] == ["billing"]
    assert not (bank_copy / "tasks" / "weather").exists()


# ---------------------------------------------------------------------------------------------- failures


def test_unknown_task_is_a_one_line_error(learned_bank, capsys):
    rc, out, err = run(capsys, "predict", "hello", "--task", "nope", "--bank", str(learned_bank))
    assert rc == 1 and out == ""
    assert_one_line_error(err, "'nope'")
    rc, _, err = run(capsys, "remove", "nope", "--bank", str(learned_bank))
    assert rc == 1
    assert_one_line_error(err, "'nope'")


def test_debug_reraises(learned_bank, capsys):
    with pytest.raises(TaskNotFoundError):
        main(["--debug", "predict", "hello", "--task", "nope", "--bank", str(learned_bank)])


def test_missing_data_file_names_the_file(model_opts, tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    rc, _, err = run(capsys, *model_opts, "learn", "t", str(missing), "--bank", str(tmp_path / "b"), *FAST)
    assert rc == 1
    assert_one_line_error(err, str(missing))
    assert not (tmp_path / "b").exists()


def test_bad_data_row_names_file_and_line(model_opts, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n', encoding="utf-8")
    rc, _, err = run(capsys, *model_opts, "learn", "t", str(data), "--bank", str(tmp_path / "b"), *FAST)
    assert rc == 1
    assert_one_line_error(err, f"{data}:2")
    assert not (tmp_path / "b").exists()


def test_learning_an_existing_task_fails(workdir, model_opts, learned_bank, capsys):
    rc, _, err = run(
        capsys, *model_opts, "learn", "billing", str(workdir / "billing.jsonl"), "--bank", str(learned_bank), *FAST
    )
    assert rc == 1
    assert_one_line_error(err, "already exists")


def test_bad_method_is_a_usage_error(workdir, capsys):
    rc, _, err = run(capsys, "learn", "t", str(workdir / "billing.jsonl"), "--method", "bogus")
    assert rc == 2 and "invalid choice: 'bogus'" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["learn", "t", "d.jsonl", "--steps", "0"],
        ["learn", "t", "d.jsonl", "--layers", "a,b"],
        ["predict"],
        ["route", "--top-k", "-1", "x"],
        ["frobnicate"],
        [],
    ],
)
def test_usage_errors_exit_2(argv, tmp_path, capsys):
    rc, out, err = run(capsys, *argv, *(["--bank", str(tmp_path)] if argv[:1] in (["predict"], ["route"]) else []))
    assert rc == 2 and "usage:" in err


def test_help_exits_0(capsys):
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "learn" in out and "predict" in out


@pytest.mark.parametrize(
    "command", [["list"], ["route", "x"], ["predict", "x"], ["remove", "t"], ["promote", "t", "v"]]
)
def test_missing_bank_is_a_one_line_error(command, tmp_path, capsys):
    where = tmp_path / "nowhere"
    rc, out, err = run(capsys, *command, "--bank", str(where))
    assert rc == 1 and out == ""
    assert_one_line_error(err, f"no bank at {where}")


# ---------------------------------------------------------------------------------------------- demo


def test_demo_passes_options_to_run_demo(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("promptbank.demo")
    fake.run_demo = lambda **kw: calls.append(kw)
    monkeypatch.setitem(sys.modules, "promptbank.demo", fake)
    assert main(["demo", "--steps", "2", "--data", str(tmp_path), "--bank", str(tmp_path / "b")]) == 0
    assert main(["--embedder", "hashing", "demo"]) == 0
    assert calls == [{"data_dir": str(tmp_path), "steps": 2, "bank_dir": str(tmp_path / "b")}, {"embedder": "hashing"}]


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(**kw):
        raise KeyboardInterrupt

    fake = types.ModuleType("promptbank.demo")
    fake.run_demo = interrupted
    monkeypatch.setitem(sys.modules, "promptbank.demo", fake)
    rc, _, err = run(capsys, "demo")
    assert rc == 130 and "interrupted" in err


# ---------------------------------------------------------------------------------------------- variants


def test_learn_variant_compare_and_promote(workdir, bank_copy, capsys):
    bank = str(bank_copy)
    data = str(workdir / "billing.jsonl")
    rc, out, err = run(
        capsys, "learn", "billing", data, "--variant", "mlp", "--method", "ptuning_mlp", "--bank", bank, *FAST
    )
    assert rc == 0, err
    assert "learned variant 'mlp' of 'billing' (ptuning_mlp, 4 tokens)" in out and "'billing' serves 'main'" in out

    rc, out, _ = run(capsys, "compare", "billing", data, "--bank", bank)
    lines = out.strip().splitlines()
    assert rc == 0 and lines[0].split() == ["VARIANT", "SERVING", "METHOD", "ACCURACY", "LOSS", "N"]
    assert lines[1].split()[:3] == ["main", "*", "prompt_tuning"] and lines[2].split()[:2] == ["mlp", "ptuning_mlp"]
    rc, out, _ = run(capsys, "compare", "billing", data, "--json", "--bank", bank)
    report = json.loads(out)
    assert rc == 0 and report["task"] == "billing" and [v["variant"] for v in report["variants"]] == ["main", "mlp"]
    assert all(v["n"] == 8 and 0 <= v["accuracy"] <= 1 and v["loss"] > 0 for v in report["variants"])

    rc, out, _ = run(capsys, "promote", "billing", "mlp", "--bank", bank)
    assert rc == 0 and "'billing' now serves variant 'mlp' (was 'main')" in out
    rc, out, _ = run(capsys, "promote", "billing", "mlp", "--bank", bank)
    assert rc == 0 and "already serves variant 'mlp'" in out
    rc, out, _ = run(capsys, "compare", "billing", data, "--json", "--bank", bank)
    assert [(v["variant"], v["serving"]) for v in json.loads(out)["variants"]] == [("mlp", True), ("main", False)]
    assert json.loads(out)["variants"][0]["accuracy"] == report["variants"][1]["accuracy"]


def test_variant_errors_are_one_line(workdir, learned_bank, capsys):
    bank = str(learned_bank)
    data = str(workdir / "billing.jsonl")
    rc, out, err = run(capsys, "promote", "billing", "nope", "--bank", bank)
    assert rc == 1 and out == ""
    assert_one_line_error(err, "no prompt variant 'nope'", "variants: main")
    rc, _, err = run(capsys, "promote", "nope", "main", "--bank", bank)
    assert rc == 1
    assert_one_line_error(err, "no task named 'nope'")
    rc, _, err = run(capsys, "learn", "billing", data, "--variant", "main", "--bank", bank, *FAST)
    assert rc == 1
    assert_one_line_error(err, "already has a prompt variant 'main'")
    rc, _, err = run(capsys, "learn", "nope", data, "--variant", "b", "--bank", bank, *FAST)
    assert rc == 1
    assert_one_line_error(err, "no task named 'nope'")
    rc, _, err = run(capsys, "learn", "billing", data, "--variant", "../b", "--bank", bank, *FAST)
    assert rc == 1
    assert_one_line_error(err, "invalid variant name '../b'")
    rc, _, err = run(capsys, "learn", "billing", data, "--variant", "b", "--kind", "generation", "--bank", bank)
    assert rc == 2 and "--kind does not apply to --variant" in err
    rc, _, err = run(capsys, "compare", "billing", str(workdir / "missing.jsonl"), "--bank", bank)
    assert rc == 1
    assert_one_line_error(err, "missing.jsonl not found")
    rc, _, err = run(capsys, "compare", "billing", str(workdir / "weather.jsonl"), "--bank", bank)
    assert rc == 1  # weather's labels are not billing's
    assert_one_line_error(err, "weather.jsonl")


def test_list_reads_the_manifest_only(learned_bank):
    """`list` needs no model: in a fresh interpreter it prints the tasks without importing torch or transformers."""
    import subprocess

    code = (
        "import sys; from promptbank.cli import main; "
        f"rc = main(['list', '--bank', {str(learned_bank)!r}]); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "print('HEAVY', heavy); sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "billing" in done.stdout and "weather" in done.stdout
    assert "HEAVY []" in done.stdout


def test_no_probe_reaches_the_train_options():
    from promptbank.cli import _learn_options, build_parser

    base = ["learn", "t", "data.jsonl"]
    assert "probe" not in _learn_options(build_parser().parse_args(base))  # TrainConfig's default (on)
    assert _learn_options(build_parser().parse_args([*base, "--no-probe"]))["probe"] is False
    assert "probe_refit" not in _learn_options(build_parser().parse_args(base))
    assert _learn_options(build_parser().parse_args([*base, "--no-probe-refit"]))["probe_refit"] is False
    assert "balance_labels" not in _learn_options(build_parser().parse_args(base))
    assert _learn_options(build_parser().parse_args([*base, "--balance-labels"]))["balance_labels"] is True


def test_learn_with_balance_labels_records_it(workdir, model_opts, tmp_path, capsys):
    from promptbank import PromptBank

    bank = tmp_path / "bank"
    rc, _, err = run(
        capsys,
        *model_opts,
        "learn",
        "b",
        str(workdir / "billing.jsonl"),
        "--balance-labels",
        "--bank",
        str(bank),
        *FAST,
    )
    assert rc == 0, err
    assert PromptBank.load(bank).tasks["b"].train_config["balance_labels"] is True


def test_objective_reaches_the_train_options():
    from promptbank.cli import _learn_options, build_parser

    base = ["learn", "t", "data.jsonl"]
    assert "objective" not in _learn_options(build_parser().parse_args(base))  # TrainConfig's default ("lm")
    for value in ("lm", "labels", "labels+lm"):
        assert _learn_options(build_parser().parse_args([*base, "--objective", value]))["objective"] == value
    with pytest.raises(SystemExit):
        build_parser().parse_args([*base, "--objective", "ranking"])


def test_learn_summary_names_the_prompted_heads_dev_accuracy_next_to_the_probed_one():
    """The progress bar shows the prompted head's dev accuracy; an encoder task with a probe reports the combined
    one, so the summary line gives both when they differ."""
    from promptbank.cli import _dev_accuracy

    history = [{"step": 10, "dev_accuracy": 0.5}, {"step": 20, "dev_accuracy": 0.64}, {"step": 30, "loss": 1.0}]
    rec = types.SimpleNamespace(
        kind="classification", dev_accuracy=0.52, best_step=20, history=history, train_config={"probe": True}
    )
    assert _dev_accuracy(rec, True) == "dev accuracy 0.520 with the embedding probe (0.640 for the prompted head alone)"
    # a causal LM's progress bar shows the label ranking's dev accuracy (label objectives)
    assert (
        _dev_accuracy(rec, False) == "dev accuracy 0.520 with the embedding probe (0.640 for the label ranking alone)"
    )
    rec.train_config = {"probe": False}
    assert _dev_accuracy(rec, True) == "dev accuracy 0.520"
    rec.train_config, rec.dev_accuracy = {"probe": True}, 0.64
    assert _dev_accuracy(rec, True) == "dev accuracy 0.640"  # the same: said once
    rec.num_dev = 6  # a handful of dev rows: said, since the number then jumps by 17 points per row
    assert _dev_accuracy(rec, True) == ("dev accuracy 0.640 (on 6 dev rows: noisy; --dev FILE gives a larger dev set)")
    rec.num_dev = 40
    assert _dev_accuracy(rec, True) == "dev accuracy 0.640"


def test_learn_sets_the_input_and_target_token_caps(workdir, model_opts, tmp_path, capsys):
    """--max-input-tokens, --max-target-tokens and --truncation-side reach the task's training settings: a long input
    is cut to the given cap on the given side (the warning names it and the option), and the record keeps them all
    (inference reads them)."""
    data = tmp_path / "long.jsonl"
    rows = [{"text": "word " * 40, "label": "a"}] + [{"text": f"short {i}", "label": "ab"[i % 2]} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bank = tmp_path / "b"
    argv = [*model_opts, "learn", "t", str(data), "--bank", str(bank), "--max-input-tokens", "12"]
    rc, _, err = run(capsys, *argv, "--max-target-tokens", "9", *FAST)
    assert rc == 0, err
    (line,) = [line for line in err.splitlines() if "truncated" in line]
    assert "truncated 1 of 9 inputs to 12 tokens" in line and "--max-input-tokens" in line
    assert "first tokens" in line and "(--truncation-side)" in line  # the classification default, how to change it
    train_config = json.loads((bank / "promptbank.json").read_text())["tasks"]["t"]["train_config"]
    assert train_config["max_input_tokens"] == 12 and train_config["max_target_tokens"] == 9
    assert train_config["truncation_side"] == "right"
    rc, _, err = run(capsys, *model_opts, "learn", "u", str(data), "--bank", str(bank), "--max-input-tokens", "0")
    assert rc == 2 and "--max-input-tokens" in err
    # --truncation-side: the task keeps its inputs' last tokens
    argv = [*model_opts, "learn", "v", str(data), "--bank", str(bank), "--max-input-tokens", "12"]
    rc, _, err = run(capsys, *argv, "--truncation-side", "left", *FAST)
    assert rc == 0, err
    (line,) = [line for line in err.splitlines() if "truncated" in line]
    assert "keeping each one's last tokens" in line and "--truncation-side" not in line
    train_config = json.loads((bank / "promptbank.json").read_text())["tasks"]["v"]["train_config"]
    assert train_config["truncation_side"] == "left"
    rc, _, err = run(capsys, *argv, "--truncation-side", "end", *FAST)
    assert rc == 2 and "--truncation-side" in err


def test_learn_with_a_template_and_resume_from_the_cli(workdir, model_opts, tmp_path, capsys):
    """--template sets how inputs are shown (\\n a line break; without {input} a usage error); resume continues the
    stored prompt: more steps, the same routing keys, the new total printed; an unknown task is a one-line error."""
    bank = tmp_path / "b"
    rc, _, err = run(
        capsys,
        *model_opts,
        "learn",
        "t",
        str(workdir / "billing.jsonl"),
        "--bank",
        str(bank),
        "--template",
        "Ticket: {input}\\nQueue:",
        *FAST,
    )
    assert rc == 0, err
    manifest = json.loads((bank / "promptbank.json").read_text())
    assert manifest["tasks"]["t"]["template"] == "Ticket: {input}\nQueue:"
    steps, keys = manifest["tasks"]["t"]["steps"], (bank / "tasks" / "t" / "keys.safetensors").read_bytes()
    rc, out, err = run(
        capsys,
        *model_opts,
        "resume",
        "t",
        str(workdir / "billing.jsonl"),
        "--bank",
        str(bank),
        "--steps",
        "2",
        "--quiet",
    )
    assert rc == 0, err
    manifest = json.loads((bank / "promptbank.json").read_text())
    assert manifest["tasks"]["t"]["steps"] == steps + 2 and f"2 more steps ({steps + 2} in all" in out
    assert (bank / "tasks" / "t" / "keys.safetensors").read_bytes() == keys
    rc, _, err = run(capsys, *model_opts, "resume", "nope", str(workdir / "billing.jsonl"), "--bank", str(bank))
    assert rc == 1
    assert_one_line_error(err, "nope")
    rc, _, err = run(
        capsys, *model_opts, "learn", "u", str(workdir / "billing.jsonl"), "--bank", str(bank), "--template", "x"
    )
    assert rc == 2 and "--template must be a string with {input} as its only field" in err


def test_remove_variant(workdir, bank_copy, capsys):
    bank = str(bank_copy)
    data = str(workdir / "billing.jsonl")
    assert run(capsys, "learn", "billing", data, "--variant", "alt", "--bank", bank, *FAST)[0] == 0
    rc, _, err = run(capsys, "remove", "billing", "--variant", "main", "--bank", bank)
    assert rc == 1  # the serving prompt is not removed this way
    assert_one_line_error(err, "main")
    rc, out, _ = run(capsys, "list", "--bank", bank)
    header, *rows = out.strip().splitlines()
    assert header.split()[-1] == "VARIANTS" and rows[0].split()[-1] == "main*,alt" and rows[1].split()[-1] == "main*"
    rc, out, _ = run(capsys, "list", "--json", "--bank", bank)
    assert [(t["variant"], t["variants"]) for t in json.loads(out)] == [("main", ["main", "alt"]), ("main", ["main"])]
    rc, out, err = run(capsys, "remove", "billing", "--variant", "alt", "--bank", bank)
    assert rc == 0, err
    assert "removed variant 'alt' of 'billing'" in out and "variants left: main" in out
    rc, out, _ = run(capsys, "list", "--json", "--bank", bank)
    assert {t["name"] for t in json.loads(out)} == {"billing", "weather"}  # the task itself stays
    rc, _, err = run(capsys, "remove", "billing", "--variant", "alt", "--bank", bank)
    assert rc == 1
    assert_one_line_error(err, "no prompt variant 'alt'")


def test_import_peft_files_an_adapter_as_a_task(workdir, model_opts, bank_copy, tmp_path, capsys):
    """A PEFT prompt-tuning adapter saved by PEFT on the bank's backbone becomes a task that serves like a learned
    one; bad folders are one-line errors."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(workdir / "tiny")
    torch.manual_seed(3)
    pm = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm.save_pretrained(tmp_path / "adapter", safe_serialization=True)
    bank = str(bank_copy)
    data = str(workdir / "weather.jsonl")
    rc, out, err = run(capsys, "import-peft", "peft_weather", str(tmp_path / "adapter"), data, "--bank", bank)
    assert rc == 0, err
    assert "imported 'peft_weather' (classification, PROMPT_TUNING, 4 tokens)" in out and "(3 tasks)" in out
    rc, out, _ = run(capsys, "list", "--json", "--bank", bank)
    assert {t["name"] for t in json.loads(out)} == {"billing", "weather", "peft_weather"}
    rc, out, err = run(capsys, "predict", "a storm tonight", "--task", "peft_weather", "--json", "--bank", bank)
    assert rc == 0 and json.loads(out)[0]["output"] in ("storm", "sunny"), err

    # a saved bank's task folder (billing: prompt tuning) imports with that task's own template, no --template
    rc, out, err = run(
        capsys,
        "import-peft",
        "billing2",
        str(bank_copy / "tasks" / "billing"),
        str(workdir / "billing.jsonl"),
        "--bank",
        bank,
    )
    assert rc == 0, err
    records = json.loads((bank_copy / "promptbank.json").read_text(encoding="utf-8"))["tasks"]
    assert records["billing2"]["template"] == records["billing"]["template"] != records["peft_weather"]["template"]

    rc, _, err = run(capsys, "import-peft", "x", str(tmp_path / "missing"), data, "--bank", bank)
    assert rc == 1
    assert_one_line_error(err, "adapter folder", "missing not found")
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "import-peft", "x", str(tmp_path / "empty"), data, "--bank", bank)
    assert rc == 1
    assert_one_line_error(err, "adapter_config.json")
    rc, _, err = run(capsys, "import-peft", "peft_weather", str(tmp_path / "adapter"), data, "--bank", bank)
    assert rc == 1
    assert_one_line_error(err, "already exists")


def test_file_reads_plain_text_lines(learned_bank, tmp_path, capsys, monkeypatch):
    """Plain text, one per line: .txt files, and stdin whose first line is not JSON; a .jsonl file stays strict."""
    import io

    base = ["predict", "--task", "weather", "--json", "--bank", str(learned_bank)]
    lines = tmp_path / "queries.txt"
    lines.write_text('strong wind on the coast\n\n  "clear" sky  \n{not json}\n', encoding="utf-8")
    rc, out, err = run(capsys, *base, "--file", str(lines))
    assert rc == 0, err
    assert [p["text"] for p in json.loads(out)] == ["strong wind on the coast", '"clear" sky', "{not json}"]

    monkeypatch.setattr("sys.stdin", io.StringIO("gale warning\nsunny spells\n"))
    rc, out, err = run(capsys, *base, "--file", "-")
    assert rc == 0, err
    assert [p["text"] for p in json.loads(out)] == ["gale warning", "sunny spells"]

    monkeypatch.setattr("sys.stdin", io.StringIO('\n{"text": "gale warning"}\n"sunny spells"\n'))
    rc, out, err = run(capsys, *base, "--file", "-")
    assert rc == 0, err
    assert [p["text"] for p in json.loads(out)] == ["gale warning", "sunny spells"]

    monkeypatch.setattr("sys.stdin", io.StringIO('{"text": "gale warning"}\nsunny spells\n'))
    rc, _, err = run(capsys, *base, "--file", "-")  # JSONL from its first line on: a plain line is an error
    assert rc == 1
    assert_one_line_error(err, "<stdin>:2", "invalid JSON")

    strict = tmp_path / "queries.jsonl"
    strict.write_text("gale warning\n", encoding="utf-8")
    rc, _, err = run(capsys, *base, "--file", str(strict))
    assert rc == 1
    assert_one_line_error(err, "queries.jsonl:1", "invalid JSON")

    rc, _, err = run(capsys, *base, "--file", str(lines), "--columns", "text=query")
    assert rc == 1
    assert_one_line_error(err, "queries.txt", "plain text")


def test_add_routing_examples_then_remove_them(workdir, bank_copy, model_opts, capsys, tmp_path):
    queries = ["INVOICE #4471 OVERDUE", "STATEMENT #5310 PAST DUE"]  # billing, in a format none of its rows has
    rc, out, _ = run(capsys, *model_opts, "route", *queries, "--json", "--bank", str(bank_copy))
    before = [r["task"] for r in json.loads(out)]
    assert "billing" not in before
    examples = tmp_path / "examples.csv"
    rows = [f"{d} #{n} {s}" for d in ("INVOICE", "STATEMENT") for n, s in [(1093, "OVERDUE"), (2210, "PAST DUE")]]
    rows += ["INVOICE #7781 DUE NOW", "STATEMENT #6602 DUE NOW"]
    examples.write_text("query\n" + "\n".join(rows) + "\n", encoding="utf-8")
    argv = ["add-routing-examples", "billing", "INVOICE #3348 UNPAID", "--file", str(examples)]
    rc, out, _ = run(capsys, *model_opts, *argv, "--columns", "text=query", "--quiet", "--bank", str(bank_copy))
    assert rc == 0 and "added 7 routing examples to 'billing'" in out and "(7 added in all;" in out
    rc, out, _ = run(capsys, *model_opts, "route", *queries, "--json", "--bank", str(bank_copy))
    assert [r["task"] for r in json.loads(out)] == ["billing", "billing"]
    rc, out, _ = run(capsys, "list", "--json", "--bank", str(bank_copy))
    assert {t["name"]: t.get("routing_examples", 0) for t in json.loads(out)} == {"billing": 7, "weather": 0}
    rc, out, _ = run(capsys, *model_opts, "remove", "billing", "--routing-examples", "--bank", str(bank_copy))
    assert rc == 0 and "removed 7 routing examples from 'billing'" in out
    rc, out, _ = run(capsys, *model_opts, "route", *queries, "--json", "--bank", str(bank_copy))
    assert [r["task"] for r in json.loads(out)] == before
    rc, out, _ = run(capsys, "list", "--json", "--bank", str(bank_copy))
    assert [t["name"] for t in json.loads(out)] == ["billing", "weather"]  # the task itself stays


def test_add_routing_examples_errors(bank_copy, model_opts, capsys):
    rc, _, err = run(capsys, *model_opts, "add-routing-examples", "nope", "some text", "--bank", str(bank_copy))
    assert rc == 1
    assert_one_line_error(err, "nope")
    rc, _, err = run(capsys, *model_opts, "add-routing-examples", "weather", "--bank", str(bank_copy))
    assert rc == 2 and "give at least one TEXT or --file" in err
    rc, _, err = run(capsys, "remove", "weather", "--variant", "v", "--routing-examples", "--bank", str(bank_copy))
    assert rc == 2 and "not allowed with" in err
    rc, out, _ = run(capsys, "list", "--json", "--bank", str(bank_copy))
    assert all(t["routing_examples"] == 0 for t in json.loads(out))  # nothing was added or removed


def test_name_and_data_errors_come_before_any_model_loads(workdir, bank_copy, tmp_path, capsys, monkeypatch):
    """Unknown or taken task names and bad data files are one-line errors from the manifest and the file alone: no
    backbone is loaded for them (a load takes ~10 s on the default model)."""
    import io

    import promptbank.cli as cli

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(cli, "_load_bank", no_load)
    nolabel = tmp_path / "nolabel.jsonl"
    nolabel.write_text('{"text": "no label here"}\n', encoding="utf-8")
    data = str(workdir / "weather.jsonl")
    for argv, fragment in [
        (["predict", "hi", "--task", "nosuch"], "no task named 'nosuch' in the bank (tasks: billing, weather)"),
        (["generate", "hi", "--task", "nosuch"], "no task named 'nosuch'"),
        (["eval", "nosuch", data], "no task named 'nosuch'"),
        (["compare", "nosuch", data], "no task named 'nosuch'"),
        (["resume", "nosuch", data], "no task named 'nosuch'"),
        (["promote", "nosuch", "v"], "no task named 'nosuch'"),
        (["remove", "nosuch"], "no task named 'nosuch'"),
        (["add-routing-examples", "nosuch", "hi"], "no task named 'nosuch'"),
        (["learn", "weather", data], "task 'weather' already exists"),
        (["learn", "weather", str(nolabel), "--variant", "v2"], "label"),  # a variant: its data checked first
        (["learn", "fresh", str(nolabel)], "label"),
        (["eval", "weather", str(nolabel)], "label"),
    ]:
        rc, _, err = run(capsys, *argv, "--bank", str(bank_copy))
        assert rc == 1, (argv, err)
        assert_one_line_error(err, fragment)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    rc, _, err = run(capsys, "predict", "--file", "-", "--bank", str(bank_copy))
    assert rc == 1
    assert_one_line_error(err, "<stdin>: no texts")


def test_another_backbone_for_a_bank_says_to_drop_the_option(learned_bank, tmp_path, capsys):
    tok = make_tiny_tokenizer()
    other = make_tiny_model(len(tok), seed=1)  # same shape, other weights: another fingerprint
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    capsys.readouterr()  # transformers' "Writing model shards" bar
    argv = ["--backbone", str(tmp_path / "other"), "--embedder", "hashing", "predict", "rain tonight"]
    rc, _, err = run(capsys, *argv, "--bank", str(learned_bank))
    assert rc == 1
    assert_one_line_error(err, "fingerprint mismatch", "drop --backbone", "The bank was built on backbone")
    assert "allow_mismatch" not in err  # a Python option the CLI does not have


def test_a_causal_backbone_for_an_encoder_bank_names_the_banks_backbone(workdir, tmp_path, capsys):
    from conftest import make_tiny_bert

    from promptbank import PromptBank
    from promptbank.embed import HashingEmbedder

    bert = make_tiny_bert()
    bert.model.save_pretrained(tmp_path / "bert")
    bert.tokenizer.save_pretrained(tmp_path / "bert")
    bank = PromptBank.from_pretrained(str(tmp_path / "bert"), embedder=HashingEmbedder(dim=128), kind="encoder")
    bank.learn_task("weather", str(workdir / "weather.jsonl"), max_steps=1, num_virtual_tokens=2)
    bank.save(tmp_path / "enc_bank")
    capsys.readouterr()
    argv = ["--backbone", str(workdir / "tiny"), "--embedder", "hashing", "route", "rain tonight"]
    rc, _, err = run(capsys, *argv, "--bank", str(tmp_path / "enc_bank"))
    assert rc == 1
    assert_one_line_error(
        err,
        "the bank was built on encoder backbone",
        "cannot be loaded as one",
        "not a BERT-family encoder",
        "drop --backbone",
    )


def test_quiet_silences_the_default_models_first_use(learned_bank, workdir, monkeypatch, capsys):
    """--quiet: the default model's one-time download and conversion run without pip's output or a progress bar."""
    import promptbank.backbone as backbone_mod
    from promptbank.cli import _uses_default_model

    calls = []

    class Stop(Exception):
        pass

    def fake(cache=None, *, progress=True):
        calls.append(progress)
        raise Stop

    monkeypatch.setattr(backbone_mod, "ensure_default_model", fake)
    ns = argparse.Namespace
    assert _uses_default_model(ns(backbone=None, bank=str(workdir / "none")), create=True)
    assert not _uses_default_model(ns(backbone=str(workdir / "tiny"), bank=None), create=True)
    assert not _uses_default_model(ns(backbone=None, bank=str(learned_bank)), create=False)  # records the tiny model
    with pytest.raises(Stop):
        main(["learn", "t", str(workdir / "weather.jsonl"), "--bank", str(workdir / "fresh"), "--quiet"])
    assert calls == [False]

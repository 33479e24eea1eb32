"""The README says what the code does: the CLI synopsis lists every command and option the parser has, the
benchmark table lists every benchmark script, and every benchmark script and result file the README and
benchmarks/RESULTS.md name exists (checked by reading the files: no models, no data)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from promptbank.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
RESULTS = (ROOT / "benchmarks" / "RESULTS.md").read_text(encoding="utf-8")


def _cli_synopsis() -> str:
    section = README[README.index("\n## CLI\n") :]
    return re.search(r"```\n(.*?)```", section, re.S).group(1)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_cli_synopsis_lists_every_command_and_option():
    synopsis = _cli_synopsis()
    lines = synopsis.splitlines()
    subs = _subcommands(build_parser())
    assert set(subs) == {m.group(1) for line in lines[1:] if (m := re.match(r"  ([\w-]+)\b", line))}
    for name, sub in subs.items():
        # the command's lines: from "  name" to the next command's line
        start = next(i for i, line in enumerate(lines) if re.match(rf"  {name}(?![\w-])", line))
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"  \w", lines[i])), len(lines))
        text = "\n".join(lines[start:end]) + "\n" + lines[0]  # the global options are on the first line
        for action in sub._actions:
            flags = action.option_strings
            if not flags or "--help" in flags:
                continue
            shown = any(re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text) for f in flags)
            assert shown, f"README CLI synopsis: `{name}` lacks {flags}"


def test_every_benchmark_script_is_in_the_readme_table():
    scripts = {p.name for p in (ROOT / "benchmarks").glob("*.py")} - {"bench_common.py"}
    table = README[README.index("**Every benchmark, its command") :]
    table = table[: table.index("\n## ")]
    listed = set(re.findall(r"benchmarks/(\w+\.py)", table))
    assert scripts == listed


def test_files_the_docs_name_exist():
    text = README + RESULTS
    named = set(re.findall(r"benchmarks/(?:results/)?[\w.-]+\.(?:py|json|png)", text))
    assert named, "no file names found: the pattern is wrong"
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"named in README.md / benchmarks/RESULTS.md but not in the repository: {missing}"


def test_readme_python_api_block_runs(tiny_backbone, hashing_embedder, tmp_path, monkeypatch):
    """The README's Python API block runs as written on the tiny model (3 training steps per call), with its files
    made up: every call it shows exists and takes the arguments it shows."""
    import json
    import shutil
    import warnings

    from promptbank import PromptBank

    block = re.search(r"## Python API\n+```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)

    def write(name, rows):
        Path(name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    tickets = [{"text": f"{w} problem number {i}", "label": w} for i in range(8) for w in ("billing", "shipping")]
    write("tickets.jsonl", tickets)
    write("tickets_test.jsonl", tickets[:6])
    write("trec.jsonl", [{"text": f"who or where {i}?", "label": ["HUM", "LOC"][i % 2]} for i in range(8)])
    write("ag_news.jsonl", [{"text": f"news {i}", "label": ["World", "Sports"][i % 2]} for i in range(8)])
    write("faq_test.jsonl", [{"input": f"question {i}", "target": f"answer {i}"} for i in range(4)])
    write("reviews.jsonl", [{"text": f"review {i}", "label": ["good", "bad"][i % 2]} for i in range(8)])

    real_train_config = PromptBank._train_config
    monkeypatch.setattr(
        PromptBank,
        "_train_config",
        lambda self, opts: real_train_config(self, {**opts, "max_steps": 3, "batch_size": 4, "progress": False}),
    )
    monkeypatch.setattr(
        PromptBank, "from_pretrained", classmethod(lambda cls, *a, **k: cls(tiny_backbone, hashing_embedder))
    )
    real_load = PromptBank.load.__func__
    monkeypatch.setattr(
        PromptBank,
        "load",
        classmethod(lambda cls, path, **k: real_load(cls, path, tiny_backbone, embedder=hashing_embedder)),
    )
    # a PEFT prompt-tuning adapter for import_peft: a saved bank's task folder is one
    other = PromptBank(tiny_backbone, hashing_embedder)
    other.learn_task("src", "reviews.jsonl", method="prompt_tuning")
    other.save("src_bank")
    shutil.copytree("src_bank/tasks/src", "peft_adapter_dir")

    scope = {"texts": ["my card was charged twice", "where is my parcel"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. bf16 falling back to fp32 on this CPU
        exec(block, scope)  # noqa: S102 - our own README
    bank = scope["bank"]
    assert set(bank.tasks) == {"tickets", "qtype", "news", "reviews"}  # "faq" was removed
    assert set(bank.variants("tickets")) == {"deep"}  # "main" removed after promoting "deep"


def test_every_config_field_is_documented_in_the_readme():
    import dataclasses

    from promptbank.config import PromptConfig, TrainConfig

    fields = [f.name for c in (TrainConfig, PromptConfig) for f in dataclasses.fields(c)]
    missing = [f for f in fields if not re.search(rf"(?<![\w]){f}(?![\w])", README)]
    assert not missing, f"TrainConfig / PromptConfig fields the README does not name: {missing}"

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
    assert set(subs) == {m.group(1) for line in lines[1:] if (m := re.match(r"  (\w+)\b", line))}
    for name, sub in subs.items():
        # the command's lines: from "  name" to the next command's line
        start = next(i for i, line in enumerate(lines) if re.match(rf"  {name}\b", line))
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

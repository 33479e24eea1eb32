"""Command line interface: ``promptbank learn | list | route | predict | generate | add-routing-examples | remove |
eval | compare | promote | demo``.

Every command works on one bank folder (``--bank DIR``, default ``$PROMPTBANK_BANK`` or ``./promptbank_bank``).
Exit status: 0 success, 1 expected failure (one line ``promptbank: error: ...`` on stderr; ``--debug`` shows the
traceback), 2 usage error, 130 interrupted. torch and transformers are imported inside the commands only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import TRUNCATION_SIDES
from .errors import BackboneMismatchError, DataError, PromptBankError

if TYPE_CHECKING:
    from .bank import PromptBank

logger = logging.getLogger(__name__)

PROG = "promptbank"
DEFAULT_BANK = "./promptbank_bank"
BANK_ENV = "PROMPTBANK_BANK"
METHODS = ("prompt_tuning", "ptuning_mlp", "ptuning_lstm", "deep")
MANIFEST = "promptbank.json"  # same name as storage.MANIFEST; kept here so `--help` imports nothing heavy


class CLIError(Exception):
    """An expected failure detected by the CLI itself (exit status 1)."""


# ---------------------------------------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _label_words(text: str) -> dict[str, str]:
    """A JSON object ``{"label": "text", ...}``, inline or in a ``.json`` file -> the dict."""
    source = "inline JSON"
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise argparse.ArgumentTypeError(
                f'expected a JSON object like \'{{"ABBR": "abbreviation"}}\' or a .json file holding one; '
                f"no file {text!r}"
            )
        source, text = str(path), path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise argparse.ArgumentTypeError(f"{source}: expected a JSON object of label -> text strings")
    return value


def _layer_list(text: str) -> list[int]:
    """``"0,3,5"`` -> ``[0, 3, 5]``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        layers = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 0,3,5, got {text!r}") from None
    if not layers or any(x < 0 for x in layers):
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers like 0,3,5, got {text!r}")
    return layers


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (the bank default is read from ``$PROMPTBANK_BANK`` when this is called)."""
    bank_default = os.environ.get(BANK_ENV) or DEFAULT_BANK

    def add_globals(p: argparse.ArgumentParser, *, suppress: bool) -> None:
        # Accepted before and after the command name; SUPPRESS keeps a subcommand from resetting a value
        # given before it.
        def d(value: Any) -> Any:
            return argparse.SUPPRESS if suppress else value

        p.add_argument(
            "--backbone",
            metavar="NAME_OR_DIR",
            default=d(None),
            help="backbone model: a local model folder or a name (default: SmolLM2-135M-Instruct; "
            "for an existing bank, the one it was made with)",
        )
        p.add_argument(
            "--embedder",
            metavar="NAME",
            default=d(None),
            help="routing embedder: all-MiniLM-L6-v2+mid (default), all-MiniLM-L6-v2+layers=3,2 (half the "
            "latency), 'hashing[-DIM]' or a folder (for an existing bank: the one it was made with)",
        )
        p.add_argument("-v", "--verbose", action="store_true", default=d(False), help="log progress (INFO)")
        p.add_argument("--debug", action="store_true", default=d(False), help="show tracebacks on errors")

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Continual learning with soft prompts on one frozen language model: one soft prompt per "
        "task, chosen for each input by embedding routing.",
        epilog=f"The bank folder is --bank DIR, else ${BANK_ENV}, else {DEFAULT_BANK}.",
    )
    add_globals(parser, suppress=False)
    # --bank is accepted before the command too; its default is applied after parsing (resolve_bank), so that a
    # subcommand cannot reset a folder given before it, and the demo keeps its own default
    parser.add_argument("--bank", metavar="DIR", default=argparse.SUPPRESS, help="bank folder (also after COMMAND)")
    common = argparse.ArgumentParser(add_help=False)
    add_globals(common, suppress=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, *, bank_option: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        if bank_option:
            p.add_argument(
                "--bank",
                metavar="DIR",
                default=argparse.SUPPRESS,
                help=f"bank folder (default: ${BANK_ENV} or {DEFAULT_BANK}; now {bank_default})",
            )
            p.set_defaults(_bank_default=bank_default)
        p.set_defaults(_parser=p)
        return p

    p = command("learn", "train a soft prompt for a new task and save it in the bank (creating the bank if needed)")
    p.add_argument("name", metavar="NAME", help="task name (letters, digits, '_', '.', '-')")
    p.add_argument(
        "data",
        metavar="DATA",
        help="training data: .jsonl/.json/.csv/.tsv/.parquet with {text,label} or {input,target} rows",
    )
    p.add_argument(
        "--method", choices=METHODS, default="prompt_tuning", help="soft-prompt method (default: %(default)s)"
    )
    p.add_argument("--dev", metavar="FILE", help="dev data (default: hold out part of DATA)")
    _add_columns_option(p)
    p.add_argument("--steps", type=_positive_int, metavar="N", help="optimizer steps (default: 100)")
    p.add_argument("--lr", type=_positive_float, metavar="X", help="learning rate (default: the method's)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="examples per step (default: 8)")
    p.add_argument(
        "--tokens",
        type=_positive_int,
        metavar="P",
        default=20,
        help="virtual tokens in the soft prompt (default: %(default)s)",
    )
    p.add_argument(
        "--layers",
        type=_layer_list,
        metavar="L,L,...",
        help="deep prompts only: layers that get prompt vectors, e.g. 0,3,5 (default: all)",
    )
    p.add_argument(
        "--max-input-tokens",
        type=_positive_int,
        metavar="N",
        help="cut longer inputs to N backbone tokens, in training and (classification) at inference (default: 256)",
    )
    p.add_argument(
        "--truncation-side",
        choices=("auto", *TRUNCATION_SIDES),
        help="where a longer input is cut: right keeps its first tokens, left its last (a question after a long "
        "context), middle its first and last halves; auto: middle for generation, right for classification "
        "(default: auto)",
    )
    p.add_argument(
        "--max-target-tokens",
        type=_positive_int,
        metavar="N",
        help="generation: longest target answer trained on, in tokens (longer ones are cut), and the default answer "
        "length at inference (default: 64)",
    )
    p.add_argument("--seed", type=int, metavar="N", help="random seed (default: 0)")
    p.add_argument(
        "--no-warm-start",
        action="store_true",
        help="do not start from the nearest stored soft prompts (use --init instead)",
    )
    p.add_argument(
        "--init",
        choices=("text", "vocab"),
        help="initial soft prompt when not warm-started: tokens of an instruction naming the labels (text, "
        "default) or random vocabulary tokens (vocab)",
    )
    p.add_argument(
        "--objective",
        choices=("lm", "labels", "labels+lm"),
        help="classification on a causal LM: train on the gold label's tokens (lm, default), on ranking the gold "
        "label above the others as predict does (labels), or both (labels+lm)",
    )
    p.add_argument(
        "--no-probe",
        action="store_true",
        help="classification: no embedding probe beside the soft prompt (encoders: the prompted head alone; "
        "causal LMs: the label ranking alone, as a PEFT export of the task predicts)",
    )
    p.add_argument(
        "--no-probe-refit",
        action="store_true",
        help="classification: keep the embedding probe fitted on the training part only (by default it is refitted "
        "on the training and dev rows once the dev accuracy is measured)",
    )
    p.add_argument(
        "--balance-labels",
        action="store_true",
        help="classification data whose labels are far from equally common: label-balanced training batches, a "
        "class-balanced embedding probe, and the kept state chosen on balanced dev accuracy (trades accuracy on "
        "the common labels for recall on the rare ones)",
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        help="training forwards' matrix products: fp32 (default) or bf16 under autocast (mixed precision, 0.6-0.7x "
        "the training time on CPUs with AVX512-BF16 / AMX; the task is stored and served as with fp32)",
    )
    p.add_argument("--kind", choices=("classification", "generation"), help="task kind (default: from the data)")
    p.add_argument(
        "--label-words",
        type=_label_words,
        metavar="JSON",
        help="classification: the text the model reads and writes for labels whose names are codes, as a JSON "
        'object or a .json file holding one, e.g. \'{"ABBR": "abbreviation", "HUM": "person"}\' (predictions '
        "still print the labels)",
    )
    p.add_argument(
        "--variant",
        metavar="VARIANT",
        help="train another prompt variant of existing task NAME instead of a new task (same labels; it does not "
        "serve until promoted, see compare / promote)",
    )
    p.add_argument(
        "--template",
        metavar="TEXT",
        help="causal LMs: how an input is shown to the model, with {input} where it goes; \\n is a line break "
        "(default: '{input}\\nAnswer:')",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_learn)

    p = command(
        "resume",
        "continue training task NAME's soft prompt from its stored state on DATA (routing keys are kept)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("data", metavar="DATA", help="training data, as for learn")
    p.add_argument("--dev", metavar="FILE", help="dev data (default: hold out part of DATA)")
    _add_columns_option(p)
    p.add_argument("--steps", type=_positive_int, metavar="N", help="more optimizer steps (default: the task's)")
    p.add_argument("--lr", type=_positive_float, metavar="X", help="learning rate (default: the task's)")
    p.add_argument("--batch-size", type=_positive_int, metavar="N", help="examples per step (default: the task's)")
    p.add_argument("--seed", type=int, metavar="N", help="random seed (default: the task's)")
    p.add_argument("--variant", metavar="VARIANT", help="resume this prompt variant instead of the serving one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_resume)

    p = command("list", "list the tasks in the bank")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = command("route", "show which task each text is routed to, with the ranked scores")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    _add_columns_option(p, texts_file=True)
    p.add_argument("--top-k", type=_positive_int, default=3, metavar="K", help="tasks to rank (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_route)

    p = command("predict", "predict for each text (routed to a task unless --task is given)")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--task", metavar="NAME", help="apply this task to every text instead of routing")
    _add_columns_option(p, texts_file=True)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown past 256 texts)")
    p.set_defaults(func=cmd_predict)

    p = command("generate", "generate a continuation for each text behind its task's soft prompt")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    p.add_argument("--task", metavar="NAME", help="use this task for every text instead of routing")
    _add_columns_option(p, texts_file=True)
    p.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=64,
        metavar="N",
        help="tokens to generate (default: %(default)s)",
    )
    p.add_argument(
        "--temperature",
        type=_non_negative_float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 = greedy (default: %(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar (over rows past one batch of 16 texts, else over the batch's decoding steps)",
    )
    p.set_defaults(func=cmd_generate)

    p = command(
        "add-routing-examples",
        "route texts like these to task NAME (they become its routing keys; no training, no labels)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("texts", nargs="*", metavar="TEXT")
    _add_columns_option(p, texts_file=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown past 1,024 texts)")
    p.set_defaults(func=cmd_add_routing_examples)

    p = command("remove", "remove a task from the bank (or, with --variant, one of its non-serving prompt variants)")
    p.add_argument("name", metavar="NAME")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--variant", metavar="VARIANT", help="remove only this prompt variant of task NAME")
    which.add_argument(
        "--routing-examples",
        action="store_true",
        help="remove only the routing examples added to task NAME (add-routing-examples)",
    )
    p.set_defaults(func=cmd_remove)

    p = command(
        "import-peft",
        "file a PEFT prompt-tuning / P-Tuning adapter folder (adapter_config.json + adapter_model.safetensors) as a "
        "new task; DATA gives its routing keys and labels",
    )
    p.add_argument("name", metavar="NAME", help="task name (letters, digits, '_', '.', '-')")
    p.add_argument("adapter", metavar="FOLDER", help="the adapter folder PEFT's save_pretrained wrote")
    p.add_argument("data", metavar="DATA", help="example rows, as for learn: {text,label} or {input,target}")
    p.add_argument("--dev", metavar="FILE", help="dev data (default: hold out part of DATA)")
    _add_columns_option(p)
    p.add_argument("--kind", choices=("classification", "generation"), help="task kind (default: from the data)")
    p.add_argument(
        "--label-words",
        type=_label_words,
        metavar="JSON",
        help="classification: the texts the adapter was trained to write for the labels, as for learn",
    )
    p.add_argument(
        "--template",
        metavar="TEXT",
        help="how the adapter's inputs were shown to the model, with {input} where the text goes (default: for a "
        "task folder of a saved bank, BANK/tasks/NAME, that task's own template and label words; else {input}, the "
        "raw text PEFT feeds)",
    )
    p.set_defaults(func=cmd_import_peft)

    p = command(
        "eval",
        "score a task on labelled data: accuracy (classification), or exact match and F1 of its greedy answers "
        "and the targets' loss (generation)",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("data", metavar="DATA", help="labelled data: {text,label} or {input,target} rows")
    _add_columns_option(p)
    p.add_argument(
        "--routed", action="store_true", help="also report the score when each row is routed instead of sent to NAME"
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="generation: longest answer generated (default: the task's max_target_tokens)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)

    p = command("compare", "evaluate every prompt variant of a task on the same labelled data (no routing)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("data", metavar="DATA", help="labelled data: {text,label} or {input,target} rows")
    _add_columns_option(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compare)

    p = command("promote", "make a prompt variant the one a task serves (the previous one stays as a variant)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("variant", metavar="VARIANT")
    p.set_defaults(func=cmd_promote)

    p = command(
        "demo", "learn the bundled example tasks one after another and show routing and forgetting", bank_option=False
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="folder of <task>_train.jsonl / <task>_test.jsonl files (default: the bundled examples)",
    )
    p.add_argument("--steps", type=_positive_int, metavar="N", help="training steps per task")
    # No $PROMPTBANK_BANK default: the demo must not mix its tasks into the user's bank.
    p.add_argument(
        "--bank",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="where to save the demo bank (default: the demo decides)",
    )
    p.set_defaults(func=cmd_demo)
    return parser


def resolve_bank(args: argparse.Namespace) -> argparse.Namespace:
    """Give ``args.bank`` its default where no ``--bank`` was given (before or after the command): the
    command's default folder, or ``None`` for the demo (which picks its own)."""
    if not hasattr(args, "bank"):
        args.bank = getattr(args, "_bank_default", None)
    return args


# ---------------------------------------------------------------------------------------------- helpers


def _has_bank(folder: str | os.PathLike) -> bool:
    from .manifest import bank_exists  # also finds a bank left next to the folder by an interrupted save

    return bank_exists(folder)


def _load_bank(args: argparse.Namespace, *, create: bool = False) -> PromptBank:
    """Load the bank at ``--bank`` (or make a new one when ``create``), hiding transformers' "Loading weights"
    progress bar unless ``-v``."""
    from transformers.utils import logging as hf_logging

    from .bank import PromptBank

    hide = not args.verbose and hf_logging.is_progress_bar_enabled()
    if hide:
        hf_logging.disable_progress_bar()
    try:
        if getattr(args, "quiet", False) and _uses_default_model(args, create):
            from .backbone import ensure_default_model

            ensure_default_model(progress=False)  # first use: pip's download and the conversion bar, silenced
        if create:
            return PromptBank.from_pretrained(backbone=args.backbone, embedder=args.embedder)
        try:
            return PromptBank.load(args.bank, backbone=args.backbone, embedder=args.embedder)
        except BackboneMismatchError as e:
            if args.backbone is None:
                raise
            # the CLI has no allow_mismatch: the useful advice is to let the bank load the backbone it records
            head = str(e).split(" The prompts were made", 1)[0]
            raise BackboneMismatchError(
                f"{head} The bank's prompts were made for the backbone it records: drop --backbone to load that one"
            ) from None
    finally:
        if hide:
            hf_logging.enable_progress_bar()


def _uses_default_model(args: argparse.Namespace, create: bool) -> bool:
    """Whether the bank at hand runs on the default causal model (converted on first use)."""
    from .backbone import DEFAULT_BACKBONE

    name = args.backbone
    if name is None and not create:
        from .manifest import read_manifest

        try:
            name = read_manifest(args.bank)["backbone"]["name"]
        except (PromptBankError, OSError):
            return False  # the load itself reports what is wrong
    return name is None or (isinstance(name, str) and name.strip().lower() == DEFAULT_BACKBONE)


def _open_bank(args: argparse.Namespace) -> PromptBank:
    """Load the bank at ``--bank``; a clear error when there is none."""
    _require_bank(args)
    return _load_bank(args)


def _require_bank(args: argparse.Namespace) -> None:
    if not _has_bank(args.bank):
        raise CLIError(
            f"no bank at {args.bank} (no {MANIFEST}); create one with `{PROG} learn NAME DATA "
            f"--bank {args.bank}` or point --bank / ${BANK_ENV} at an existing bank"
        )


def _check_tasks(args: argparse.Namespace, *names: str | None, new: str | None = None) -> None:
    """Task-name errors from the bank's manifest alone, before any model loads (a load takes ~10 s): each of
    ``names`` must be a task of the bank, ``new`` must not be (the same errors the bank raises). Nothing to check
    when there is no bank yet (the command says so, or creates one)."""
    if not _has_bank(args.bank):
        return
    from .errors import TaskExistsError, TaskNotFoundError
    from .manifest import read_manifest

    manifest = read_manifest(args.bank)
    known = list(manifest.get("task_order", list(manifest["tasks"])))
    for name in names:
        if name is not None and name not in known:
            raise TaskNotFoundError(f"no task named {name!r} in the bank (tasks: {', '.join(known) or 'none'})")
    if new is not None and new in known:
        raise TaskExistsError(f"task {new!r} already exists; remove it first or choose another name")


def _read_texts(args: argparse.Namespace) -> list[str]:
    """Positional texts, then those of ``--file``; a usage error when there are none."""
    texts = list(args.texts)
    if args.file:
        mapping = _parse_columns(args.columns) if args.columns else {}
        texts += _read_text_file(args.file, mapping.get("text") or mapping.get("input"))
    if not texts:
        if args.file:  # an empty stdin (an empty file says so where it is read)
            raise DataError(f"{'<stdin>' if args.file == '-' else args.file}: no texts")
        args._parser.error("give at least one TEXT or --file")
    return texts


def _read_text_file(path: str, column: str | None = None) -> list[str]:
    """Texts from JSONL (each non-blank line a JSON string or an object with a ``text``, else ``input``, string), a
    JSON list or a Parquet file (the same per element / row), CSV/TSV (the ``text``, else ``input``, column of a
    header row) or plain text (each non-blank line one text); ``column`` names that field instead.

    ``.txt`` files are plain text and ``.jsonl`` files JSONL. Standard input (``-``) and files of other extensions
    are JSONL when their first non-blank line starts with ``{`` or ``"``, else plain text."""
    ext = ""
    if path == "-":
        lines, src = sys.stdin.read().splitlines(), "<stdin>"
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{path}: no such file" if not p.exists() else f"{path}: not a regular file")
        ext = p.suffix.lower()
        if ext == ".parquet":
            from .tasks import _read_parquet

            return _row_texts(list(enumerate(_read_parquet(p, path), 1)), path, column, unit="row")
        try:
            lines, src = p.read_text(encoding="utf-8-sig").splitlines(), path
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if ext in (".csv", ".tsv"):
            return _table_texts(lines, path, "\t" if ext == ".tsv" else ",", column)
        if ext == ".json":  # a JSON list of strings or objects
            try:
                top = json.loads("\n".join(lines))
            except json.JSONDecodeError as e:
                raise ValueError(f"{src}:{e.lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(top, list):
                raise ValueError(f"{src}: expected a JSON list of strings or objects")
            return _row_texts(list(enumerate(top, 1)), src, column, unit="element")
    if ext == ".txt" or (ext not in (".jsonl", ".ndjson") and not _looks_like_jsonl(lines)):
        if column:
            raise ValueError(f"{src}: --columns applies to JSON, CSV/TSV and Parquet; this is plain text, one per line")
        return [line.strip() for line in lines if line.strip()]
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}:{i}: invalid JSON ({e.msg})") from None
    return _row_texts(rows, src, column)


def _looks_like_jsonl(lines: list[str]) -> bool:
    """Whether the first non-blank line starts a JSON object or string (else the lines are plain text)."""
    first = next((line.lstrip() for line in lines if line.strip()), "")
    return first.startswith(("{", '"'))


def _row_texts(rows: list[tuple[int, Any]], src: str, column: str | None, unit: str = "") -> list[str]:
    """The text of each numbered row: the row itself when a string, else its ``column`` (``text``, else ``input``).
    ``unit`` names what the numbers count in messages (``""``: file lines, ``src:N``)."""
    texts = []
    for i, row in rows:
        if isinstance(row, dict):
            row = row.get(column) if column else row.get("text", row.get("input"))
        if not isinstance(row, str):
            where = f"{src}: {unit} {i}" if unit else f"{src}:{i}"
            raise ValueError(f'{where}: expected a string or an object with a "{column or "text"}" string')
        texts.append(row)
    if not texts:
        raise ValueError(f"{src}: no texts")
    return texts


def _table_texts(lines: list[str], path: str, delimiter: str, column: str | None) -> list[str]:
    """The texts of one column of CSV/TSV ``lines`` with a header row (``column``, else ``text``, else ``input``)."""
    import csv

    rows = [r for r in csv.reader(lines, delimiter=delimiter) if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: no texts")
    header = [c.strip() for c in rows[0]]
    wanted = [column] if column else ["text", "input"]
    at = next((header.index(name) for name in wanted if name in header), None)
    if at is None:
        names = " or ".join(repr(n) for n in wanted)
        raise ValueError(
            f"{path}:1: no column {names} in the header ({', '.join(repr(c) for c in header)}); use --columns text=COLUMN"
        )
    texts = [r[at] for r in rows[1:] if at < len(r) and r[at].strip()]
    if not texts:
        raise ValueError(f"{path}: no texts")
    return texts


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False))


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _short(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


# ---------------------------------------------------------------------------------------------- commands


def cmd_learn(args: argparse.Namespace) -> int:
    from .manifest import validate_task_name

    validate_task_name(args.name)  # fail before loading any model
    _template(args)  # likewise (a usage error)
    if args.variant is not None:
        return _learn_variant(args)
    _check_new_task_files(args)
    _check_tasks(args, new=args.name)
    data, dev = _data(args, args.data), _data(args, args.dev, min_labels=1)  # data errors before the model loads
    bank, created = _bank_for_new_task(args)
    options = _learn_options(args)
    record = bank.learn_task(
        args.name,
        data,
        args.method,
        dev=dev,
        kind=args.kind,
        label_words=args.label_words,
        num_virtual_tokens=args.tokens,
        layers=args.layers,
        **_template(args),
        **options,
    )
    bank.save(args.bank)

    warm = (
        ", ".join(
            f"{w['task']} (similarity {w['similarity']:.2f}, weight {w['weight']:.2f})" for w in record.warm_start_from
        )
        or "none"
    )
    labels = f", {len(record.labels)} labels" if record.labels else ""
    if record.label_words:
        labels += f" ({len(record.label_words)} written as label words)"
    print(
        f"learned {record.name!r} ({record.kind}{labels}, {record.method.value}, "
        f"{record.prompt_config['num_virtual_tokens']} tokens): {record.steps} steps (best {record.best_step}), "
        f"dev loss {_fmt(record.dev_loss)}, {_dev_accuracy(record, bank.is_encoder)}, warm start from {warm}; "
        f"{'created' if created else 'saved'} {args.bank} ({len(bank)} task{'s' if len(bank) != 1 else ''})"
    )
    return 0


def _bank_for_new_task(args: argparse.Namespace) -> tuple[Any, bool]:
    """(the bank at ``--bank``, whether it is created now) for a command that adds a task; the caller has run
    :func:`_check_new_task_files`."""
    created = not _has_bank(Path(args.bank))
    return _load_bank(args, create=created), created


def _check_new_task_files(args: argparse.Namespace) -> None:
    """The data files of a command that adds a task exist, and ``--bank`` is a bank, an empty folder or absent."""
    for label, path in (("data", args.data), ("dev data", args.dev)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{label} file {path} not found")
    folder = Path(args.bank)
    if not _has_bank(folder) and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CLIError(f"{args.bank} exists and is not a bank; choose another --bank")


# a learn summary says how few dev rows its dev accuracy rests on below this many
_FEW_DEV_ROWS = 20


def _dev_accuracy(record, encoder: bool) -> str:
    """The task's dev accuracy. A task with an embedding probe scores labels with both; the progress bar showed the
    prompted head's (or, with a label objective, the causal LM's label ranking's) alone, so that one (at the kept
    step) is named too when the two differ."""
    if record.kind == "generation":
        return f"answers scored by `promptbank eval {record.name} DATA`"
    text = f"dev accuracy {_fmt(record.dev_accuracy)}"
    n_dev = getattr(record, "num_dev", None)
    if record.dev_accuracy is not None and isinstance(n_dev, int) and 0 < n_dev < _FEW_DEV_ROWS:
        text += f" (on {n_dev} dev row{'s' if n_dev != 1 else ''}: noisy; --dev FILE gives a larger dev set)"
    if not record.train_config.get("probe") or record.dev_accuracy is None:
        return text
    head = next(
        (h["dev_accuracy"] for h in record.history if h.get("step") == record.best_step and "dev_accuracy" in h),
        None,
    )
    if head is not None and head != record.dev_accuracy:
        alone = "the prompted head" if encoder else "the label ranking"
        text += f" with the embedding probe ({_fmt(head)} for {alone} alone)"
    return text


def _learn_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"progress": not args.quiet, "warm_start": not args.no_warm_start}
    if getattr(args, "no_probe", False):
        options["probe"] = False
    if getattr(args, "no_probe_refit", False):
        options["probe_refit"] = False
    if getattr(args, "balance_labels", False):
        options["balance_labels"] = True
    for key, value in (
        ("max_steps", args.steps),
        ("lr", args.lr),
        ("batch_size", args.batch_size),
        ("max_input_tokens", getattr(args, "max_input_tokens", None)),
        ("max_target_tokens", getattr(args, "max_target_tokens", None)),
        ("truncation_side", getattr(args, "truncation_side", None)),
        ("seed", args.seed),
        ("init", args.init),
        ("objective", getattr(args, "objective", None)),
        ("precision", getattr(args, "precision", None)),
    ):
        if value is not None:
            options[key] = value
    return options


def _template(args: argparse.Namespace) -> dict[str, str]:
    """``template=`` for learn_task / learn_variant when --template was given (a usage error without {input})."""
    if args.template is None:
        return {}
    from .bank import check_template

    template = args.template.replace("\\n", "\n")
    try:
        check_template(template)
    except ValueError as e:
        args._parser.error(f"--{e}")
    return {"template": template}


def cmd_resume(args: argparse.Namespace) -> int:
    for label, path in (("data", args.data), ("dev data", args.dev)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{label} file {path} not found")
    _require_bank(args)
    _check_tasks(args, args.name)
    data, dev = _data(args, args.data), _data(args, args.dev, min_labels=1)
    bank = _open_bank(args)
    records = bank.variants(args.name)
    key = args.variant or bank.tasks[args.name].variant
    before = records[key].steps if key in records else 0  # (an unknown variant: resume_task says so)
    options: dict[str, Any] = {"progress": not args.quiet}
    for key, value in (
        ("max_steps", args.steps),
        ("lr", args.lr),
        ("batch_size", args.batch_size),
        ("seed", args.seed),
    ):
        if value is not None:
            options[key] = value
    record = bank.resume_task(args.name, data, dev=dev, variant=args.variant, **options)
    bank.save(args.bank)
    print(
        f"resumed {record.name!r} (variant {record.variant!r}): {record.steps - before} more steps ({record.steps} in "
        f"all, best {record.best_step}), dev loss {_fmt(record.dev_loss)}, {_dev_accuracy(record, bank.is_encoder)}; "
        f"saved {args.bank}"
    )
    return 0


def _learn_variant(args: argparse.Namespace) -> int:
    from .manifest import validate_task_name

    try:
        validate_task_name(args.variant)
    except ValueError:
        raise ValueError(f"invalid variant name {args.variant!r}: use letters, digits, '_', '.', '-'") from None
    if args.kind is not None:
        args._parser.error("--kind does not apply to --variant (a variant has its task's kind)")
    if args.label_words is not None:
        args._parser.error("--label-words does not apply to --variant (a variant has its task's label words)")
    for label, path in (("data", args.data), ("dev data", args.dev)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{label} file {path} not found")
    _require_bank(args)
    _check_tasks(args, args.name)
    data, dev = _data(args, args.data), _data(args, args.dev, min_labels=1)
    bank = _open_bank(args)
    record = bank.learn_variant(
        args.name,
        args.variant,
        data,
        args.method,
        dev=dev,
        num_virtual_tokens=args.tokens,
        layers=args.layers,
        **_template(args),
        **_learn_options(args),
    )
    bank.save(args.bank)
    print(
        f"learned variant {record.variant!r} of {record.name!r} ({record.method.value}, "
        f"{record.prompt_config['num_virtual_tokens']} tokens): {record.steps} steps (best {record.best_step}), "
        f"dev loss {_fmt(record.dev_loss)}, {_dev_accuracy(record, bank.is_encoder)}; saved {args.bank} "
        f"({record.name!r} serves {bank.tasks[record.name].variant!r})"
    )
    return 0


def _task_summary(name: str, record: dict[str, Any], variants: list[str], scorer: str) -> dict[str, Any]:
    """A task's JSON line of ``list --json``, from its manifest record: ``variant`` is the serving prompt's name,
    ``variants`` all of them (serving first). ``threshold`` is the stored cosine threshold, the one routing uses
    when the bank's ``scorer`` is ``"knn"``; the learned router (``"lda"``) recalibrates its thresholds from the keys
    of all tasks, so there it is ``None`` (``route`` shows them)."""
    prompt_config, train_config = record.get("prompt_config") or {}, record.get("train_config") or {}
    return {
        "name": name,
        "variant": variants[0],
        "variants": variants,
        "kind": record.get("kind"),
        "method": prompt_config.get("method"),
        "tokens": prompt_config.get("num_virtual_tokens"),
        "layers": prompt_config.get("layers"),
        "labels": record.get("labels"),
        "label_words": record.get("label_words"),
        "num_train": record.get("num_train"),
        "num_dev": record.get("num_dev"),
        "steps": record.get("steps"),
        "best_step": record.get("best_step"),
        "dev_loss": record.get("dev_loss"),
        "dev_accuracy": record.get("dev_accuracy"),
        "threshold": record.get("threshold") if scorer == "knn" else None,
        "warm_start_from": record.get("warm_start_from"),
        "max_input_tokens": train_config.get("max_input_tokens"),
        # tasks stored before the setting existed were cut on the right (bank._truncation_side)
        "truncation_side": train_config.get("truncation_side") or "right",
        "imported_from": record.get("imported_from"),
        "routing_examples": record.get("routing_examples", 0),  # add-routing-examples
    }


def cmd_list(args: argparse.Namespace) -> int:
    """The tasks of the bank, from its manifest alone: no model is loaded, nor torch imported."""
    from .manifest import DEFAULT_VARIANT, read_manifest

    _require_bank(args)
    manifest = read_manifest(args.bank)  # checked: structure, types, its own sha256
    tasks, stored_variants = manifest["tasks"], manifest.get("variants", {})
    names = manifest.get("task_order", list(tasks))
    variants = {
        n: [tasks[n].get("variant", DEFAULT_VARIANT)]
        + [v.get("variant", DEFAULT_VARIANT) for v in stored_variants.get(n, [])]
        for n in names
    }
    scorer = manifest["index"].get("scorer", "knn")  # banks saved before the learned router route by cosine
    summaries = [_task_summary(n, tasks[n], variants[n], scorer) for n in names]
    if args.json:
        _print_json(summaries)
        return 0
    if not summaries:
        print(f"(no tasks in {args.bank})")
        return 0
    rows = [
        [
            str(t["name"]),
            str(t["kind"]),
            str(t["method"]),
            str(t["tokens"]),
            str(len(t["labels"])) if t["labels"] else "-",
            _fmt(t["dev_accuracy"]) if isinstance(t["dev_accuracy"], (int, float)) else "-",
            str(t["steps"]),
        ]
        for t in summaries
    ]
    header = ["NAME", "KIND", "METHOD", "TOKENS", "LABELS", "DEV_ACC", "STEPS"]
    if any(len(v) > 1 for v in variants.values()):  # the serving variant first, starred
        header.append("VARIANTS")
        for row, t in zip(rows, summaries, strict=True):
            row.append(",".join(f"{v}*" if v == t["variant"] else v for v in t["variants"]))
    if any(t["routing_examples"] for t in summaries):  # keys added after training (add-routing-examples)
        header.append("ROUTING_EXAMPLES")
        for row, t in zip(rows, summaries, strict=True):
            row.append(str(t["routing_examples"]))
    print(_table(header, rows))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    texts = _read_texts(args)
    bank = _open_bank(args)
    routes = bank.route_many(texts, top_k=args.top_k)
    thresholds = bank.routing_thresholds()
    if args.json:
        _print_json(
            [
                {
                    "text": t,
                    "task": r.task,
                    "score": r.score,
                    "threshold": r.threshold,
                    "guard": None
                    if r.guard is None
                    else {"task": r.guard[0], "score": r.guard[1], "threshold": r.guard[2]},
                    "ranked": [{"task": n, "score": s, "threshold": thresholds.get(n)} for n, s in r.ranked],
                }
                for t, r in zip(texts, routes, strict=True)
            ]
        )
        return 0
    for i, (text, r) in enumerate(zip(texts, routes, strict=True)):
        if i:
            print()
        print(_short(text, 80))
        if r.task is None and r.ranked and r.score < r.threshold:
            print(f"  -> (no task: {r.ranked[0][0]} scores {r.score:.4f}, under its threshold {r.threshold:.4f})")
        elif r.task is None and r.guard is not None:
            name, score, limit = r.guard
            print(
                f"  -> (no task: {r.ranked[0][0]} ranks first by label groups, but {name}, first by whole tasks, "
                f"scores {score:.4f}, under its threshold {limit:.4f})"
            )
        else:
            print(f"  -> {r.task if r.task is not None else '(no task)'}")
        for rank, (name, score) in enumerate(r.ranked, 1):
            limit = thresholds.get(name)
            print(f"     {rank}. {name}  {score:.4f}" + (f"  (threshold {limit:.4f})" if limit is not None else ""))
    if bank.routing == "lda" and any(r.task is None and r.ranked for r in routes):
        print(
            f"\n(to send texts like a rejected one to a task: `{PROG} add-routing-examples TASK TEXT...`; no training)"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    texts = _read_texts(args)
    _check_tasks(args, args.task)
    bank = _open_bank(args)
    preds = bank.predict(texts, task=args.task, progress=not args.quiet)
    if args.json:
        _print_json(
            [
                {
                    "text": t,
                    "output": p.output,
                    "task": p.task,
                    "route_score": p.route_score,
                    "label_scores": p.label_scores,
                }
                for t, p in zip(texts, preds, strict=True)
            ]
        )
        return 0
    rows = [
        [
            _short(p.output, 40) if p.output is not None else "-",
            p.task if p.task is not None else "(no task)",
            _fmt(p.route_score),
            _short(t),
        ]
        for t, p in zip(texts, preds, strict=True)
    ]
    print(_table(["OUTPUT", "TASK", "SCORE", "TEXT"], rows))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    texts = _read_texts(args)
    _check_tasks(args, args.task)
    bank = _open_bank(args)
    if args.task is not None:
        names, scores = [args.task] * len(texts), [None] * len(texts)
    else:  # route here so the task can be shown next to the output
        routes = bank.route_many(texts)
        names, scores = [r.task for r in routes], [r.score for r in routes]
    outputs = bank.generate(
        texts,
        names,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        progress=not args.quiet,
    )
    if args.json:
        _print_json(
            [
                {"text": t, "output": o, "task": n, "route_score": s}
                for t, o, n, s in zip(texts, outputs, names, scores, strict=True)
            ]
        )
        return 0
    for i, (text, out, name, score) in enumerate(zip(texts, outputs, names, scores, strict=True)):
        if i:
            print()
        where = "(no task: plain backbone)" if name is None else name
        if score is not None:
            where += f" {score:.3f}"
        print(f"> {_short(text, 80)}  [{where}]")
        print(out)
    return 0


def cmd_add_routing_examples(args: argparse.Namespace) -> int:
    texts = _read_texts(args)
    _check_tasks(args, args.name)
    bank = _open_bank(args)
    record = bank.add_routing_examples(args.name, texts, progress=not args.quiet)
    bank.save(args.bank)
    n_keys = len(bank.router.keys(args.name, copy=False))
    print(
        f"added {len(texts)} routing example{'s' if len(texts) != 1 else ''} to {args.name!r} in {args.bank} "
        f"({record.routing_examples} added in all; {n_keys} routing keys)"
    )
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    _check_tasks(args, args.name)
    bank = _open_bank(args)
    if args.routing_examples:
        n = bank.tasks[args.name].routing_examples
        if not n:
            print(f"{args.name!r} has no routing examples; nothing changed")
            return 0
        bank.remove_routing_examples(args.name)
        bank.save(args.bank)
        print(f"removed {n} routing example{'s' if n != 1 else ''} from {args.name!r} in {args.bank}")
        return 0
    if args.variant is not None:
        bank.remove_variant(args.name, args.variant)  # unknown, or the serving one: a one-line error
        bank.save(args.bank)
        left = ", ".join(bank.variants(args.name))
        print(f"removed variant {args.variant!r} of {args.name!r} from {args.bank} (variants left: {left})")
        return 0
    bank.remove_task(args.name)
    bank.save(args.bank)
    print(f"removed {args.name!r} from {args.bank} ({len(bank)} task{'s' if len(bank) != 1 else ''} left)")
    return 0


def cmd_import_peft(args: argparse.Namespace) -> int:
    from .manifest import validate_task_name

    validate_task_name(args.name)  # fail before loading any model
    template = _template(args)
    if not Path(args.adapter).is_dir():
        raise FileNotFoundError(f"adapter folder {args.adapter} not found")
    _check_new_task_files(args)
    _check_tasks(args, new=args.name)
    data, dev = _data(args, args.data), _data(args, args.dev, min_labels=1)
    bank, created = _bank_for_new_task(args)
    record = bank.import_peft(
        args.name,
        args.adapter,
        data,
        dev=dev,
        kind=args.kind,
        label_words=args.label_words,
        **template,
    )
    bank.save(args.bank)
    imported = record.imported_from or {}
    print(
        f"imported {record.name!r} ({record.kind}, {imported.get('peft_type', 'PEFT')}, "
        f"{record.prompt_config['num_virtual_tokens']} tokens) from {args.adapter}: dev loss {_fmt(record.dev_loss)}"
        f"{'' if record.kind == 'generation' else f', dev accuracy {_fmt(record.dev_accuracy)}'}; "
        f"{'created' if created else 'saved'} {args.bank} ({len(bank)} task{'s' if len(bank) != 1 else ''})"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if not Path(args.data).exists():
        raise FileNotFoundError(f"data file {args.data} not found")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    _require_bank(args)
    _check_tasks(args, args.name)
    data = _data(args, args.data, min_labels=1)
    bank = _open_bank(args)
    progress = not args.quiet
    scores = bank.evaluate(data, task=args.name, max_new_tokens=args.max_new_tokens, progress=progress)
    result: dict[str, Any] = {"task": args.name, **scores, "n": int(scores["n"])}
    if args.routed:
        routed = bank.evaluate(data, task=None, max_new_tokens=args.max_new_tokens, progress=progress)
        result["routed"] = {**routed, "n": int(routed["n"])}
    if args.json:
        _print_json(result)
        return 0
    print(f"{args.name}: {_scores_line(result)}")
    if args.routed:
        print(f"routed: {_scores_line(result['routed'])}")
    return 0


def _add_columns_option(p: argparse.ArgumentParser, *, texts_file: bool = False) -> None:
    """``--columns``; with ``texts_file``, also ``--file`` (texts to route, predict or generate for)."""
    if texts_file:
        p.add_argument(
            "--file",
            metavar="FILE",
            help="also read texts from a file ('-' for stdin): JSONL ({\"text\": ...} rows or strings), a JSON list "
            "of the same, CSV/TSV with a header, Parquet (needs pyarrow) or plain text, one per line (.txt, or "
            "stdin / other files whose first line does not start with '{' or '\"')",
        )
    p.add_argument(
        "--columns",
        metavar="FIELD=COLUMN,...",
        help="where the fields are when the data names them otherwise, e.g. text=sentence,label=rating "
        "(fields: text, label, input, target)",
    )
    if not texts_file:
        p.add_argument(
            "--skip-invalid",
            action="store_true",
            help="skip rows that fail their own checks (empty or missing text or label, a JSONL line that is not "
            "an object, a CSV row with the wrong number of fields) with one warning, instead of stopping at the first",
        )


def _data(args: argparse.Namespace, path: str | None, *, min_labels: int = 2) -> Any:
    """A data file loaded (so that its errors come before any model loads), with ``--columns`` mapping its fields
    and ``--skip-invalid`` (classification data to evaluate on: ``min_labels=1``)."""
    columns, skip = getattr(args, "columns", None), getattr(args, "skip_invalid", False)
    if path is None:
        return None
    from .tasks import load_task_data

    return load_task_data(
        path,
        kind=getattr(args, "kind", None),
        columns=_parse_columns(columns) if columns else None,
        skip_invalid=skip,
        min_labels=min_labels,
    )


def _parse_columns(spec: str) -> dict[str, str]:
    """``--columns text=review,label=stars`` -> ``{"text": "review", "label": "stars"}``."""
    columns: dict[str, str] = {}
    for part in spec.split(","):
        field, sep, column = part.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise ValueError(f"--columns takes FIELD=COLUMN pairs separated by commas, got {spec!r}")
        columns[field.strip()] = column.strip()
    return columns


def _scores_line(scores: dict[str, Any]) -> str:
    """One line of :meth:`PromptBank.evaluate`'s scores."""
    if "accuracy" in scores:
        return f"accuracy {scores['accuracy']:.3f}, macro-F1 {scores['macro_f1']:.3f} on {scores['n']} examples"
    loss = f", target loss {scores['loss']:.3f}" if "loss" in scores else ""
    return f"exact match {scores['exact_match']:.3f}, F1 {scores['f1']:.3f}{loss} on {scores['n']} examples"


def cmd_compare(args: argparse.Namespace) -> int:
    if not Path(args.data).exists():
        raise FileNotFoundError(f"data file {args.data} not found")
    _require_bank(args)
    _check_tasks(args, args.name)
    data = _data(args, args.data, min_labels=1)
    bank = _open_bank(args)
    report = bank.compare(args.name, data)
    if args.json:
        _print_json({"task": args.name, "variants": [{"variant": v, **m} for v, m in report.items()]})
        return 0
    rows = [
        [v, "*" if m["serving"] else "", m["method"], _fmt(m.get("accuracy")), _fmt(m["loss"]), str(m["n"])]
        for v, m in report.items()
    ]
    print(_table(["VARIANT", "SERVING", "METHOD", "ACCURACY", "LOSS", "N"], rows))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    _check_tasks(args, args.name)
    bank = _open_bank(args)
    before = bank.tasks[args.name].variant if args.name in bank else None
    bank.promote(args.name, args.variant)  # unknown task or variant: a one-line error
    if before == args.variant:
        print(f"{args.name!r} already serves variant {args.variant!r}; nothing changed")
        return 0
    bank.save(args.bank)
    print(f"{args.name!r} now serves variant {args.variant!r} (was {before!r}); saved {args.bank}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run_demo
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.demo":
            raise
        raise CLIError("the demo is not part of this promptbank install") from None
    given = {
        "data_dir": args.data,
        "steps": args.steps,
        "bank_dir": args.bank,
        "backbone": args.backbone,
        "embedder": args.embedder,
    }
    kwargs = {k: v for k, v in given.items() if v is not None}  # run_demo's own defaults for the rest
    result = run_demo(**kwargs)
    return result if isinstance(result, int) else 0


# ---------------------------------------------------------------------------------------------- entry point


def _one_line(exc: BaseException) -> str:
    msg = " ".join(str(exc).split())
    return msg or type(exc).__name__


_PACKAGE_DIR = Path(__file__).resolve().parent


def _one_line_warnings(fallback):
    """A ``warnings.showwarning`` that prints promptbank's own warnings as one ``promptbank: warning: ...`` line
    on stderr and hands other packages' to ``fallback`` (Python's format, with the source line)."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if _PACKAGE_DIR in Path(filename).resolve().parents:
            print(f"{PROG}: warning: {_one_line(message)}", file=sys.stderr if file is None else file)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    try:
        args = resolve_bank(parser.parse_args(argv))
    except SystemExit as e:  # --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    show = warnings.showwarning
    if not args.debug:  # --debug: every warning in Python's format
        warnings.showwarning = _one_line_warnings(show)
    try:
        return args.func(args)
    except SystemExit as e:  # args._parser.error() inside a command
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        try:  # the Python docs' recipe: point stdout at devnull so the final flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 141
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, PromptBankError, OSError, ValueError) as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())

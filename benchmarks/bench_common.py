"""Small helpers shared by the efficiency and transfer benchmarks: data files, deterministic splits, curve and
parameter/byte counting, library versions. Pure functions, no model code (tested in tests/test_bench_quick.py)."""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def default_data_dir() -> Path:
    """``$PROMPTBANK_DATA``, else ``../shared/data`` next to the repository."""
    return Path(os.environ.get("PROMPTBANK_DATA", ROOT.parent / "shared" / "data"))


def read_rows(path: Path) -> list[dict]:
    """The ``{"text", "label"}`` rows of a JSONL file, in file order."""
    with open(path, encoding="utf-8") as f:
        return [{"text": r["text"], "label": r["label"]} for r in map(json.loads, f) if r]


def read_labels(folder: Path) -> list[str]:
    """The label names of a dataset folder, in canonical order (``labels.json``)."""
    return list(json.loads((folder / "labels.json").read_text())["labels"])


def sample_disjoint(rows: Sequence[dict], sizes: Sequence[int], seed: int) -> list[list[dict]]:
    """Disjoint random samples of the given sizes from ``rows`` (one shuffle with ``seed``, then consecutive
    slices), e.g. ``train, dev = sample_disjoint(pool, [320, 64], seed)``."""
    if sum(sizes) > len(rows):
        raise ValueError(f"asked for {sum(sizes)} rows ({list(sizes)}) from a pool of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for n in sizes:
        out.append([rows[i] for i in order[start : start + n]])
        start += n
    return out


def fixed_split(rows: Sequence[dict], test_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """A deterministic train/test split of a dataset that has no official one (MR, CR): ``(train, test)``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = round(test_fraction * len(rows))
    test, train = sample_disjoint(rows, [n_test, len(rows) - n_test], seed)
    return train, test


def pool_and_test(folder: Path, pool_file: str, test_file: str | None, test_fraction: float = 0.2):
    """``(pool rows, test rows)`` of a dataset folder: the official test file, or, when there is none
    (``test_file=None``: MR, CR, SUBJ, ...), a fixed split of the pool (seed 0) holding out ``test_fraction``."""
    pool = read_rows(folder / pool_file)
    if test_file is None:
        return fixed_split(pool, test_fraction, seed=0)
    return pool, read_rows(folder / test_file)


def subsample(rows: Sequence[dict], n: int | None, seed: int = 0) -> list[dict]:
    """``n`` rows drawn at random (all rows, in file order, when ``n`` is ``None`` or not smaller)."""
    if n is None or n >= len(rows):
        return list(rows)
    return sample_disjoint(rows, [n], seed)[0]


def steps_to_fraction(
    curve: Sequence[tuple[int, float]], fraction: float = 0.95, *, lower_is_better: bool = True
) -> int | None:
    """First step at which a metric has made ``fraction`` of its total improvement.

    ``curve`` is ``[(step, value), ...]`` in step order, starting with the value before training. The total
    improvement runs from the first value to the best value on the curve (the state that model selection keeps);
    the answer is the first step whose value is at least ``fraction`` of the way there. ``None`` when the metric
    never improves on its first value (or the curve is empty).
    """
    if not curve:
        return None
    sign = -1.0 if lower_is_better else 1.0
    start = sign * curve[0][1]
    best = max(sign * v for _, v in curve)
    if best <= start:
        return None
    return first_step_at(curve, sign * (start + fraction * (best - start)), lower_is_better=lower_is_better)


def first_step_at(curve: Sequence[tuple[int, float]], level: float, *, lower_is_better: bool = True) -> int | None:
    """First step at which the metric reaches ``level`` (``<=`` for a loss), ``None`` if it never does."""
    sign = -1.0 if lower_is_better else 1.0
    return next((step for step, v in curve if sign * v >= sign * level - 1e-12), None)


def count_params(module, *, trainable_only: bool = False) -> int:
    """Number of parameters of a torch module (shared tensors counted once)."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def folder_bytes(path: Path) -> dict[str, int]:
    """Size in bytes of every file under ``path``, keyed by the path relative to it."""
    path = Path(path)
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def versions() -> dict[str, str]:
    """Library versions, plus the repository commit and whether promptbank/ had uncommitted changes."""
    import peft
    import torch
    import transformers

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
            return out.stdout.strip() if out.returncode == 0 else "unknown"
        except OSError:
            return "unknown"

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "promptbank_commit": git("rev-parse", "HEAD"),
        "promptbank_uncommitted_files": git("status", "--porcelain", "--", "promptbank"),
    }


def require_native_bf16(precision: str) -> None:
    """Exit when a bf16 run was asked for on a CPU-only machine without native bf16: training falls back to fp32
    there (``promptbank.train.effective_precision``), so the run would measure fp32 under a bf16 label."""
    import warnings

    import torch

    from promptbank.train import effective_precision

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library's fallback warning: this exit says it instead
        fallback = effective_precision(precision, device) != precision
    if fallback:
        raise SystemExit(
            "this CPU has no native bf16 (AVX512-BF16 / AMX), where promptbank trains bf16 requests in fp32: "
            "a bf16 run here would measure fp32"
        )


def mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def file_routing_keys_only(bank, name: str, train, tconf) -> None:
    """File task ``name`` in ``bank`` with its routing keys only (no prompt is trained or stored): for benchmarks
    that measure the router alone. ``train`` is a classification TaskData, ``tconf`` a TrainConfig."""
    from promptbank.bank import TaskRecord, _Task

    keys, groups, threshold = bank._routing_keys(train, None, tconf)
    record = TaskRecord(
        name=name, kind="classification", labels=list(train.labels), prompt_config={"method": "deep"},
        train_config=tconf.to_dict(), template="{input}", num_train=len(train), num_dev=0, steps=0, best_step=0,
        dev_loss=None, dev_accuracy=None, train_seconds=0.0, threshold=float(threshold),
    )  # fmt: skip
    bank._insert(_Task(record, {}, keys, {}, None, key_groups=groups))


def without_probes(bank, names):
    """A bank with tasks ``names`` of ``bank`` (same prompts, heads, keys and routing) minus their embedding
    probes: the prompted heads alone, for the probe ablations of the CL benchmarks. ``None`` when none of these
    tasks has a probe."""
    from promptbank import PromptBank
    from promptbank.bank import _Task
    from promptbank.storage import PROBE_KEYS

    if not any(k in (bank._tasks[n].head or {}) for n in names for k in PROBE_KEYS):
        return None
    plain = PromptBank(bank.backbone, bank.embedder, routing=bank.routing)
    for n in names:
        t = bank._tasks[n]
        head = {k: v for k, v in t.head.items() if k not in PROBE_KEYS}
        plain._insert(_Task(t.record, t.prompt, t.keys, t.train_state, head or None, key_groups=t.key_groups))
    return plain


def routing_discriminant(bank) -> str | None:
    """Which discriminant ranks the tasks of ``bank``'s learned router (``"group"`` or ``"task"``, see
    :mod:`promptbank.lda`); ``None`` for a bank routing with the cosine scorer."""
    return bank._learned_router(bank.router).discriminant if bank.routing == "lda" else None


def auroc(pos, neg) -> float:
    """P(a ``pos`` score > a ``neg`` score), ties counted half (Mann-Whitney)."""
    import numpy as np
    from scipy.stats import rankdata

    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    r = rankdata(np.r_[pos, neg])
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def write_result(result: dict, out: Path | None, name: str, *, quick: bool = False) -> Path:
    """Write ``result`` as JSON to ``out``, else to ``benchmarks/results/<name>[_quick].json``; print where and the
    run's ``wall_seconds`` in minutes; return the path."""
    path = out or RESULTS / (f"{name}_quick.json" if quick else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"Wrote {path} ({result['wall_seconds'] / 60:.1f} min)")
    return path

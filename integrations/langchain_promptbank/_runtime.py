"""Loading banks once per process, and the one lock per model that makes sharing it across threads safe.

A bank folder is loaded once per (folder, manifest stamp, backbone, embedder, dtype) and its backbone once per
(backbone, dtype), so constructing many :class:`~langchain_promptbank.PTunedLLM` objects for the same folder is
cheap and they share one model. Saving the bank again (new manifest) gives a fresh load on next use.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch import nn

    from promptbank import Backbone, PromptBank

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_load_lock = threading.Lock()  # serialises loading (held for seconds)
_backbones: dict[tuple[str, str], Backbone] = {}
_banks: dict[tuple[str, int, str, str | None, str], PromptBank] = {}

_locks_guard = threading.Lock()  # guards the table below (held for microseconds)
_model_locks: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()


def manifest_path(bank_path: str | os.PathLike) -> Path:
    from promptbank.storage import MANIFEST

    return Path(bank_path).expanduser().resolve() / MANIFEST


def load_bank_cached(
    bank_path: str | os.PathLike, *, backbone: str | None = None, embedder: str | None = None, dtype: str = "float32"
) -> PromptBank:
    """The bank in folder ``bank_path`` (loaded on first call, then shared). ``backbone`` overrides the model
    folder or name recorded in the manifest (for a bank moved to another machine)."""
    from promptbank import PromptBank
    from promptbank.storage import read_manifest

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    mpath = manifest_path(bank_path)
    folder = mpath.parent
    manifest = read_manifest(folder)
    spec = backbone or manifest["backbone"]["name"]
    key = (str(folder), mpath.stat().st_mtime_ns, str(spec), embedder, dtype)
    with _load_lock:
        bank = _banks.get(key)
        if bank is None:
            bank = PromptBank.load(folder, backbone=_backbone_cached(str(spec), dtype), embedder=embedder)
            for old in [k for k in _banks if k[0] == key[0]]:  # an older save of the same folder
                del _banks[old]
            _banks[key] = bank
    return bank


def _backbone_cached(spec: str, dtype: str) -> Backbone:
    from promptbank.backbone import load_backbone

    key = (spec, dtype)
    bb = _backbones.get(key)
    if bb is None:
        bb = _backbones[key] = load_backbone(spec, dtype=DTYPES[dtype])
    return bb


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock of ``model``, held for each forward (one decoding step, or a task's prefix computation).

    Concurrent requests on one shared model interleave step by step instead of running forwards at the same time:
    on CPU that keeps each forward on the whole intra-op thread pool instead of oversubscribing it, and no code
    path has to prove that two forwards on one module can overlap safely.
    """
    with _locks_guard:
        lock = _model_locks.get(model)
        if lock is None:
            lock = _model_locks[model] = threading.RLock()
        return lock


def clear_cache() -> None:
    """Forget the loaded banks and backbones (they are freed once no PTunedLLM uses them)."""
    with _load_lock:
        _banks.clear()
        _backbones.clear()

"""On-disk bank format: a folder of JSON + safetensors, written atomically. Never pickle.

```
my_bank/
  promptbank.json              manifest: format + version, written_by, backbone fingerprint, embedder, task records,
                               sha256 + size of every other file, and a sha256 of the manifest itself
  index.faiss                  derived routing index; rebuilt from the keys unless trust_index=True
  tasks/<name>/
    prompt.safetensors         the soft prompt: "layer.<l>" -> (P, d) fp32 (canonical)
    keys.safetensors           "keys" -> (k, d_embed) routing prototypes, "ids" -> (k,) int64
    train_state.safetensors    prompt-module state (P-Tuning encoder included), to resume training
    head.safetensors           encoder backbones: the task's linear head, "weight" (L, d), "bias" (L,), and its
                                 embedding probe when it has one, "probe_weight" (L, d_embed), "probe_bias" (L,);
                                 causal LMs: a classification task's embedding probe alone, when it has one
    adapter_config.json        PEFT export: PROMPT_TUNING (input-level prompts) or PREFIX_TUNING (deep prompts,
    adapter_model.safetensors    the per-layer key/value cache) -> PeftModel.from_pretrained works
    variants/<variant>/        non-serving prompt variants (PromptBank.learn_variant): prompt.safetensors,
                                 train_state.safetensors, head.safetensors as above; their records are in the
                                 manifest under "variants" (absent when no task has variants)
```

Writing (:func:`save_bank`): one writer at a time per bank, enforced with ``fcntl.flock`` on ``.<name>.lock`` next
to the folder (a second writer gets :class:`BankLockedError`; the kernel drops the lock when its holder dies). The
complete new bank is written and fsynced in a temporary folder ``.<name>.tmp-*`` next to the target and swapped in
with one atomic ``renameat2(RENAME_EXCHANGE)`` (Linux); where the filesystem cannot exchange, with two renames
(target -> ``.<name>.old-<pid>``, temporary -> target). A writer killed at any moment leaves the old or the new
bank at the target, or (two-rename fallback only) no target but a complete bank in a leftover folder, which
:func:`load_bank` reads and the next save moves back into place before it removes the leftovers.

Reading (:func:`load_bank`) takes no lock: it reads every file into memory, checks the folder was not swapped
meanwhile (else it reads again), and trusts nothing in it: sizes are capped before parsing, safetensors headers
are parsed here (dtype, shape and offsets checked before any tensor data is read), checksums verified, values
checked finite, symbolic links and special files refused. Errors are :class:`BankFormatError` naming the file.

PEFT import (:func:`read_peft_adapter`) reads a PEFT soft-prompt adapter folder with the same safetensors
parser; pickle files are refused, never loaded.

The manifest's format constants, its reading and its structure checks (and the file-reading primitives they share
with this module) live in :mod:`promptbank.manifest`, which imports no model library; they are re-exported here.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import math
import os
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.numpy import save as _np_bytes
from safetensors.torch import save as _torch_bytes

from .backbone import Backbone, check_fingerprint, load_backbone
from .config import TRUNCATION_SIDES
from .embed import Embedder, load_embedder
from .errors import AdapterError, BackboneMismatchError, BankFormatError, PromptBankError
from .manifest import (  # noqa: F401 - the manifest's format and torch-free reading, re-exported under storage's names
    DEFAULT_VARIANT,
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    TASK_FILES,
    VARIANT_FILES,
    _check_digest,
    _check_entry,
    _complete_leftover,
    _fail,
    _is_int,
    _json_bytes,
    _leftovers,
    _open_regular,
    _read_exact,
    _read_manifest_file,
    _read_small,
    _readable_folder,
    _valid_name,
    _verify_file,
    bank_exists,
    manifest_digest,
    read_manifest,
)
from .tasks import check_label_words

try:
    import fcntl
except ImportError:  # not POSIX: saves are still atomic, but concurrent writers are not detected
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .bank import PromptBank, TaskRecord

logger = logging.getLogger(__name__)

# Limits for banks from elsewhere: anything beyond them is refused before it is parsed or read into memory
# (and MAX_MANIFEST_BYTES, from .manifest).
MAX_HEADER_BYTES = 1 << 20  # safetensors JSON header
MAX_PROMPT_TOKENS = 512  # P of a soft prompt
MAX_KEYS = 1 << 16  # routing prototypes per task
MAX_LABELS = 1 << 16  # rows of an encoder head
HEAD_KEYS = ("weight", "bias")  # head.safetensors: the linear head on the pooled encoder output
PROBE_KEYS = ("probe_weight", "probe_bias")  # and, optionally, the task's embedding probe
MAX_TRAIN_STATE_BYTES = 1 << 30
MAX_TEMPLATE_CHARS = 1 << 16

_READ_ATTEMPTS = 20  # a load that overlaps saves reads again; each attempt waits a little longer
_USE_EXCHANGE = True  # tests set this False to exercise the two-rename fallback
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
_NP_DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8")}


class BankLockedError(PromptBankError, RuntimeError):
    """Another writer (process or thread) is saving the same bank folder right now."""


def _versions() -> dict[str, str]:
    import transformers

    from . import __version__

    return {
        "promptbank": __version__,
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
    }


def peft_export(backbone: Backbone, prompt: dict[int, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """PEFT adapter config + tensors for a soft prompt.

    Input-level prompts become PROMPT_TUNING (``prompt_embeddings`` (P, d)). Deep prompts become PREFIX_TUNING
    holding the prompt's exact per-layer key/value cache (keys after RoPE at positions 0..P-1), laid out as
    PEFT expects: (P, layers * 2 * kv_heads * head_dim).
    """
    cfg = backbone.model.config
    p, d = prompt[0].shape
    common = {
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(p),
        "num_layers": int(cfg.num_hidden_layers),
        "inference_mode": True,
        "base_model_name_or_path": backbone.name,
        "revision": None,
        "num_transformer_submodules": 1,
    }
    if list(prompt) == [0]:
        config = dict(
            common,
            peft_type="PROMPT_TUNING",
            token_dim=int(d),
            num_attention_heads=int(cfg.num_attention_heads),
            prompt_tuning_init="RANDOM",
        )
        return config, {"prompt_embeddings": prompt[0].float().contiguous()}
    from .inject import prompt_kv

    with torch.no_grad():
        kv = prompt_kv(backbone.model, prompt)
    kv_heads, head_dim = kv[0][0].shape[1], kv[0][0].shape[3]
    per_layer = [torch.stack([k[0], v[0]]) for k, v in kv]  # each (2, H_kv, P, hd)
    stacked = torch.stack(per_layer)  # (L, 2, H_kv, P, hd)
    flat = stacked.permute(3, 0, 1, 2, 4).reshape(p, -1)  # (P, L * 2 * H_kv * hd)
    config = dict(
        common,
        peft_type="PREFIX_TUNING",
        token_dim=int(kv_heads * head_dim),
        num_attention_heads=int(kv_heads),
        prefix_projection=False,
        encoder_hidden_size=int(d),
    )
    return config, {"prompt_embeddings": flat.float().contiguous()}


# ---------------------------------------------------------------------------------------------- writing


def save_bank(bank: PromptBank, path: str | os.PathLike) -> None:
    """Write ``bank`` to folder ``path`` atomically (temp folder + atomic swap), holding the bank's writer lock.

    Raises :class:`BankLockedError` when another writer is saving to the same folder.
    """
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        raise BankFormatError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST).exists():
        raise BankFormatError(f"refusing to overwrite {target}: it is a non-empty folder that is not a bank")
    lock = getattr(bank, "_lock", None)
    with lock if lock is not None else nullcontext():  # a consistent snapshot; never mutated in place afterwards
        tasks, router = dict(bank._tasks), bank.router
    with bank_lock(target):
        _recover(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            _write_folder(bank, tasks, router, tmp)
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextmanager
def bank_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the writer lock of bank folder ``path``: ``flock`` on ``.<name>.lock`` next to it (yields its path).

    Raises :class:`BankLockedError` at once if another process or thread holds it. The lock dies with its
    holder (even on SIGKILL); the file is removed on release (a leftover one is harmless).
    """
    target = Path(path).resolve()
    lock_path = target.parent / f".{target.name}.lock"
    if fcntl is None:
        yield lock_path
        return
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise BankLockedError(
                f"{target} is being saved by another writer (process {holder}, lock {lock_path}); "
                "save again when it has finished"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder removed the file between our open and flock: lock the new one
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock_path
    finally:
        try:
            os.unlink(lock_path)  # while still locked, so a waiting opener sees a fresh file (see the loop above)
        except FileNotFoundError:
            pass
        os.close(fd)


def _prompt_files(base: str, prompt: dict, train_state: dict, head: dict | None) -> dict[str, bytes]:
    """The files of one soft prompt (a task's serving prompt or a variant) under ``base``."""
    files: dict[str, bytes] = {}
    meta = {"format": "promptbank-soft-prompt"}  # one key: safetensors does not keep metadata order
    tensors = {f"layer.{layer}": t.contiguous() for layer, t in sorted(prompt.items())}
    files[base + "prompt.safetensors"] = _torch_bytes(tensors, metadata=meta)
    if train_state:
        files[base + "train_state.safetensors"] = _torch_bytes({k: v.contiguous() for k, v in train_state.items()})
    if head is not None:
        files[base + "head.safetensors"] = _torch_bytes({k: v.contiguous() for k, v in head.items()})
    return files


def _write_folder(bank: PromptBank, tasks: dict, router, folder: Path) -> None:
    files: dict[str, bytes] = {}
    variants: dict[str, list[dict[str, Any]]] = {}
    for name, task in tasks.items():
        base = f"tasks/{name}/"
        files.update(_prompt_files(base, task.prompt, task.train_state, task.head))
        key_tensors = {
            "keys": np.ascontiguousarray(task.keys, dtype=np.float32),
            "ids": np.ascontiguousarray(router.ids(name), dtype=np.int64),
        }
        if task.key_groups is not None:  # label / cluster of each key (the learned router's groups)
            key_tensors["groups"] = np.ascontiguousarray(task.key_groups, dtype=np.int64)
        files[base + "keys.safetensors"] = _np_bytes(key_tensors)
        for vname, v in task.variants.items():
            files.update(_prompt_files(f"{base}variants/{vname}/", v.prompt, v.train_state, v.head))
            variants.setdefault(name, []).append(v.record.to_dict())
        if bank.backbone.kind == "causal_lm":  # PEFT's prompt methods are for decoders; encoders keep our format
            peft_cfg, peft_tensors = peft_export(bank.backbone, task.prompt)
            files[base + "adapter_config.json"] = _json_bytes(peft_cfg)
            files[base + "adapter_model.safetensors"] = _torch_bytes(peft_tensors)
    files[INDEX_FILE] = router.index_bytes()
    for rel, data in files.items():
        _write_file(folder / rel, data)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "written_by": _versions(),
        "backbone": {"name": bank.backbone.name, "kind": bank.backbone.kind, "fingerprint": bank.backbone.fingerprint},
        "embedder": {"name": bank.embedder.name, "dim": int(bank.embedder.dim)},
        "index": {
            "file": INDEX_FILE,
            "type": _INDEX_TYPES[router.index_kind],
            "top_keys": int(router.top_keys),
            "ntotal": int(router.ntotal),
            "next_id": int(router.next_id),
            "scorer": bank.routing,
            "options": {k: v for k, v in router.index_config.items() if k != "top_keys"},
        },
        "tasks": {name: t.record.to_dict() for name, t in tasks.items()},
        "task_order": list(tasks),
        **({"variants": variants} if variants else {}),  # absent when no task has variants (as before them)
        "files": {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for rel, data in files.items()},
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    _write_file(folder / MANIFEST, _json_bytes(manifest))  # last: a folder with a manifest is complete
    _make_readable(folder)


def _write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a 0700 folder; give the bank ordinary permissions."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. platforms that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_renameat2_fn: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap paths ``a`` and ``b`` (Linux ``renameat2(RENAME_EXCHANGE)``). False when unsupported."""
    global _renameat2_fn
    if not sys.platform.startswith("linux"):
        return False
    if _renameat2_fn is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
        except (OSError, AttributeError):
            fn = False
        else:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
        _renameat2_fn = fn
    if not _renameat2_fn:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if _renameat2_fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _swap_in(tmp: Path, target: Path) -> None:
    for d in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(d)
    _fsync_dir(tmp)
    if not target.exists():
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return
    if _USE_EXCHANGE and _exchange(tmp, target):
        _fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous bank
        return
    # Two renames. Between them the target does not exist; the old bank is complete under `old` (and the new one
    # under `tmp`), and load_bank / the next save recover from there.
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover(target: Path) -> None:
    """Under the writer lock: move a complete leftover into place if the target is missing, then remove leftovers.

    Every leftover belongs to a writer that died (only the lock holder writes), so none is in use.
    """
    if not target.exists():
        cand = _complete_leftover(target)
        if cand is not None:
            logger.warning("%s was missing after an interrupted save; restored it from %s", target, cand.name)
            os.replace(cand, target)
            _fsync_dir(target.parent)
    for p in _leftovers(target):
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- reading


TensorInfo = tuple[str, tuple[int, ...], int, int]  # dtype, shape, begin, end (offsets into the data section)


class _Tensors:
    """A safetensors file parsed here (no pickle, no mmap): header validated first, then the data read."""

    def __init__(self, path: Path, infos: dict[str, TensorInfo], data: bytes, start: int):
        self.path, self.infos, self._data, self._start = path, infos, data, start

    def array(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self.infos[name]
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        a = np.frombuffer(self._data, dtype=_NP_DTYPES[dtype], count=count, offset=self._start + begin)
        return a.reshape(shape).astype(_NP_DTYPES[dtype].newbyteorder("="), copy=True)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.array(name))

    @property
    def raw(self) -> bytes:
        """The whole file's bytes."""
        return self._data

    def finite(self, name: str) -> np.ndarray:
        a = self.array(name)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise _fail(self.path, f"tensor {name!r} has NaN or infinite values")
        return a


def _parse_header(path: Path, raw: bytes, size: int) -> dict[str, TensorInfo]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"corrupt safetensors header ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt safetensors header (not a JSON object)")
    infos: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise _fail(path, "corrupt safetensors header (__metadata__ must map str to str)")
            continue
        ok = isinstance(spec, dict) and set(spec) == {"dtype", "shape", "data_offsets"}
        dtype, shape, offs = (spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")) if ok else (0, 0, 0)
        ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
        if not (ok and dtype in _DTYPE_SIZES and ints(shape) and ints(offs) and len(offs) == 2 and offs[0] <= offs[1]):
            raise _fail(path, f"corrupt safetensors header entry for {name[:100]!r}: {str(spec)[:200]}")
        if math.prod(shape) * _DTYPE_SIZES[dtype] != offs[1] - offs[0]:
            raise _fail(path, f"tensor {name!r}: shape {shape} {dtype} does not match its {offs[1] - offs[0]} bytes")
        infos[name] = (dtype, tuple(shape), offs[0], offs[1])
    pos = 0
    for name, (_, _, begin, end) in sorted(infos.items(), key=lambda kv: kv[1][2:]):
        if begin != pos:
            raise _fail(path, f"tensor {name!r} at offset {begin}, expected {pos} (overlapping or a gap)")
        pos = end
    if pos != size:
        raise _fail(path, f"tensor data is {size} bytes, the header describes {pos} (truncated or altered)")
    return infos


def _read_tensors(
    folder: Path,
    rel: str,
    entry: dict | None,
    check: Callable[[Path, dict[str, TensorInfo]], None],
    *,
    max_data_bytes: int | None = None,
) -> _Tensors:
    """Read a safetensors file: size and header (dtypes, shapes, offsets, ``check``) validated before its tensor
    data is read; the data is then read into memory and the checksum verified."""
    path = folder / rel
    fd, st = _open_regular(folder, rel)
    try:
        _check_entry(path, st.st_size, entry)
        if st.st_size < 8:
            raise _fail(path, f"truncated: {st.st_size} bytes, not a safetensors file")
        head8 = _read_exact(fd, 8, path)
        n = int.from_bytes(head8, "little")
        if n > min(st.st_size - 8, MAX_HEADER_BYTES):
            raise _fail(path, f"safetensors header length {n} is invalid for a {st.st_size}-byte file")
        raw = _read_exact(fd, n, path)
        infos = _parse_header(path, raw, st.st_size - 8 - n)
        check(path, infos)
        body = st.st_size - 8 - n
        if max_data_bytes is not None and body > max_data_bytes:
            raise _fail(path, f"{body} bytes of tensors, more than the {max_data_bytes} allowed")
        data = head8 + raw + _read_exact(fd, body, path)
    finally:
        os.close(fd)
    _check_digest(path, hashlib.sha256(data).hexdigest(), entry)
    return _Tensors(path, infos, data, 8 + n)


def _expect(path: Path, infos: dict[str, TensorInfo], name: str, dtype: str, shape: tuple, what: str) -> None:
    """``shape`` may hold None (any size >= 1) or (lo, hi) ranges."""
    got = infos.get(name)
    ok = got is not None and got[0] == dtype and len(got[1]) == len(shape)
    if ok:
        for dim, want in zip(got[1], shape):
            if want is None:
                ok &= dim >= 1
            elif isinstance(want, tuple):
                ok &= want[0] <= dim <= want[1]
            else:
                ok &= dim == want
    if not ok:
        have = "missing" if got is None else f"{got[0]} {list(got[1])}"
        raise _fail(path, f"tensor {name!r} is {have}; expected {dtype} {what}")


def _only(path: Path, infos: dict[str, TensorInfo], names: set[str]) -> None:
    extra = sorted(set(infos) - names)
    if extra:
        raise _fail(path, f"unexpected tensors {[e[:100] for e in extra[:5]]}")


# ---------------------------------------------------------------------------------------------- manifest


def _check_template(template: Any) -> bool:
    """Task templates are ``str.format``-ed with the user's text: allow only plain ``{input}`` fields (an
    attribute / index lookup or a format spec in a bank's template could read objects or allocate without bound)."""
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        return False
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return False
    return bool(fields) and all(f == "input" and not spec and conv is None for f, spec, conv in fields)


def _check_record(name: str, data: dict[str, Any], mpath: Path, num_layers: int) -> tuple[TaskRecord, int, list[int]]:
    """Validate a task record; returns it with its prompt length P and its prompt layers."""
    from .bank import TaskRecord
    from .config import PromptConfig

    try:
        rec = TaskRecord.from_dict(data)
        pconf = PromptConfig.from_dict(rec.prompt_config)
        layers = pconf.resolved_layers(num_layers)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise _fail(mpath, f"task {name!r}: bad record ({type(e).__name__}: {str(e)[:200]})") from None

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise _fail(mpath, f"task {name!r}: {what}")

    need(rec.name == name, f"record names {rec.name!r}")
    need(isinstance(rec.variant, str) and _valid_name(rec.variant), f"invalid variant name {str(rec.variant)[:200]!r}")
    need(rec.imported_from is None or isinstance(rec.imported_from, dict), "imported_from must be an object or null")
    need(rec.kind in ("classification", "generation"), f"unknown kind {rec.kind!r}")
    labels = rec.labels
    need(
        labels is None
        or (isinstance(labels, list) and 0 < len(labels) <= MAX_LABELS and all(isinstance(x, str) for x in labels)),
        "labels must be a list of strings",
    )
    need(rec.kind != "classification" or bool(labels), "a classification task needs labels")
    if rec.label_words is not None:
        need(isinstance(rec.label_words, dict), "label_words must be an object or null")
        try:
            words = check_label_words(rec.label_words, rec.kind, labels)
        except ValueError as e:
            raise _fail(mpath, f"task {name!r}: bad label_words ({str(e)[:200]})") from None
        need(words == rec.label_words, "label_words texts must be stripped, in label order")
    need(
        _check_template(rec.template),
        f"template must be a str whose only fields are '{{input}}': {rec.template!r:.200}",
    )
    need(
        isinstance(rec.threshold, (int, float))
        and not isinstance(rec.threshold, bool)
        and math.isfinite(rec.threshold),
        f"threshold must be a finite number, got {rec.threshold!r}",
    )
    need(
        _is_int(rec.routing_examples, 0),
        f"routing_examples must be an int >= 0, got {rec.routing_examples!r:.100}",
    )
    need(isinstance(rec.train_config, dict), "train_config must be a dict")
    for key in ("max_target_tokens", "max_input_tokens"):  # used at inference
        value = rec.train_config.get(key)
        need(value is None or _is_int(value, 1), f"train_config[{key!r}] must be a positive int, got {value!r}")
    side = rec.train_config.get("truncation_side")
    need(
        side is None or side in TRUNCATION_SIDES,
        f"train_config['truncation_side'] must be one of {list(TRUNCATION_SIDES)}, got {side!r:.100}",
    )
    p = pconf.num_virtual_tokens
    need(_is_int(p, 1) and p <= MAX_PROMPT_TOKENS, f"num_virtual_tokens must be 1..{MAX_PROMPT_TOKENS}, got {p!r}")
    return rec, p, layers


# ---------------------------------------------------------------------------------------------- loading


def _identity(folder: Path) -> tuple | None:
    """What changes when a save swaps a new bank in at ``folder`` (None: nothing there)."""
    try:
        d, m = os.stat(folder), os.stat(folder / MANIFEST)
    except OSError:
        return None
    return (d.st_dev, d.st_ino, m.st_ino, m.st_mtime_ns, m.st_size)


def _disk_state(where: Path) -> tuple:
    return (_identity(where), tuple(p.name for p in _leftovers(where.absolute())))


def load_bank(
    cls,
    path: str | os.PathLike,
    *,
    backbone: str | os.PathLike | Backbone | None = None,
    embedder: str | Embedder | None = None,
    allow_mismatch: bool = False,
    trust_index: bool = False,
) -> PromptBank:
    """Load a bank folder. Every file is validated (see the module docstring); tensors are copies; the index is
    rebuilt from the keys unless ``trust_index`` (and then only if it agrees with the keys).

    Takes no lock: if a save swaps the folder while it is read, it is read again.
    """
    from .router import Router

    where = Path(path)
    models: list = []  # (backbone, embedder), loaded once
    for attempt in range(_READ_ATTEMPTS):
        before = _disk_state(where)
        try:
            folder = _readable_folder(where)
            ident = _identity(folder)
            manifest = _read_manifest_file(folder)
            if not models:
                models.append(_models(manifest, folder, backbone, embedder))
            bb, emb = models[0]
            check_fingerprint(
                manifest["backbone"]["fingerprint"],
                bb.fingerprint,
                allow_mismatch=allow_mismatch,
                expected_name=manifest["backbone"]["name"],
            )
            if emb.dim != manifest["embedder"]["dim"]:
                raise BankFormatError(
                    f"{folder}: bank keys have dim {manifest['embedder']['dim']}, embedder {emb.name!r} gives {emb.dim}"
                )
            tasks, ids, index_bytes = _read_tasks(folder, manifest, bb, emb.dim, trust_index)
        except (BankFormatError, OSError) as e:
            if attempt + 1 < _READ_ATTEMPTS and _disk_state(where) != before:  # a save swapped the bank meanwhile
                time.sleep(0.005 * (attempt + 1))
                continue
            if isinstance(e, OSError):
                raise BankFormatError(f"{e.filename or where}: cannot read ({e.strerror or e})") from None
            raise
        if _identity(folder) == ident:
            break
        time.sleep(0.005 * (attempt + 1))
    else:
        raise BankFormatError(f"{where}: the bank kept changing while it was read ({_READ_ATTEMPTS} tries)")

    bank = cls(bb, emb, routing=manifest["index"].get("scorer", "knn"))  # banks from before the learned router
    try:
        bank.router = Router.from_keys(
            {n: t.keys for n, t in tasks.items()},
            {n: t.record.threshold for n, t in tasks.items()},
            dim=emb.dim,
            top_keys=int(manifest["index"].get("top_keys", 1)),
            ids=ids,
            next_id=manifest["index"].get("next_id"),
            index_bytes=index_bytes,
            **_index_options(manifest["index"].get("options", {}), folder / MANIFEST),
        )
    except ValueError as e:
        raise BankFormatError(f"{folder / MANIFEST}: inconsistent routing keys ({e})") from None
    # one copy of the keys: each task holds the router's (validated, read-only) array
    bank._tasks = {n: replace(t, keys=bank.router.keys(n, copy=False)) for n, t in tasks.items()}
    return bank


_INDEX_TYPES = {"flat": "IndexIDMap2(IndexFlatIP)", "hnsw": "IndexIDMap2(IndexHNSWFlat)", "ivf": "IndexIVFFlat"}
_INDEX_OPTIONS = {"index": str, "hnsw_m": int, "ef_construction": int, "ef_search": int, "nlist": int, "nprobe": int}


def _index_options(options: Any, mpath: Path) -> dict[str, Any]:
    """The saved FAISS index options (kind and parameters); values are range-checked by the Router itself."""
    if not isinstance(options, dict) or set(options) - set(_INDEX_OPTIONS):
        raise _fail(mpath, f"bad 'index.options' (allowed keys: {sorted(_INDEX_OPTIONS)})")
    for k, v in options.items():
        if v is None and k == "nlist":
            continue
        if isinstance(v, bool) or not isinstance(v, _INDEX_OPTIONS[k]) or (isinstance(v, int) and not 0 < v <= 1 << 20):
            raise _fail(mpath, f"bad 'index.options.{k}': {v!r}")
    return options


def _models(manifest: dict[str, Any], folder: Path, backbone, embedder) -> tuple[Backbone, Embedder]:
    bb_info = manifest["backbone"]
    if backbone is None:
        backbone = bb_info["name"]
    kind = bb_info.get("kind", "causal_lm")
    try:
        bb = backbone if isinstance(backbone, Backbone) else load_backbone(backbone, kind=kind)
    except BackboneMismatchError:
        raise
    except PromptBankError as e:
        if backbone == bb_info["name"]:
            raise
        raise BackboneMismatchError(  # e.g. a causal LM given for a bank built on an encoder
            f"{folder}: the bank was built on {kind.replace('_', '-')} backbone {bb_info['name']!r}, and "
            f"{str(backbone)!r} cannot be loaded as one ({e}) The prompts were made for the bank's backbone; leave "
            "backbone= unset to load it"
        ) from None
    emb = load_embedder(embedder if embedder is not None else manifest["embedder"]["name"])
    return bb, emb


def _read_tasks(folder: Path, manifest: dict[str, Any], bb: Backbone, embed_dim: int, trust_index: bool):
    """Read and validate every task's files (and the index file's bytes when trusted)."""
    files = manifest.get("files")  # None for a migrated version-1 bank: no checksums to verify
    tasks, ids = {}, {}
    for name in manifest.get("task_order", list(manifest["tasks"])):
        record, p, layers = _check_record(name, manifest["tasks"][name], folder / MANIFEST, bb.num_layers)
        tasks[name], ids[name] = _read_task(folder, files, record, p, layers, bb, embed_dim)
        tasks[name].variants = _read_variants(folder, files, manifest, tasks[name], bb.num_layers, bb, embed_dim)
    index_bytes = None
    ent = files.get(INDEX_FILE) if files is not None else None
    if os.path.lexists(folder / INDEX_FILE):  # a derived cache: may be deleted (then rebuilt from the keys)
        if trust_index:
            n_keys = sum(t.keys.shape[0] for t in tasks.values())
            cap = ent["size"] if ent is not None else (1 << 20) + 2 * n_keys * (4 * embed_dim + 8)
            index_bytes = _read_small(folder, INDEX_FILE, cap, ent)
        elif ent is not None:
            _verify_file(folder, INDEX_FILE, ent)
    return tasks, ids, index_bytes


def _read_task(
    folder: Path,
    files: dict[str, Any] | None,
    record: TaskRecord,
    p: int,
    layers: list[int],
    bb: Backbone,
    embed_dim: int,
):
    """One task's files -> (_Task, key ids). Shapes and dtypes are checked from the headers before data is read."""
    from .bank import _Task

    base = f"tasks/{record.name}/"

    def check_keys(path: Path, infos: dict[str, TensorInfo]) -> None:
        _only(path, infos, {"keys", "ids", "groups"})
        _expect(path, infos, "keys", "F32", ((1, MAX_KEYS), embed_dim), f"(k, {embed_dim}), 1 <= k <= {MAX_KEYS}")
        _expect(path, infos, "ids", "I64", (infos["keys"][1][0],), "(k,)")
        if "groups" in infos:
            _expect(path, infos, "groups", "I64", (infos["keys"][1][0],), "(k,)")

    prompt, state, head = _read_prompt_files(folder, files, base, record, p, layers, bb, embed_dim)
    key_file = _read_optional(folder, files, base + "keys.safetensors", True, check_keys)
    assert key_file is not None  # required
    keys = key_file.finite("keys")
    norms = np.linalg.norm(keys.astype(np.float64), axis=1)
    if np.any(np.abs(norms - 1.0) > 1e-3):
        raise _fail(key_file.path, "routing keys must be L2-normalised rows")
    if record.routing_examples >= len(keys):  # added keys come after at least one key of its training
        raise _fail(key_file.path, f"{len(keys)} keys, but {record.routing_examples} routing examples")
    groups = None
    if "groups" in key_file.infos:
        groups = key_file.array("groups")
        if len(groups) and (groups.min() < 0 or groups.max() >= len(groups)):
            raise _fail(key_file.path, f"key groups must lie in [0, {len(groups)}), got {groups.min()}..{groups.max()}")
    for fname in ("adapter_config.json", "adapter_model.safetensors"):  # exports: verified, not parsed
        present, ent = _file_entry(folder, files, base + fname, False)
        if present and ent is not None:
            _verify_file(folder, base + fname, ent)
    return _Task(record, prompt, keys, state, head, key_groups=groups), key_file.array("ids")


def _read_variants(
    folder: Path,
    files: dict[str, Any] | None,
    manifest: dict[str, Any],
    task: Any,
    num_layers: int,
    bb: Backbone,
    embed_dim: int,
) -> dict[str, Any]:
    """The non-serving prompt variants of ``task`` listed in the manifest, read and checked like the task's own."""
    from .bank import _Variant

    out: dict[str, Any] = {}
    rec = task.record
    for data in (manifest.get("variants") or {}).get(rec.name, []):
        vrec, p, layers = _check_record(rec.name, data, folder / MANIFEST, num_layers)
        if (vrec.kind, vrec.labels, vrec.label_words) != (rec.kind, rec.labels, rec.label_words):
            raise _fail(
                folder / MANIFEST,
                f"task {rec.name!r}: variant {vrec.variant!r} has another kind, labels or label words",
            )
        base = f"tasks/{rec.name}/variants/{vrec.variant}/"
        prompt, state, head = _read_prompt_files(folder, files, base, vrec, p, layers, bb, embed_dim)
        out[vrec.variant] = _Variant(vrec, prompt, state, head)
    return out


def _file_entry(folder: Path, files: dict[str, Any] | None, rel: str, required: bool) -> tuple[bool, dict | None]:
    """(present, checksum entry). With checksums the manifest says which files exist."""
    if files is not None:
        return rel in files, files.get(rel)
    return required or os.path.lexists(folder / rel), None


def _read_optional(folder: Path, files: dict[str, Any] | None, rel: str, required: bool, check, **kw):
    """A safetensors file of the bank (None when absent and not required)."""
    present, ent = _file_entry(folder, files, rel, required)
    if not present:
        return None
    try:
        return _read_tensors(folder, rel, ent, check, **kw)
    except FileNotFoundError:
        raise _fail(folder / rel, "missing") from None


def _read_prompt_files(
    folder: Path,
    files: dict[str, Any] | None,
    base: str,
    record: TaskRecord,
    p: int,
    layers: list[int],
    bb: Backbone,
    embed_dim: int,
) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The prompt, train state and (encoder) head under ``base`` -> (prompt, state, head), checked."""
    d, encoder, n_labels = bb.hidden_size, bb.kind == "encoder", len(record.labels or [])
    want_layers = {f"layer.{x}" for x in layers}

    def check_prompt(path: Path, infos: dict[str, TensorInfo]) -> None:
        _only(path, infos, want_layers)
        for key in sorted(want_layers):
            _expect(path, infos, key, "F32", (p, d), f"({p}, {d}) (P = num_virtual_tokens <= {MAX_PROMPT_TOKENS})")

    def check_head(path: Path, infos: dict[str, TensorInfo]) -> None:
        probed = "probe_weight" in infos or "probe_bias" in infos
        if not encoder:  # a causal-LM classification task's head is its embedding probe alone
            if record.kind != "classification":
                raise _fail(path, "a causal-LM generation task has no head")
            _only(path, infos, set(PROBE_KEYS))
            probed = True
        else:
            _only(path, infos, set(HEAD_KEYS + PROBE_KEYS) if probed else set(HEAD_KEYS))
            _expect(path, infos, "weight", "F32", (n_labels, d), f"({n_labels}, {d}) (labels x hidden size)")
            _expect(path, infos, "bias", "F32", (n_labels,), f"({n_labels},)")
        if probed:
            e = embed_dim
            _expect(path, infos, "probe_weight", "F32", (n_labels, e), f"({n_labels}, {e}) (labels x embedding dim)")
            _expect(path, infos, "probe_bias", "F32", (n_labels,), f"({n_labels},)")

    def check_state(path: Path, infos: dict[str, TensorInfo]) -> None:
        for key, (dtype, shape, _, _) in infos.items():
            if dtype != "F32" or len(shape) > 4 or len(key) > 256:
                raise _fail(path, f"tensor {key[:100]!r} is {dtype} {list(shape)}; expected F32, at most 4 dims")

    prompt_file = _read_optional(folder, files, base + "prompt.safetensors", True, check_prompt)
    assert prompt_file is not None  # required
    head_file = _read_optional(folder, files, base + "head.safetensors", False, check_head)
    state_file = _read_optional(
        folder, files, base + "train_state.safetensors", False, check_state, max_data_bytes=MAX_TRAIN_STATE_BYTES
    )
    if encoder and head_file is None:
        raise _fail(folder / base / "head.safetensors", "missing (an encoder task needs its head)")
    prompt = {int(k.split(".", 1)[1]): torch.from_numpy(prompt_file.finite(k)) for k in sorted(want_layers)}
    head = None
    if head_file is not None:
        head = {k: torch.from_numpy(head_file.finite(k)) for k in HEAD_KEYS + PROBE_KEYS if k in head_file.infos}
    state = {k: torch.from_numpy(state_file.finite(k)) for k in state_file.infos} if state_file is not None else {}
    return dict(sorted(prompt.items())), state, head


# ---------------------------------------------------------------------------------------------- PEFT import

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
IMPORTABLE_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")
MAX_ADAPTER_CONFIG_BYTES = 1 << 20
_FLOAT_DTYPES = ("F32", "F16", "BF16")


def read_peft_adapter(folder: str | os.PathLike, backbone: Backbone) -> tuple[torch.Tensor, dict[str, Any]]:
    """Read a PEFT soft-prompt adapter folder for ``backbone`` -> (prompt embeddings (P, d) fp32, provenance).

    Only ``adapter_config.json`` and ``adapter_model.safetensors`` are read (parsed here, header checked before
    any data is read, as for banks); a folder with only a pickle file (``adapter_model.bin``) is refused, never
    loaded. ``PROMPT_TUNING`` and ``P_TUNING`` adapters are accepted: both save the input-level prompt as
    ``prompt_embeddings`` (for P-Tuning, PEFT saves the prompt encoder's output). The config must say
    ``task_type`` ``CAUSAL_LM``, ``num_transformer_submodules`` 1 and ``token_dim`` = the backbone's hidden size,
    and the tensor must be ``(num_virtual_tokens, token_dim)`` F32/F16/BF16 with finite values. Symbolic links are
    followed (Hugging Face cache snapshots are links); the files they lead to must be regular files.

    Raises :class:`AdapterError` naming the file and the offending value.
    """
    where = Path(folder)
    if not where.is_dir():
        raise AdapterError(
            f"{where}: not a folder (expected a PEFT adapter folder with {PEFT_CONFIG} and {PEFT_WEIGHTS})"
        )
    cfg_path, weights_path = where / PEFT_CONFIG, where / PEFT_WEIGHTS
    if not weights_path.exists():
        pickled = [where / n for n in PEFT_PICKLES if (where / n).exists()]
        if pickled:
            raise AdapterError(
                f"{pickled[0]}: refusing to load a pickled PyTorch file (unpickling can run arbitrary code); save the "
                f"adapter with save_pretrained(..., safe_serialization=True) to get {PEFT_WEIGHTS}"
            )
        raise AdapterError(f"{weights_path}: missing (a PEFT adapter folder holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    if not cfg_path.exists():
        raise AdapterError(f"{cfg_path}: missing (a PEFT adapter folder holds {PEFT_CONFIG} and {PEFT_WEIGHTS})")
    try:
        cfg_real, weights_real = Path(os.path.realpath(cfg_path)), Path(os.path.realpath(weights_path))
        raw = _read_small(cfg_real.parent, cfg_real.name, MAX_ADAPTER_CONFIG_BYTES, None)
    except BankFormatError as e:
        raise AdapterError(str(e)) from None
    except OSError as e:
        raise AdapterError(f"{cfg_path}: cannot read ({e.strerror or e})") from None
    try:
        cfg = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise AdapterError(f"{cfg_path}: invalid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")

    def bad(what: str) -> AdapterError:
        return AdapterError(f"{cfg_path}: {what}")

    peft_type = cfg.get("peft_type")
    if peft_type not in IMPORTABLE_PEFT_TYPES:
        why = ""
        if peft_type == "PREFIX_TUNING":
            why = " (a prefix-tuning adapter is a per-layer key/value cache; no exact promptbank soft prompt gives it)"
        raise bad(
            f"peft_type {_show(peft_type)} cannot be imported{why}; importable: {', '.join(IMPORTABLE_PEFT_TYPES)}"
        )
    task_type = cfg.get("task_type")
    if task_type != "CAUSAL_LM":
        raise bad(f"task_type {_show(task_type)}: a causal-LM bank imports CAUSAL_LM adapters only")
    submodules = cfg.get("num_transformer_submodules", 1)
    if submodules is not None and not (_is_int(submodules) and submodules == 1):
        raise bad(f"num_transformer_submodules {_show(submodules)}: only 1 (decoder-only models) is supported")
    p = cfg.get("num_virtual_tokens")
    if not _is_int(p, 1) or p > MAX_PROMPT_TOKENS:
        raise bad(f"num_virtual_tokens {_show(p)}: expected an int in 1..{MAX_PROMPT_TOKENS}")
    d = backbone.hidden_size
    token_dim = cfg.get("token_dim", d)
    if not (_is_int(token_dim) and token_dim == d):
        raise bad(f"token_dim {_show(token_dim)} does not match backbone {backbone.name!r} (hidden size {d})")

    def check(path: Path, infos: dict[str, TensorInfo]) -> None:
        _only(path, infos, {"prompt_embeddings"})
        got = infos.get("prompt_embeddings")
        if got is None or got[0] not in _FLOAT_DTYPES or got[1] != (p, d):
            have = "missing" if got is None else f"{got[0]} {list(got[1])}"
            raise _fail(
                path,
                f"tensor 'prompt_embeddings' is {have}; expected F32/F16/BF16 [{p}, {d}] (num_virtual_tokens "
                f"{p} from {PEFT_CONFIG}, backbone hidden size {d})",
            )

    try:
        tensors = _read_tensors(weights_real.parent, weights_real.name, None, check)
        embeddings = _float32(tensors, "prompt_embeddings")
    except BankFormatError as e:
        msg = str(e)
        if not msg.startswith(str(weights_path)) and weights_real != weights_path:
            msg = f"{weights_path} (-> {msg})"
        raise AdapterError(msg) from None
    except OSError as e:
        raise AdapterError(f"{weights_path}: cannot read ({e.strerror or e})") from None
    info = {
        "file": str(weights_path.absolute()),
        "sha256": hashlib.sha256(tensors.raw).hexdigest(),
        "peft_type": peft_type,
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
    }
    return torch.from_numpy(embeddings), info


def exported_task(folder: str | os.PathLike) -> dict[str, Any] | None:
    """When ``folder`` is a task folder of a saved bank (``BANK/tasks/NAME``, whose ``adapter_config.json`` +
    ``adapter_model.safetensors`` are that task's PEFT export), the task's record from the bank's manifest, which
    holds the input format it was trained with (``template``) and its ``label_words``; else ``None``.

    Raises :class:`AdapterError` when the folder sits in a bank whose manifest cannot be read or does not list the
    task: its input format is then unknown, and guessing would give wrong outputs silently."""
    where = Path(folder).absolute()
    bank = where.parent.parent
    if where.parent.name != "tasks" or not (bank / MANIFEST).is_file():
        return None
    try:
        record = read_manifest(bank)["tasks"].get(where.name)
    except PromptBankError as e:
        raise AdapterError(
            f"{where}: a task folder of bank {bank}, whose manifest cannot be read ({e}); pass the template the "
            "adapter was trained with (CLI: --template)"
        ) from None
    if record is None:
        raise AdapterError(
            f"{where}: bank {bank} lists no task {where.name!r}; pass the template the adapter was trained with "
            "(CLI: --template)"
        )
    return record


def _show(value: Any) -> str:
    """``repr`` of a value from a file, cut to 100 characters."""
    text = repr(value)
    return text if len(text) <= 100 else text[:99] + "…"


def _float32(tensors: _Tensors, name: str) -> np.ndarray:
    """An F32/F16/BF16 tensor as finite fp32 (BF16 is the top half of fp32: widened exactly)."""
    dtype, shape, begin, _ = tensors.infos[name]
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    offset = tensors._start + begin
    if dtype == "BF16":
        half = np.frombuffer(tensors.raw, dtype="<u2", count=count, offset=offset)
        a = (half.astype(np.uint32) << 16).view(np.float32)
    else:
        np_dtype = np.dtype("<f4") if dtype == "F32" else np.dtype("<f2")
        a = np.frombuffer(tensors.raw, dtype=np_dtype, count=count, offset=offset).astype(np.float32)
    a = a.reshape(shape).copy()
    if not np.isfinite(a).all():
        raise _fail(tensors.path, f"tensor {name!r} has NaN or infinite values")
    return a

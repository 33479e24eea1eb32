"""A bank's manifest (``promptbank.json``): its format, and reading and checking it without any model library.

Everything here is torch-free, so that what only needs the manifest (``promptbank list``, :func:`bank_exists`)
starts in a fraction of a second; :mod:`promptbank.storage` reads and writes the rest of a bank (tensors,
index) and re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import BankFormatError
from .lda import ROUTING_SCORERS

logger = logging.getLogger(__name__)

# Name of the prompt variant that learn_task / import_peft create (learn_variant adds others; promote swaps them).
DEFAULT_VARIANT = "main"

FORMAT = "promptbank"
FORMAT_VERSION = 2  # 2: sha256 + size of every file and of the manifest itself; 1: no checksums
MANIFEST = "promptbank.json"
INDEX_FILE = "index.faiss"
TASK_FILES = (
    "prompt.safetensors",
    "keys.safetensors",
    "train_state.safetensors",
    "head.safetensors",
    "adapter_config.json",
    "adapter_model.safetensors",
)
VARIANT_FILES = ("prompt.safetensors", "train_state.safetensors", "head.safetensors")  # tasks/<t>/variants/<v>/

# Banks from elsewhere: a larger manifest is refused before it is read.
MAX_MANIFEST_BYTES = 64 << 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def validate_task_name(name: str) -> str:
    """Task names become folder names: letters, digits, ``_ . -``, no leading dot, at most 128 chars."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(
            f"invalid task name {name!r}: use 1-128 letters, digits, '_', '.', '-' (not starting with '.' or '-', no '..')"
        )
    return name


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content (canonical JSON, without its own ``manifest_sha256`` field)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    canon = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _leftovers(target: Path) -> list[Path]:
    """Temporary / previous-bank folders that saves of ``target`` leave behind when killed."""
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    return [target.parent / n for n in sorted(names) if n.startswith(prefixes)]


def _complete_leftover(target: Path) -> Path | None:
    """The most recently written leftover folder that holds a complete, intact bank (None if there is none)."""
    found = []
    for cand in _leftovers(target):
        try:
            manifest = _read_manifest_file(cand)
            if manifest.get("files") is not None:
                for rel, entry in manifest["files"].items():
                    _verify_file(cand, rel, entry)
            found.append(((cand / MANIFEST).stat().st_mtime_ns, cand))
        except (BankFormatError, OSError):
            continue
    return max(found)[1] if found else None


def _fail(path: Path | str, what: str) -> BankFormatError:
    return BankFormatError(f"{path}: {what}")


def _open_regular(folder: Path, rel: str) -> tuple[int, os.stat_result]:
    """Open ``folder/rel`` for reading, refusing symbolic links and anything but regular files / folders on the
    way (a bank never contains links: one could point anywhere). Returns (fd, stat)."""
    path = folder
    parts = rel.split("/")
    for i, part in enumerate(parts):
        path = path / part
        st = os.lstat(path)  # FileNotFoundError goes to the caller
        if stat.S_ISLNK(st.st_mode):
            raise _fail(path, f"is a symbolic link (to {os.readlink(path)!r}); a bank never contains links")
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise _fail(path, "is not a folder")
        if last and not stat.S_ISREG(st.st_mode):
            raise _fail(path, "is not a regular file")
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, flags)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise _fail(path, "is not a regular file")
    return fd, st


def _read_exact(fd: int, n: int, path: Path) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = os.read(fd, min(n - got, 1 << 24))
        if not b:
            raise _fail(path, f"truncated: ended after {got} of {n} bytes")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _check_entry(path: Path, size: int, entry: dict | None) -> None:
    if entry is not None and size != entry["size"]:
        raise _fail(path, f"{size} bytes, but the manifest recorded {entry['size']} (truncated or altered)")


def _check_digest(path: Path, digest: str, entry: dict | None) -> None:
    if entry is not None and digest != entry["sha256"]:
        raise _fail(path, "sha256 differs from the one in the manifest (the file was altered or is corrupt)")


def _verify_file(folder: Path, rel: str, entry: dict) -> None:
    """Check a file's size and sha256 against its manifest entry without keeping its bytes."""
    try:
        fd, st = _open_regular(folder, rel)
    except FileNotFoundError:
        raise _fail(folder / rel, "missing (listed in the manifest)") from None
    try:
        _check_entry(folder / rel, st.st_size, entry)
        h, left = hashlib.sha256(), st.st_size
        while left:
            b = os.read(fd, min(left, 1 << 22))
            if not b:
                raise _fail(folder / rel, "truncated while reading")
            h.update(b)
            left -= len(b)
    finally:
        os.close(fd)
    _check_digest(folder / rel, h.hexdigest(), entry)


def _read_small(folder: Path, rel: str, max_bytes: int, entry: dict | None) -> bytes:
    """All bytes of a file of at most ``max_bytes`` (checked before reading), checksum-verified if ``entry``."""
    fd, st = _open_regular(folder, rel)
    try:
        if st.st_size > max_bytes:
            raise _fail(folder / rel, f"{st.st_size} bytes, more than the {max_bytes} allowed")
        _check_entry(folder / rel, st.st_size, entry)
        data = _read_exact(fd, st.st_size, folder / rel)
    finally:
        os.close(fd)
    _check_digest(folder / rel, hashlib.sha256(data).hexdigest(), entry)
    return data


def _is_int(x: Any, lo: int = 0) -> bool:
    return type(x) is int and x >= lo


def _valid_name(name: str) -> bool:
    """A valid task / variant name (they become folder names)."""
    try:
        validate_task_name(name)
    except ValueError:
        return False
    return True


def _migrate_v1(manifest: dict[str, Any]) -> dict[str, Any]:
    """Format 1 -> 2: version 1 recorded no checksums (files are checked by shape and value only)."""
    return dict(manifest, format_version=2, files=None, migrated_from=1)


_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _migrate_v1}


def _read_manifest_file(folder: Path) -> dict[str, Any]:
    mpath = folder / MANIFEST
    try:
        data = _read_small(folder, MANIFEST, MAX_MANIFEST_BYTES, None)
    except FileNotFoundError:
        raise BankFormatError(f"{folder} is not a promptbank bank (no {MANIFEST})") from None
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(mpath, f"corrupt manifest ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(mpath, "not a promptbank manifest")
    version = manifest.get("format_version")
    if not _is_int(version, 1) or version > FORMAT_VERSION:
        raise _fail(
            mpath,
            f"format version {version!r} is newer than this promptbank supports ({FORMAT_VERSION}); upgrade promptbank",
        )
    if version >= 2 and manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise _fail(mpath, "manifest_sha256 does not match its content (the manifest was altered or is corrupt)")
    while manifest["format_version"] < FORMAT_VERSION:
        manifest = _MIGRATIONS[manifest["format_version"]](manifest)
    _check_manifest(manifest, mpath)
    return manifest


def _check_manifest(m: dict[str, Any], mpath: Path) -> None:
    """Structure and types of a manifest (so nothing later fails deep inside with a KeyError or TypeError)."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise _fail(mpath, what)

    bb, emb, index = m.get("backbone"), m.get("embedder"), m.get("index")
    need(
        isinstance(bb, dict)
        and isinstance(bb.get("name"), str)
        and bb.get("kind", "causal_lm") in ("causal_lm", "encoder")
        and isinstance(bb.get("fingerprint"), dict),
        "'backbone' must hold name, kind and fingerprint",
    )
    need(isinstance(emb, dict) and isinstance(emb.get("name"), str) and _is_int(emb.get("dim"), 1), "bad 'embedder'")
    need(
        isinstance(index, dict)
        and _is_int(index.get("top_keys", 1), 1)
        and (index.get("next_id") is None or _is_int(index.get("next_id")))
        and index.get("scorer", "knn") in ROUTING_SCORERS,
        f"bad 'index' (top_keys >= 1, next_id >= 0, scorer one of {ROUTING_SCORERS})",
    )
    tasks = m.get("tasks")
    need(
        isinstance(tasks, dict) and all(isinstance(v, dict) for v in tasks.values()),
        "'tasks' must map names to records",
    )
    for name in tasks:
        try:
            validate_task_name(name)
        except ValueError as e:
            raise _fail(mpath, str(e)) from None
    order = m.get("task_order", list(tasks))
    need(
        isinstance(order, list) and all(isinstance(n, str) for n in order) and len(set(order)) == len(order),
        "'task_order' must be a list of distinct names",
    )
    need(set(order) == set(tasks), f"'task_order' and 'tasks' name different tasks: {sorted(set(order) ^ set(tasks))}")
    variants = m.get("variants", {})
    need(
        isinstance(variants, dict)
        and all(
            t in tasks and isinstance(v, list) and all(isinstance(r, dict) for r in v) for t, v in variants.items()
        ),
        "'variants' must map task names to lists of variant records",
    )
    variant_names: dict[str, set[str]] = {}
    for t, recs in variants.items():
        names = [r.get("variant", DEFAULT_VARIANT) for r in recs]
        for n in names:
            need(
                isinstance(n, str) and _valid_name(n),
                f"task {t!r}: invalid variant name {str(n)[:200]!r}",
            )
        need(
            len(set(names)) == len(names) and tasks[t].get("variant", DEFAULT_VARIANT) not in names,
            f"task {t!r}: variant names must be distinct and differ from the serving one: {names[:20]}",
        )
        variant_names[t] = set(names)
    files = m.get("files")
    if files is None:
        need(not variants, "a bank without checksums cannot have prompt variants")
        return
    need(isinstance(files, dict), "'files' must map paths to {sha256, size}")
    for rel, entry in files.items():
        parts = rel.split("/") if isinstance(rel, str) else []
        known = rel == INDEX_FILE or (
            len(parts) == 3 and parts[0] == "tasks" and parts[1] in tasks and parts[2] in TASK_FILES
        )
        known = known or (
            len(parts) == 5
            and parts[0] == "tasks"
            and parts[2] == "variants"
            and parts[3] in variant_names.get(parts[1], ())
            and parts[4] in VARIANT_FILES
        )
        need(known, f"unexpected file entry {str(rel)[:200]!r}")
        need(
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and len(entry["sha256"]) == 64
            and all(c in "0123456789abcdef" for c in entry["sha256"])
            and _is_int(entry.get("size")),
            f"bad checksum entry for {rel!r}",
        )
    for name in tasks:
        for req in ("prompt.safetensors", "keys.safetensors"):
            need(f"tasks/{name}/{req}" in files, f"no checksum for tasks/{name}/{req}")
        for v in sorted(variant_names.get(name, ())):
            need(
                f"tasks/{name}/variants/{v}/prompt.safetensors" in files,
                f"no checksum for tasks/{name}/variants/{v}/prompt.safetensors",
            )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of bank folder ``path``, validated and migrated to the current format version.

    When the folder is missing because a save was interrupted, the manifest of the complete leftover bank is read.
    """
    return _read_manifest_file(_readable_folder(Path(path)))


def bank_exists(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a bank, or is missing but a save interrupted between its two renames left a
    complete bank next to it (which :func:`load_bank` reads and the next save puts back)."""
    return (_readable_folder(Path(path)) / MANIFEST).is_file()


def _readable_folder(where: Path) -> Path:
    """``where``, or, when it is missing because a save was interrupted between its two renames (or is between
    them right now), the complete leftover bank next to it."""
    if os.path.lexists(where):
        return where
    cand = _complete_leftover(where.absolute())
    if cand is not None:
        logger.warning("bank %s is missing; reading the complete bank left by an interrupted save: %s", where, cand)
        return cand
    return where

"""Reliability of banks (issue 6): crash safety under SIGKILL, one writer at a time, readers that never see a
half-written bank, per-file checksums and format migration, hostile bank folders, and concurrent inference while
a task is being learned. Tiny config-built models only."""

from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import fast_options, make_tiny_model, make_tiny_tokenizer
from safetensors.torch import save as st_save
from test_bank import ECHO, FRUIT, WEATHER

from promptbank import BankFormatError, PromptBank, storage
from promptbank.embed import HashingEmbedder
from promptbank.storage import MANIFEST, BankLockedError, bank_lock, manifest_digest

BASE = ["weather", "fruit", "echo"]
COLORS = [
    {"text": f"my favourite colour is {c}", "label": lab}
    for c, lab in [("red", "warm"), ("blue", "cool"), ("orange", "warm"), ("green", "cool")] * 4
]


# ---------------------------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(scope="module")
def built(_tiny_backbone_proto, tmp_path_factory):
    """A bank with an input-level, a deep and a P-Tuning (train state) task, saved once per module."""
    bank = PromptBank(copy.deepcopy(_tiny_backbone_proto), HashingEmbedder(dim=128))
    bank.learn_task("weather", WEATHER, num_virtual_tokens=4, **fast_options())
    bank.learn_task("fruit", FRUIT, method="deep", num_virtual_tokens=3, **fast_options())
    bank.learn_task("echo", ECHO, method="ptuning_mlp", num_virtual_tokens=4, **fast_options())
    folder = tmp_path_factory.mktemp("reliability") / "bank"
    bank.save(folder)
    return bank, folder


@pytest.fixture
def saved(built, tmp_path):
    """A fresh copy of the saved bank folder, and the bank it holds."""
    bank, folder = built
    dst = tmp_path / "bank"
    shutil.copytree(folder, dst)
    return bank, dst


def _load(bank: PromptBank, folder: Path, **kw) -> PromptBank:
    return PromptBank.load(folder, backbone=bank.backbone, embedder=bank.embedder, **kw)


def _manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST).read_text())


def _reseal(folder: Path, manifest: dict | None = None, *, skip: tuple[str, ...] = ()) -> None:
    """Rewrite the manifest with checksums matching the files as they are now (what a forger would do):
    checks beyond checksums must still catch what is wrong. Files in ``skip`` keep their recorded sha256 but get
    their current size (so the header check runs before the checksum would fail)."""
    m = manifest if manifest is not None else _manifest(folder)
    for rel in list(m.get("files") or {}):
        p = folder / rel
        if not p.is_file() or p.is_symlink():
            continue
        size = p.stat().st_size
        sha = m["files"][rel]["sha256"] if rel in skip else hashlib.sha256(p.read_bytes()).hexdigest()
        m["files"][rel] = {"sha256": sha, "size": size}
    m["manifest_sha256"] = manifest_digest(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def _header_file(tensors: dict[str, tuple[str, list[int]]], data: bytes = b"") -> bytes:
    """A safetensors file with a hand-written header (tensors laid out back to back) and ``data`` as its body."""
    header, pos = {}, 0
    sizes = {"F32": 4, "F64": 8, "F16": 2, "I64": 8}
    for name, (dtype, shape) in tensors.items():
        n = int(np.prod(shape)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _same_tasks(a: PromptBank, b: PromptBank) -> None:
    assert list(a.tasks) == list(b.tasks)
    for name in a.tasks:
        ta, tb = a._tasks[name], b._tasks[name]
        assert ta.record == tb.record
        assert ta.prompt.keys() == tb.prompt.keys()
        assert all(torch.equal(ta.prompt[k], tb.prompt[k]) for k in ta.prompt)
        assert np.array_equal(ta.keys, tb.keys)
        assert ta.train_state.keys() == tb.train_state.keys()
        assert all(torch.equal(ta.train_state[k], tb.train_state[k]) for k in ta.train_state)


# ---------------------------------------------------------------------------------------------- 1. crash safety


def _state(i: int) -> list[str]:
    """Task names of the bank after the crash child's save number ``i`` (-1: the initial bank)."""
    return BASE + [f"t{j}" for j in range(max(0, i - 2), i + 1)]


def _tiny_bank_from(path: str) -> PromptBank:
    from promptbank.backbone import from_model

    tok = make_tiny_tokenizer()
    bb = from_model(make_tiny_model(len(tok)), tok, name="tiny-llama-gqa")
    return PromptBank.load(path, backbone=bb, embedder=HashingEmbedder(dim=128))


def _crash_child(path: str, start: int, exchange: bool, learn: bool, conn) -> None:
    """Run in a forkserver child: move the bank through states _state(start), _state(start + 1), ... saving after
    each step and reporting each save's start and end, until the parent kills it."""
    from promptbank.bank import _Task

    torch.set_num_threads(1)
    storage._USE_EXCHANGE = exchange
    bank = _tiny_bank_from(path)
    base = bank._tasks["weather"]
    conn.send(("ready", start))
    i = start
    while True:
        if f"t{i - 3}" in bank:
            bank.remove_task(f"t{i - 3}")
        if learn and i % 2:
            bank.learn_task(f"t{i}", FRUIT, num_virtual_tokens=2, **fast_options(max_steps=1, warm_start=False))
        else:
            prompt = {k: v.clone() for k, v in base.prompt.items()}
            bank._insert(_Task(replace(base.record, name=f"t{i}"), prompt, base.keys.copy(), {}, None))
        conn.send(("start", i))
        bank.save(path)
        conn.send(("done", i))
        i += 1


def _lock_child(path: str, conn) -> None:
    with bank_lock(path):
        conn.send(("locked", os.getpid()))
        time.sleep(60)


@pytest.fixture(scope="module")
def forkserver():
    """Children forked from a server that imported torch/transformers once (a fresh interpreter per kill would
    cost ~6 s; fork() of this process is unsafe after torch has started its thread pools)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "faiss", "promptbank.bank", "promptbank.storage", "pytest"])
    return ctx


def test_sigkill_during_save_20_times_always_leaves_a_loadable_bank(built, tmp_path, forkserver):
    bank0, folder = built
    path = tmp_path / "bank"
    shutil.copytree(folder, path)
    base_prompt = bank0._tasks["weather"].prompt
    rng = random.Random(0)
    on_disk, stats = -1, {"mid_save": 0, "recovered_from_leftover": 0, "kills": 0}
    for kill in range(20):
        exchange, learn = kill % 3 != 1, kill % 3 == 2  # atomic exchange / two-rename fallback; learn_task -> save
        reader, writer = forkserver.Pipe(duplex=False)
        child = forkserver.Process(target=_crash_child, args=(str(path), on_disk + 1, exchange, learn, writer))
        child.start()
        writer.close()
        assert reader.poll(60), "crash child did not start"
        assert reader.recv() == ("ready", on_disk + 1)
        time.sleep(rng.uniform(0.0, 0.6))
        child.kill()  # SIGKILL
        child.join(10)
        assert child.exitcode == -9
        stats["kills"] += 1
        last, done = None, on_disk
        while reader.poll():
            try:
                last = reader.recv()
            except EOFError:
                break
            if last[0] == "done":
                done = last[1]
        stats["mid_save"] += last is not None and last[0] == "start"
        stats["recovered_from_leftover"] += not path.exists()
        loaded = _load(bank0, path)  # must always succeed
        names = list(loaded.tasks)
        assert names in (_state(done), _state(done + 1)), (kill, done, names)
        on_disk = done if names == _state(done) else done + 1
        for name in names:  # copies of "weather" (not learned ones) hold its exact tensors
            if loaded.tasks[name] == replace(bank0.tasks["weather"], name=name):
                assert all(torch.equal(loaded._tasks[name].prompt[k], base_prompt[k]) for k in base_prompt)
        assert loaded.route("the weather is sunny today").task == "weather"
    final = _load(bank0, path)
    final.save(path)  # a save after the crashes removes the leftovers and its lock file
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert list(_load(bank0, path).tasks) == _state(on_disk)
    print(
        f"crash safety: {stats['kills']}/20 kills recovered, {stats['mid_save']} during save(), "
        f"{stats['recovered_from_leftover']} with the bank folder missing"
    )
    assert stats["mid_save"] >= 5  # the kills really hit saves


def test_lock_refuses_a_second_writer_and_dies_with_its_holder(saved, forkserver):
    bank, path = saved
    loaded = _load(bank, path)
    with bank_lock(path) as lock_file:  # same process, other open file: flock conflicts like another process
        assert lock_file.name == ".bank.lock"
        with pytest.raises(BankLockedError, match=rf"being saved by another writer \(process {os.getpid()}"):
            loaded.save(path)
    reader, writer = forkserver.Pipe(duplex=False)
    child = forkserver.Process(target=_lock_child, args=(str(path), writer))
    child.start()
    assert reader.poll(60)
    _, pid = reader.recv()
    with pytest.raises(BankLockedError, match=str(pid)):
        loaded.save(path)
    child.kill()
    child.join(10)
    loaded.save(path)  # the kernel dropped the dead writer's lock
    assert not (path.parent / ".bank.lock").exists()


def test_concurrent_saves_from_threads_one_wins_others_refused(saved):
    bank, path = saved
    loaded = _load(bank, path)
    results, barrier = [], threading.Barrier(4)

    def save():
        barrier.wait()
        try:
            for _ in range(5):
                loaded.save(path)
            results.append("ok")
        except BankLockedError:
            results.append("locked")

    threads = [threading.Thread(target=save) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "locked" in results and len(results) == 4
    _same_tasks(_load(bank, path), loaded)


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_readers_never_see_a_half_written_bank(saved, monkeypatch, exchange):
    bank, path = saved
    monkeypatch.setattr(storage, "_USE_EXCHANGE", exchange)
    small = _load(bank, path)
    small.remove_task("echo")
    states = {tuple(BASE): _load(bank, path), ("weather", "fruit"): small}
    stop, loads, errors = threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                got = _load(bank, path)
                _same_tasks(got, states[tuple(got.tasks)])
                loads.append(tuple(got.tasks))
            except Exception as e:  # noqa: BLE001 - every failure is a test failure
                errors.append(repr(e))

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        for i in range(24):
            (states[tuple(BASE)] if i % 2 else small).save(path)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:3]
    assert len(set(loads)) == 2 and len(loads) >= 10, (len(loads), set(loads))


def test_load_recovers_when_killed_between_the_two_renames(built, tmp_path):
    """The two-rename fallback leaves no bank folder for an instant: a crash there leaves the old bank in
    `.bank.old-PID` and the new one in `.bank.tmp-*`; load reads the newest complete one, the next save puts it
    back in place and removes the rest."""
    bank0, folder = built
    target, other = tmp_path / "bank", tmp_path / "other"
    shutil.copytree(folder, target)
    newer = _load(bank0, folder)
    newer.remove_task("echo")
    newer.save(other)
    old, tmp = tmp_path / ".bank.old-4242", tmp_path / ".bank.tmp-abc123"
    os.rename(target, old)
    os.rename(other, tmp)
    now = time.time()
    os.utime(old / MANIFEST, (now - 10, now - 10))
    (tmp_path / ".bank.tmp-partial").mkdir()  # a save killed while writing: no manifest yet
    assert list(_load(bank0, target).tasks) == ["weather", "fruit"]  # the newest complete bank
    assert set(storage.read_manifest(target)["tasks"]) == {"weather", "fruit"}
    assert storage.bank_exists(target) and not storage.bank_exists(tmp_path / "elsewhere")
    (tmp / "tasks" / "fruit" / "prompt.safetensors").write_bytes(b"x")  # not complete any more
    assert list(_load(bank0, target).tasks) == BASE  # then the old one
    shutil.rmtree(old)
    with pytest.raises(BankFormatError, match="not a promptbank bank"):
        _load(bank0, target)
    shutil.copytree(folder, old)
    newer.save(target)  # restores the leftover first, then writes: nothing but the target remains
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]
    assert list(_load(bank0, target).tasks) == ["weather", "fruit"]


def test_stale_leftovers_next_to_an_intact_bank_are_ignored_then_removed(saved):
    bank, path = saved
    shutil.copytree(path, path.parent / ".bank.tmp-dead")  # e.g. killed after the exchange, before cleanup
    (path.parent / ".bank.lock").write_text("999999\n")  # a dead writer's lock file: not locked
    loaded = _load(bank, path)
    _same_tasks(loaded, bank)
    loaded.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["bank"]


# ---------------------------------------------------------------------------------------------- 2. integrity


def test_manifest_records_checksums_of_every_file(saved):
    _, path = saved
    m = _manifest(path)
    assert m["format_version"] == storage.FORMAT_VERSION == 2
    on_disk = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(m["files"]) == on_disk
    for rel, entry in m["files"].items():
        data = (path / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert m["manifest_sha256"] == manifest_digest(m)


FILES = [
    "index.faiss",
    "tasks/weather/prompt.safetensors",
    "tasks/weather/keys.safetensors",
    "tasks/fruit/prompt.safetensors",
    "tasks/echo/train_state.safetensors",
    "tasks/echo/adapter_config.json",
    "tasks/fruit/adapter_model.safetensors",
]


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("rel", FILES)
def test_truncated_or_altered_files_are_detected_and_named(saved, rel, how):
    bank, path = saved
    f = path / rel
    data = bytearray(f.read_bytes())
    if how == "truncate":
        f.write_bytes(data[: len(data) // 2])
    else:
        data[-3] ^= 0x01  # one bit of the last value
        f.write_bytes(bytes(data))
    for trust in (False, True):
        with pytest.raises(BankFormatError, match=rf"{rel}: .*(truncated|altered)"):
            _load(bank, path, trust_index=trust)


def test_truncated_or_altered_manifest_is_detected(saved):
    bank, path = saved
    mpath = path / MANIFEST
    text = mpath.read_text()
    m = json.loads(text)
    m["tasks"]["weather"]["threshold"] = -1.0  # route everything to weather
    mpath.write_text(json.dumps(m))
    with pytest.raises(BankFormatError, match=r"promptbank\.json: manifest_sha256 does not match"):
        _load(bank, path)
    mpath.write_text(text[: len(text) // 2])
    with pytest.raises(BankFormatError, match=r"promptbank\.json: corrupt manifest"):
        _load(bank, path)


def test_index_that_disagrees_with_the_keys_is_rebuilt(saved, built):
    bank, path = saved
    _, folder = built
    other = _load(bank, folder)
    other.remove_task("fruit")
    (path / "index.faiss").write_bytes(other.router.index_bytes())  # a stale index for other keys, sealed
    _reseal(path)
    loaded = _load(bank, path, trust_index=True)
    assert loaded.router.ntotal == bank.router.ntotal
    queries = ["the weather is sunny today", "i would like to eat a lemon", "repeat dog"]
    assert [r.ranked for r in loaded.route_many(queries)] == [r.ranked for r in bank.route_many(queries)]
    (path / "index.faiss").unlink()  # a derived cache: deleting it is fine
    assert [r.ranked for r in _load(bank, path, trust_index=True).route_many(queries)] == [
        r.ranked for r in bank.route_many(queries)
    ]


def test_version_1_bank_without_checksums_migrates(saved, tmp_path):
    bank, path = saved
    m = _manifest(path)
    del m["files"], m["manifest_sha256"]
    m["format_version"] = 1
    (path / MANIFEST).write_text(json.dumps(m, indent=2))  # what promptbank 0.1 wrote
    assert storage.read_manifest(path)["migrated_from"] == 1
    loaded = _load(bank, path)
    _same_tasks(loaded, bank)
    loaded.save(tmp_path / "v2")
    assert _manifest(tmp_path / "v2")["format_version"] == 2 and _manifest(tmp_path / "v2")["files"]
    _same_tasks(_load(bank, tmp_path / "v2"), bank)
    f = path / "tasks" / "weather" / "prompt.safetensors"  # no checksums, but still validated
    f.write_bytes(f.read_bytes()[:-8])
    with pytest.raises(BankFormatError, match=r"weather/prompt\.safetensors: .*truncated"):
        _load(bank, path)


def test_newer_format_version_is_refused(saved):
    bank, path = saved
    m = _manifest(path)
    m["format_version"] = 3
    _reseal(path, m)
    with pytest.raises(BankFormatError, match=r"promptbank\.json: format version 3 is newer"):
        _load(bank, path)


# ---------------------------------------------------------------------------------------------- 3. hostile banks


def test_loading_never_unpickles(saved, monkeypatch):
    bank, path = saved

    def forbidden(*a, **k):
        raise AssertionError("a bank load unpickled something")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"), (np, "load")]:
        monkeypatch.setattr(mod, name, forbidden)
    import _pickle

    monkeypatch.setattr(_pickle, "load", forbidden)
    monkeypatch.setattr(_pickle, "loads", forbidden)
    for trust in (False, True):
        _same_tasks(_load(bank, path, trust_index=trust), bank)


def test_load_bank_defaults_to_not_trusting_the_index():
    import inspect

    assert inspect.signature(PromptBank.load).parameters["trust_index"].default is False
    assert inspect.signature(storage.load_bank).parameters["trust_index"].default is False


@pytest.mark.parametrize("name", ["../x", "/etc", "a/b", "..", ".hidden", "x" * 300, ""])
def test_hostile_task_names_are_refused(saved, name):
    bank, path = saved
    m = _manifest(path)
    m["tasks"][name] = dict(m["tasks"]["weather"], name=name)
    m["task_order"].append(name)
    _reseal(path, m)
    with pytest.raises(BankFormatError, match=r"promptbank\.json: invalid task name"):
        _load(bank, path)


@pytest.mark.parametrize(
    "rel", ["../../outside.safetensors", "/etc/passwd", "tasks/weather/../../../x", "tasks/ghost/prompt.safetensors"]
)
def test_checksum_entries_outside_the_bank_are_refused(saved, rel):
    bank, path = saved
    m = _manifest(path)
    m["files"][rel] = {"sha256": "0" * 64, "size": 1}
    _reseal(path, m)
    with pytest.raises(BankFormatError, match="unexpected file entry"):
        _load(bank, path)


def test_mismatched_record_name_is_refused(saved):
    bank, path = saved
    m = _manifest(path)
    m["tasks"]["weather"]["name"] = "../fruit"
    _reseal(path, m)
    with pytest.raises(BankFormatError, match="task 'weather': record names '../fruit'"):
        _load(bank, path)


@pytest.mark.parametrize("what", ["file", "folder", "index"])
def test_symlinks_out_of_the_bank_are_refused(saved, tmp_path, what):
    bank, path = saved
    rel = {"file": "tasks/weather/prompt.safetensors", "folder": "tasks/weather", "index": "index.faiss"}[what]
    outside = tmp_path / "outside"
    shutil.move(path / rel, outside)  # same bytes, so checksums would pass: only the link check can refuse it
    os.symlink(outside, path / rel)
    with pytest.raises(BankFormatError, match=r"is a symbolic link .*a bank never contains links"):
        _load(bank, path, trust_index=True)


def test_special_files_are_refused_without_blocking(saved):
    bank, path = saved
    f = path / "tasks" / "weather" / "keys.safetensors"
    f.unlink()
    os.mkfifo(f)  # opening a FIFO for reading would wait for a writer forever
    with pytest.raises(BankFormatError, match=r"keys\.safetensors: is not a regular file"):
        _load(bank, path)


HUGE = {
    "prompt_P": ("tasks/weather/prompt.safetensors", {"layer.0": ("F32", [100_000, 32])}, "expected F32 \\(4, 32\\)"),
    "prompt_d": ("tasks/weather/prompt.safetensors", {"layer.0": ("F32", [4, 33])}, "expected F32 \\(4, 32\\)"),
    "prompt_f64": ("tasks/weather/prompt.safetensors", {"layer.0": ("F64", [4, 32])}, "is F64 \\[4, 32\\]"),
    "prompt_f16": ("tasks/weather/prompt.safetensors", {"layer.0": ("F16", [4, 32])}, "is F16"),
    "prompt_extra": (
        "tasks/weather/prompt.safetensors",
        {"layer.0": ("F32", [4, 32]), "layer.1": ("F32", [4, 32])},
        "unexpected tensors \\['layer.1'\\]",
    ),
    "keys_huge": (
        "tasks/weather/keys.safetensors",
        {"keys": ("F32", [1 << 24, 128]), "ids": ("I64", [1 << 24])},
        "1 <= k <= 65536",
    ),
    "keys_dim": ("tasks/weather/keys.safetensors", {"keys": ("F32", [3, 64]), "ids": ("I64", [3])}, "\\(k, 128\\)"),
    "state_f64": ("tasks/echo/train_state.safetensors", {"embeddings": ("F64", [4, 32])}, "expected F32"),
}


@pytest.mark.parametrize("case", sorted(HUGE))
def test_huge_or_wrong_tensors_are_refused_from_the_header(saved, case, monkeypatch):
    """Shapes and dtypes come from the header, checked before any tensor data is read: a header announcing 8 GiB
    of keys (a sparse file here) is refused without reading its data (no read of that file beyond its header)."""
    bank, path = saved
    rel, tensors, message = HUGE[case]
    raw = _header_file(tensors)
    body = sum(int(np.prod(s)) * {"F32": 4, "F64": 8, "F16": 2, "I64": 8}[d] for d, s in tensors.values())
    with open(path / rel, "wb") as f:
        f.write(raw)
        f.truncate(len(raw) + body)  # sparse: no disk used, but reading it would take 8 GiB of memory
    _reseal(path, skip=(rel,))  # true size recorded; the sha256 could only be checked by reading everything
    reads: list[tuple[str, int]] = []
    read_exact = storage._read_exact

    def spy(fd, n, where):
        reads.append((str(where), n))
        return read_exact(fd, n, where)

    monkeypatch.setattr(storage, "_read_exact", spy)
    with pytest.raises(BankFormatError, match=rf"{rel}: .*{message}"):
        _load(bank, path)
    mine = [n for where, n in reads if where == str(path / rel)]
    assert mine and sum(mine) == len(raw)  # the 8-byte length and the header, nothing of the body


@pytest.mark.parametrize(
    "header",
    [
        b"\xff" * 8,  # header length beyond the file
        (20).to_bytes(8, "little") + b"{not json at all!!!}",
        (2).to_bytes(8, "little") + b"[]",
        _header_file({"layer.0": ("F32", [4, 32])}),  # a fine header, but no data
    ],
    ids=["length", "json", "not-object", "no-data"],
)
def test_corrupt_safetensors_headers_are_refused(saved, header):
    bank, path = saved
    (path / "tasks/weather/prompt.safetensors").write_bytes(header)
    _reseal(path)
    with pytest.raises(BankFormatError, match=r"weather/prompt\.safetensors: "):
        _load(bank, path)


def test_overlapping_tensor_offsets_are_refused(saved):
    bank, path = saved
    raw = json.dumps(
        {
            "keys": {"dtype": "F32", "shape": [1, 128], "data_offsets": [0, 512]},
            "ids": {"dtype": "I64", "shape": [1], "data_offsets": [504, 512]},
        }
    ).encode()
    (path / "tasks/weather/keys.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(512))
    _reseal(path)
    with pytest.raises(BankFormatError, match="overlapping or a gap"):
        _load(bank, path)


@pytest.mark.parametrize(
    "rel, tensor",
    [
        ("tasks/weather/prompt.safetensors", "layer.0"),
        ("tasks/weather/keys.safetensors", "keys"),
        ("tasks/echo/train_state.safetensors", None),
    ],
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_values_are_refused(saved, rel, tensor, bad):
    from safetensors.torch import load_file

    bank, path = saved
    tensors = load_file(str(path / rel))
    tensor = tensor or sorted(tensors)[0]
    tensors[tensor].view(-1)[0] = bad
    (path / rel).write_bytes(st_save(tensors))
    _reseal(path)
    with pytest.raises(BankFormatError, match=rf"{rel}: tensor '{tensor}' has NaN or infinite values"):
        _load(bank, path)


def test_encoder_head_shape_and_values_are_checked(_tiny_backbone_proto, tmp_path):
    from transformers import BertConfig, BertModel

    from promptbank.backbone import from_model

    tok = make_tiny_tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    bank = PromptBank(from_model(BertModel(cfg), tok, name="tiny-bert"), HashingEmbedder(dim=128))
    bank.learn_task("weather", WEATHER, num_virtual_tokens=2, **fast_options(max_steps=2))
    path = tmp_path / "bank"
    bank.save(path)
    _same_tasks(_load(bank, path), bank)
    head = path / "tasks/weather/head.safetensors"
    good = head.read_bytes()
    head.write_bytes(st_save({"weight": torch.zeros(3, 32), "bias": torch.zeros(3)}))
    _reseal(path)
    with pytest.raises(
        BankFormatError, match=r"head\.safetensors: tensor 'weight' is F32 \[3, 32\]; expected F32 \(2, 32\)"
    ):
        _load(bank, path)
    head.write_bytes(st_save({"weight": torch.full((2, 32), float("inf")), "bias": torch.zeros(2)}))
    _reseal(path)
    with pytest.raises(BankFormatError, match="tensor 'weight' has NaN or infinite values"):
        _load(bank, path)
    head.write_bytes(good)
    _reseal(path)
    m = _manifest(path)
    del m["files"]["tasks/weather/head.safetensors"]
    _reseal(path, m)
    with pytest.raises(BankFormatError, match=r"head\.safetensors: missing"):
        _load(bank, path)


def test_huge_manifest_is_refused_before_parsing(saved):
    bank, path = saved
    with open(path / MANIFEST, "r+b") as f:
        f.truncate(65 << 20)  # sparse
    with pytest.raises(BankFormatError, match=r"promptbank\.json: 68157440 bytes, more than the 67108864 allowed"):
        _load(bank, path)


@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"format": ' + "9" * 10_000 + "}", '"just a string"', "\xff\xfe"],
    ids=["deep-nesting", "huge-int", "not-object", "not-utf8"],
)
def test_json_bombs_in_the_manifest_are_refused(saved, text):
    bank, path = saved
    (path / MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(BankFormatError, match=r"promptbank\.json: (corrupt|not a promptbank) manifest"):
        _load(bank, path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("template", "{input.__class__.__mro__}", "template must be a str"),
        ("template", "{input:>999999999}", "template must be a str"),
        ("template", "{0}", "template must be a str"),
        ("threshold", "high", "threshold must be a finite number"),
        ("threshold", float("nan"), "threshold must be a finite number"),
        ("labels", 5, "labels must be a list of strings"),
        ("kind", "exec", "unknown kind"),
        ("train_config", {"max_target_tokens": "many"}, "train_config\\['max_target_tokens'\\] must be a positive int"),
        ("prompt_config", {"method": "pickle"}, "bad record"),
        ("surprise", 1, "bad record"),
    ],
)
def test_malformed_task_records_are_refused(saved, field, value, message):
    bank, path = saved
    m = _manifest(path)
    m["tasks"]["weather"][field] = value
    _reseal(path, m)
    with pytest.raises(BankFormatError, match=rf"promptbank\.json: task 'weather': {message}"):
        _load(bank, path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(backbone="x"),
        lambda m: m["embedder"].update(dim="128"),
        lambda m: m["index"].update(top_keys=0),
        lambda m: m.update(tasks=[]),
        lambda m: m.update(task_order=["weather", "weather"]),
        lambda m: m.update(task_order=["weather"]),
        lambda m: m["files"]["index.faiss"].update(sha256="zz"),
        lambda m: m["files"].pop("tasks/weather/keys.safetensors"),
    ],
)
def test_malformed_manifests_are_refused_with_bank_format_errors(saved, edit):
    bank, path = saved
    m = _manifest(path)
    edit(m)
    m["manifest_sha256"] = manifest_digest(m)
    (path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BankFormatError, match=r"promptbank\.json: "):
        _load(bank, path)


# ---------------------------------------------------------------------------------------------- 4. concurrency


def test_concurrent_predict_and_generate_while_a_task_is_learned(built):
    """8 threads run mixed-task predict / generate while another thread learns and adds a task: no errors, every
    output equal to the serial one, and the new task appears atomically (in `tasks` exactly when routable)."""
    bank0, folder = built
    bank = _load(bank0, folder)
    learn = dict(num_virtual_tokens=3, **fast_options(max_steps=8, warm_start=False))
    q_new = "my favourite colour is red"
    requests = [
        ("predict", ["the weather is sunny today", "i would like to eat a cherry", "the weather is awful"],
         ["weather", "fruit", "fruit"]),
        ("predict", ["the weather is rainy today", "i would like to eat a lemon", "quantum chromodynamics"], None),
        ("predict", ["i would like to eat a banana"], "fruit"),
        ("generate", ["repeat dog", "the weather is cold", "hello"], ["echo", "weather", None]),
        ("generate", ["repeat sun"], None),
    ]  # fmt: skip

    def run(bank, req):
        kind, texts, task = req
        if kind == "generate":
            return bank.generate(texts, task, max_new_tokens=4)
        return [(p.output, p.task, p.label_scores) for p in bank.predict(texts, task)]

    def same(a, b) -> bool:
        if a and isinstance(a[0], str):
            return a == b
        return all(
            x[:2] == y[:2]
            and (x[2] is None) == (y[2] is None)
            and (x[2] is None or x[2] == pytest.approx(y[2], abs=1e-4))
            for x, y in zip(a, b)
        ) and len(a) == len(b)

    serial = [run(bank, r) for r in requests]
    ref = _load(bank0, folder)
    ref.learn_task("colors", COLORS, **learn)
    assert all(same(run(ref, r), s) for r, s in zip(requests, serial))  # the new task changes none of these
    assert ref.route(q_new).task == "colors"
    new_answer = run(ref, ("predict", [q_new], "colors"))
    before_routed, after_routed = run(bank, ("predict", [q_new], None)), run(ref, ("predict", [q_new], None))

    errors, calls, seen = [], [0], {"absent": 0, "present": 0}
    done = threading.Event()

    def worker(k: int):  # mixed-task predict / generate, each output checked against the serial one
        rng = random.Random(k)
        try:
            while not done.is_set() or calls[0] < 80:
                i = rng.randrange(len(requests))
                out = run(bank, requests[i])
                if not same(out, serial[i]):
                    errors.append(f"request {i}: {out} != {serial[i]}")
                calls[0] += 1
        except Exception as e:  # noqa: BLE001 - any exception is a failure
            errors.append(f"worker: {type(e).__name__}: {e}")

    def observer(route_first: bool):  # the new task: absent, or routable, listed and answering like the serial one
        try:
            while True:
                last = done.is_set()  # one more round after the task was added
                if route_first:
                    routed = bank.route(q_new).task
                    present = "colors" in bank.tasks
                else:
                    present = "colors" in bank.tasks
                    routed = bank.route(q_new).task
                if (routed == "colors" and not present) if route_first else (present and routed != "colors"):
                    errors.append(f"not atomic: routed to {routed!r}, in bank.tasks: {present}")
                if present and not same(run(bank, ("predict", [q_new], "colors")), new_answer):
                    errors.append("new task answered differently")
                if not present:  # routed again: the task may have been added meanwhile
                    got = run(bank, ("predict", [q_new], None))
                    if not (same(got, before_routed) or same(got, after_routed)):
                        errors.append(f"routed answer {got} is neither the one before nor after the new task")
                seen["present" if present else "absent"] += 1
                if last:
                    break
        except Exception as e:  # noqa: BLE001
            errors.append(f"observer: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    threads += [threading.Thread(target=observer, args=(first,)) for first in (True, False)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads every few bytecodes: races show up within seconds
    try:
        for t in threads:
            t.start()
        rec = bank.learn_task("colors", COLORS, **learn)  # this thread learns while the others run
    finally:
        done.set()
        for t in threads:
            t.join(120)
        sys.setswitchinterval(interval)
    assert not errors, errors[:5]
    assert rec.steps == ref.tasks["colors"].steps
    for k, v in ref.soft_prompt("colors").items():  # learning next to 8 busy readers gives the serial result
        torch.testing.assert_close(bank.soft_prompt("colors")[k], v, atol=1e-6, rtol=1e-6)
    assert same(run(bank, ("predict", [q_new], "colors")), new_answer)
    assert seen["absent"] > 0 and seen["present"] > 0, seen
    print(
        f"concurrency: {calls[0]} calls from 8 threads, 0 errors; new task observed absent {seen['absent']}x, "
        f"present {seen['present']}x"
    )


def test_inference_is_unaffected_while_tasks_are_added_and_removed(built):
    """A writer thread adds and removes 500 tasks while 4 threads predict (routed and with tasks given) and list
    tasks: no errors, outputs equal to the serial ones, and every listing a state the bank was really in."""
    from promptbank.bank import _Task

    bank0, folder = built
    bank = _load(bank0, folder)
    base = bank._tasks["fruit"]
    requests = [
        (["the weather is sunny today", "i would like to eat a cherry", "quantum chromodynamics"], None),
        (["the weather is awful", "i would like to eat a lemon"], ["weather", "fruit"]),
    ]
    serial = [[(p.output, p.task) for p in bank.predict(t, k)] for t, k in requests]
    # the learned router's scores move a little when a task is added (one covariance is shared by all tasks):
    # compare decisions and the ranking of the base tasks
    routes = [(r.task, [n for n, _ in r.ranked]) for r in bank.route_many(requests[0][0], top_k=10)]
    errors, done = [], threading.Event()

    def reader(k: int):
        try:
            while not done.is_set():
                if k < 3:  # routing only: cheap, so it overlaps many of the writer's changes
                    got = [  # the added tasks aside, the same decisions and ranking
                        (r.task, [n for n, _ in r.ranked if n in BASE])
                        for r in bank.route_many(requests[0][0], top_k=10)
                    ]
                    if got != routes:
                        errors.append(f"routed {got} != {routes}")
                else:
                    texts, task = requests[k % 2]
                    got = [(p.output, p.task) for p in bank.predict(texts, task)]
                    if got != serial[k % 2]:
                        errors.append(f"{got} != {serial[k % 2]}")
                names = list(bank.tasks)
                if names[:3] != BASE or len(names) > 4:
                    errors.append(f"listed {names}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        for t in threads:
            t.start()
        for i in range(500):
            far = _Task(replace(base.record, name=f"c{i}"), base.prompt, -base.keys, {}, None)  # routes nothing here
            bank._insert(far)
            bank.remove_task(f"c{i}")
    finally:
        done.set()
        for t in threads:
            t.join(60)
        sys.setswitchinterval(interval)
    assert not errors, errors[:5]
    assert list(bank.tasks) == BASE and bank.router.tasks == BASE

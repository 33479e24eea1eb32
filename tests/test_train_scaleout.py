"""Scale-out of the training loop: length-bucketed batches (less padding) and data-parallel training under a
distributed launcher (``torchrun``, ``accelerate launch``), which must give every process, and a single process,
the same soft prompt."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from promptbank.config import TrainConfig
from promptbank.train import _batches, _bucketed_batches, train_loop

TESTS = Path(__file__).parent


def _epochs(batches, n: int, count: int) -> list[list[list[int]]]:
    """The next ``count`` epochs (lists of batches covering ``n`` examples) from an endless batch generator."""
    out = []
    for _ in range(count):
        epoch, seen = [], 0
        while seen < n:
            epoch.append(next(batches))
            seen += len(epoch[-1])
        out.append(epoch)
    return out


def _padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    """Padding when each batch is padded to its longest row: rows x longest, minus the real tokens."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches)


def _skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Mostly short rows and a long tail, as in real text data."""
    rng = random.Random(seed)
    return [rng.randint(200, 500) if rng.random() < 0.1 else rng.randint(5, 40) for _ in range(n)]


def test_bucketed_batches_are_deterministic_for_a_seed():
    lengths = _skewed_lengths(1000)
    a = _epochs(_bucketed_batches(lengths, 8, random.Random(3)), 1000, 3)
    b = _epochs(_bucketed_batches(lengths, 8, random.Random(3)), 1000, 3)
    c = _epochs(_bucketed_batches(lengths, 8, random.Random(4)), 1000, 3)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # reshuffled every epoch


@pytest.mark.parametrize("n, batch_size", [(1234, 7), (13, 4), (400, 8), (3, 16)])
def test_bucketed_batches_cover_every_example_once_per_epoch(n, batch_size):
    lengths = _skewed_lengths(n)
    epochs = _epochs(_bucketed_batches(lengths, batch_size, random.Random(0)), n, 4)
    for epoch in epochs:
        assert sorted(i for batch in epoch for i in batch) == list(range(n))
        assert all(1 <= len(batch) <= batch_size for batch in epoch)
        assert sum(len(batch) < batch_size for batch in epoch) <= 1  # only the last chunk can end short


def test_bucketing_cuts_padding_by_more_than_half():
    n, batch_size = 4000, 16
    lengths = _skewed_lengths(n)
    plain = _epochs(_batches(n, batch_size, random.Random(0)), n, 1)[0]
    bucketed = _epochs(_bucketed_batches(lengths, batch_size, random.Random(0)), n, 1)[0]
    before, after = _padded_tokens(plain, lengths), _padded_tokens(bucketed, lengths)
    assert after < 0.5 * before, (before, after)


def _drawn_batches(n: int, config: TrainConfig, lengths: list[int] | None) -> list[list[int]]:
    """The index batches ``train_loop`` hands to ``batch_loss``, on a one-parameter problem."""
    drawn = []
    weight = nn.Parameter(torch.zeros(()))
    module = nn.Module()
    module.weight = weight

    def batch_loss(idx: list[int]) -> torch.Tensor:
        drawn.append(list(idx))
        return (weight - 1.0) ** 2

    groups = [{"params": [weight], "lr": 0.1}]
    train_loop(nn.Identity(), module, n, batch_loss, None, config, param_groups=groups, fold=dict, lengths=lengths)
    return drawn


def _previous_batches(n: int, batch_size: int, seed: int, steps: int) -> list[list[int]]:
    """The batch sequence of the loop before length bucketing existed (a copy of its generator)."""
    rng, out = random.Random(seed), []
    while len(out) < steps:
        order = list(range(n))
        rng.shuffle(order)
        out += [order[s : s + batch_size] for s in range(0, n, batch_size)]
    return out[:steps]


def test_bucketing_off_gives_the_previous_batch_sequence():
    n, lengths = 37, _skewed_lengths(37)
    options = {"max_steps": 25, "batch_size": 4, "seed": 5, "progress": False}
    previous = _previous_batches(n, 4, 5, 25)
    assert _drawn_batches(n, TrainConfig(**options, length_bucketing=False), lengths) == previous
    assert _drawn_batches(n, TrainConfig(**options), lengths) == previous  # off by default
    assert _drawn_batches(n, TrainConfig(**options, length_bucketing=True), None) == previous  # no lengths: none
    bucketed = _drawn_batches(n, TrainConfig(**options, length_bucketing=True), lengths)
    assert bucketed != previous
    assert sorted(i for batch in bucketed[:10] for i in batch) == list(range(n))  # the first epoch: 10 batches


def test_length_bucketing_option():
    assert TrainConfig().length_bucketing is False  # opt-in: see the TrainConfig docstring
    assert TrainConfig.from_dict(TrainConfig(length_bucketing=False).to_dict()).length_bucketing is False
    with pytest.raises(ValueError, match="length_bucketing"):
        TrainConfig(length_bucketing="no")
    with pytest.raises(ValueError, match="lengths"):
        _drawn_batches(5, TrainConfig(max_steps=1, progress=False), [1, 2, 3])


@pytest.fixture(scope="module")
def single_process_run():
    """``tests/_ddp_script.py``'s training in this (plain, single) process: what every launch must reproduce."""
    from _ddp_script import train_tasks

    return train_tasks()


def _launch_two_processes(launcher: list[str], out: Path, env: dict[str, str] | None = None) -> None:
    """Run ``tests/_ddp_script.py OUT`` under ``launcher`` (a command that starts 2 CPU processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run(
        [*launcher, str(TESTS / "_ddp_script.py"), str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_cli() -> str:
    """The ``accelerate`` command of this environment; the test skips without it."""
    cli = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if cli is None:
        pytest.skip("the `accelerate` command-line tool is not installed in this environment")
    return cli


def test_data_parallel_training_equals_single_process(tmp_path, single_process_run):
    """Two processes under torchrun on CPU (gloo): both learn the same prompts, equal to a single process's, since
    the row- (encoder) or token-weighted (causal LM) mean of the shards' gradients is the full batch's gradient.
    Every epoch of the data has a 1-row batch, where one process has an empty shard. A NaN loss on one
    process makes both raise instead of leaving one waiting."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _launch_two_processes(cmd, tmp_path)
    _check_two_process_run(tmp_path, single_process_run)


def test_data_parallel_training_under_accelerate_launch(tmp_path, single_process_run):
    """The same script, unchanged, under ``accelerate launch`` with 2 CPU processes: ``--multi_gpu`` selects
    accelerate's multi-process launcher (torch's elastic launcher, as torchrun), which needs no GPU; on this
    machine the loop then runs on gloo. (``--cpu --num_processes 2`` alone starts ONE process: accelerate's CPU
    path starts several only through mpirun; see the next test.)"""
    cli = _accelerate_cli()
    opts = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    _launch_two_processes([cli, "launch", "--multi_gpu", "--num_processes", "2", *opts], tmp_path)
    _check_two_process_run(tmp_path, single_process_run)


def test_data_parallel_training_under_accelerate_launch_mpirun(tmp_path, single_process_run):
    """accelerate's own multi-CPU launch, ``accelerate launch --cpu --num_processes 2 --mpirun_hostfile FILE``:
    mpirun starts the processes (MPI variables, no ``RANK``/``WORLD_SIZE``) and the loop joins them over gloo."""
    cli = _accelerate_cli()
    if shutil.which("mpirun") is None and shutil.which("mpiexec") is None:
        pytest.skip(
            "mpirun/mpiexec not installed (accelerate's --cpu multi-process launch needs an MPI, e.g. Open MPI)"
        )
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    (tmp_path / "out").mkdir()
    opts = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    opts += ["--main_process_port", str(_free_port()), "--mpirun_hostfile", str(hostfile)]
    root_ok = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # Open MPI refuses root else
    _launch_two_processes([cli, "launch", "--cpu", "--num_processes", "2", *opts], tmp_path / "out", root_ok)
    _check_two_process_run(tmp_path / "out", single_process_run)


def _check_two_process_run(tmp_path: Path, single_process_run) -> None:
    """Both processes' outputs agree exactly, and with the single-process run up to float rounding."""
    from safetensors.torch import load_file

    prompts = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert prompts[0].keys() == prompts[1].keys()
    assert all(torch.equal(prompts[0][k], prompts[1][k]) for k in prompts[0])
    assert records[0]["echo"] == records[1]["echo"] and records[0]["weather"] == records[1]["weather"]
    assert [r["world_size"] for r in records] == [2, 2]
    assert [r["is_main_process"] for r in records] == [True, False]  # the README's "save on the main process"
    assert all("loss became nan" in r["diverged"] for r in records)

    single, single_records = single_process_run
    assert single.keys() == prompts[0].keys()
    for key, tensor in single.items():
        assert torch.allclose(prompts[0][key], tensor, atol=1e-5, rtol=1e-5), key
    for task in ("echo", "weather"):
        ours, theirs = single_records[task], records[0][task]
        assert ours["steps"] == theirs["steps"]
        assert ours["dev_loss"] == pytest.approx(theirs["dev_loss"], abs=1e-5)
        assert [e.get("loss") for e in ours["history"]] == pytest.approx([e.get("loss") for e in theirs["history"]])
        assert ours["history"][-1]["dev_loss"] != ours["history"][0]["dev_loss"]  # it did learn something

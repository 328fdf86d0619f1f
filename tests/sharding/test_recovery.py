"""A shard lost in any phase of a run is restarted, everything rolls back, and the run ends with
the parameters of an uninterrupted run, bit for bit; too many failures give up cleanly.

Faults are exact events, not timings: a shard is SIGKILLed the moment the trainer enters a
phase (its `moe.train` log record), or kills itself on a chosen request (`--fault`), or before
it is ready (`--fault start@0`). Oracle: the uninterrupted in-process run (conftest.reference).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
from pathlib import Path

import pytest
from shardkit import STEPS, assert_same_checkpoint, shard_config

from moe import cli
from moe.profile_model import computed_profile
from moe.sharding import coordinator, session
from moe.sharding.coordinator import open_expert_groups
from moe.train import TooManyFailures, Trainer

pytestmark = pytest.mark.distributed
REAL_OPEN = coordinator.open_expert_groups


class KillOnPhase(logging.Handler):
    """SIGKILL shard `victim` when the trainer enters `phase` (the n-th time), once."""

    def __init__(self, phase: str, victim: int, pids, nth: int = 1) -> None:
        super().__init__(logging.DEBUG)
        self.phase, self.victim, self.pids, self.left = phase, victim, pids, nth
        self.killed_at: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.left and record.getMessage().startswith(f"phase {self.phase} at step"):
            self.left -= 1
            if self.left == 0:
                os.kill(self.pids()[self.victim], signal.SIGKILL)
                self.killed_at = int(record.getMessage().rsplit(" ", 1)[1])


def _watch(handler: KillOnPhase):
    log = logging.getLogger("moe.train")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.DEBUG)
    return lambda: (log.removeHandler(handler), log.setLevel(old))


def _train(config, data, out: Path, *, phase: str | None = None, victim: int = 1, nth: int = 1, resume=False,
           stop_at=None, **launch):
    said: list[str] = []
    with open_expert_groups(config, out, echo=said.append, **launch) as (groups, on_failure):
        handler = KillOnPhase(phase, victim, lambda: groups[0].links.pids, nth) if phase else None
        undo = _watch(handler) if handler else (lambda: None)
        try:
            trainer = Trainer(config, data, out, expert_groups=groups, on_failure=on_failure, echo=said.append)
            result = trainer.train(resume=resume, stop_at=stop_at)
        finally:
            undo()
    if handler is not None:
        assert handler.killed_at is not None, f"phase {phase!r} never came"
    return result, said


def _failures(said: list[str]) -> list[str]:
    return [s for s in said if " failed" in s and "rolling back" in s]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("phase,nth", [
    ("start", 1),  # the initial weights are being loaded into the shards: no checkpoint exists yet
    ("checkpoint save", 1),  # the rollback point before step 1
    ("evaluation", 2),  # the validation pass at step 10
    ("checkpoint save", 2),  # the checkpoint of step 10
    ("final evaluation", 1),  # the test pass after the last step
])
def test_a_shard_killed_in_any_phase_is_survived_bit_exactly(phase, nth, data, reference, tmp_path):
    result, said = _train(shard_config(2), data, tmp_path / "run", phase=phase, nth=nth)
    assert result.step == STEPS
    failures = _failures(said)
    assert len(failures) == 1 and phase in failures[0] and "shard 1" in failures[0], said
    assert any("restarting shard 1" in s for s in said), said
    assert_same_checkpoint(result.checkpoint, reference)
    assert not (tmp_path / "run" / ".init-experts").exists()
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no half-written checkpoint folder is left behind


@pytest.mark.timeout(180)
def test_a_shard_killed_while_a_resume_loads_the_checkpoint(data, reference, tmp_path):
    out = tmp_path / "run"
    first, _ = _train(shard_config(2), data, out, stop_at=10)
    assert first.step == 10
    result, said = _train(shard_config(2), data, out, phase="load", victim=0, resume=True)
    assert result.step == STEPS and len(_failures(said)) == 1 and "load at step" in _failures(said)[0], said
    assert_same_checkpoint(result.checkpoint, reference)


@pytest.mark.timeout(180)
def test_a_shard_killed_during_the_rollback_itself(data, reference, tmp_path):
    """Shard 1 dies in step 14; while every shard loads checkpoint 10, shard 0 dies too."""
    faults = {0: ["--fault", "load@10"], 1: ["--fault", "forward@13"]}
    result, said = _train(shard_config(2), data, tmp_path / "run", extra_args=lambda i: faults[i])
    failures = _failures(said)
    assert len(failures) == 2 and "step 14 failed" in failures[0] and "rollback at step" in failures[1], said
    assert "shard 0" in failures[1]
    assert_same_checkpoint(result.checkpoint, reference)


@pytest.mark.timeout(180)
def test_a_shard_killed_before_it_was_ready_is_started_again(data, reference, tmp_path):
    result, said = _train(shard_config(2), data, tmp_path / "run",
                          extra_args=lambda i: ["--fault", "start@0"] if i == 1 else [])
    assert any("shard 1 was killed before it was ready (signal 9); starting it again" in s for s in said), said
    assert not _failures(said)
    assert_same_checkpoint(result.checkpoint, reference)


@pytest.mark.timeout(180)
def test_a_shard_killed_after_ready_before_its_links_are_admitted_is_started_again(data, reference, tmp_path):
    """Shard 0 dies the moment shard 1 is ready: after its own READY, before any link to it is
    admitted (the launcher's window between READY and the run's first request)."""
    said: list[str] = []

    def echo(line: str) -> None:
        said.append(line)
        if line.startswith("shard 1 ready") and not any(s.startswith("killed") for s in said):
            (first,) = [s for s in said if s.startswith("shard 0 ready")]
            pid = int(re.search(r"\(pid (\d+),", first).group(1))
            os.kill(pid, signal.SIGKILL)
            said.append(f"killed {pid}")

    out = tmp_path / "run"
    with open_expert_groups(shard_config(2), out, echo=echo) as (groups, on_failure):
        result = Trainer(shard_config(2), data, out, expert_groups=groups, on_failure=on_failure,
                         echo=said.append).train()
    assert any(s.startswith("shard 0 failed before the run began") and "starting it again" in s for s in said), said
    assert not _failures(said)  # nothing had run: no rollback, no failure counted
    assert_same_checkpoint(result.checkpoint, reference)


@pytest.mark.timeout(180)
def test_repeated_failures_give_up_after_max_failures(data, tmp_path):
    """A shard that dies at the same step in every generation: max_failures rollbacks, then the
    run gives up with TooManyFailures (not a traceback from the middle of a rollback)."""
    config = shard_config(2, max_failures=2)
    with pytest.raises(TooManyFailures, match=r"3 expert failures within 600 s \(limit 2\); giving up at step"):
        _train(config, data, tmp_path / "run", extra_args=lambda i: ["--fault", "forward@3:*"] if i == 1 else [])


# ----------------------------------------------------------------------------- the command line


def _moe_train(monkeypatch, capsys, out: Path, args: list[str], extra_args=None, phase=None,
               more: tuple[str, ...] = ()) -> tuple[int, str]:
    """`moe train` in this process (shards are real processes); optional faults and a phase kill."""
    real, opened = REAL_OPEN, []

    @contextlib.contextmanager
    def capturing(config, run_dir, echo=print, **kw):
        with real(config, run_dir, echo, extra_args=extra_args, **kw) as (groups, on_failure):
            opened.append(groups)
            yield groups, on_failure

    monkeypatch.setattr(coordinator, "open_expert_groups", capturing)
    overrides = ["model.d_model=16", "model.n_experts=6", "model.d_hidden=16", "model.n_layers=2",
                 "train.steps=12", "train.batch_size=64", "train.checkpoint_every=5", "train.eval_every=5",
                 "train.warmup=2", "train.baseline=false", "data.n_family=2", "data.n_skills=0", "data.n_digit_sets=0", "data.family_size=200",
                 "shards.deadline_s=3.0", "shards.heartbeat_s=0.5", "shards.max_failures=2"]
    handler = KillOnPhase(phase, 0, lambda: opened[-1][0].links.pids) if phase else None
    undo = _watch(handler) if handler else (lambda: None)
    try:
        code = cli.main(["train", "--out", str(out), "--no-progress", "--json", *args, *overrides, *more])
    finally:
        undo()
    if handler is not None:
        assert handler.killed_at is not None, f"phase {phase!r} never came"
    return code, capsys.readouterr().err


@pytest.mark.timeout(240)
def test_moe_train_survives_a_shard_killed_during_the_final_profile(monkeypatch, capsys, tmp_path):
    code, err = _moe_train(monkeypatch, capsys, tmp_path / "sharded", ["--shards", "2"], phase="profile")
    assert code == 0, err
    assert "profile at step 12 failed" in err and "shard 0" in err
    code, err = _moe_train(monkeypatch, capsys, tmp_path / "inproc", [])
    assert code == 0, err
    got = computed_profile(tmp_path / "sharded" / "profile" / "profile.json")
    want = computed_profile(tmp_path / "inproc" / "profile" / "profile.json")
    assert got == want  # the profile of the repaired run is the uninterrupted in-process one
    assert_same_checkpoint(tmp_path / "sharded" / "checkpoints" / "step-00000012",
                           tmp_path / "inproc" / "checkpoints" / "step-00000012")


@pytest.mark.timeout(240)
def test_moe_train_gives_up_with_one_line_and_exit_status_3(monkeypatch, capsys, tmp_path):
    code, err = _moe_train(monkeypatch, capsys, tmp_path / "run", ["--shards", "2"],
                           extra_args=lambda i: ["--fault", "forward@3:*"] if i == 1 else [])
    assert code == cli.EXIT_GAVE_UP == 3
    last = [line for line in err.splitlines() if line.startswith("moe train:")][-1]
    assert last.startswith("moe train: gave up: 3 expert failures within 600 s (limit 2)")
    assert "Traceback" not in err


@pytest.mark.timeout(120)
def test_a_dead_endpoint_at_start_is_one_line_and_exit_status_2(monkeypatch, capsys, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        secret = session.write_secret(tmp_path / "run.secret", session.new_secret())
        code, err = _moe_train(monkeypatch, capsys, tmp_path / "run", [], more=(
            f"shards.endpoints=[\"tcp://127.0.0.1:{port}\"]", f"shards.secret_file=\"{secret}\"", "shards.deadline_s=1.0"))
    assert code == cli.EXIT_USER_ERROR == 2
    lines = [line for line in err.splitlines() if line.startswith("moe train:")]
    assert lines[-1].startswith("moe train: error: could not start the shards: shard 0 (tcp://127.0.0.1:")
    assert "within the 1 s deadline" in lines[-1] and "Traceback" not in err


@pytest.mark.timeout(240)
def test_a_tampered_expert_part_on_resume_is_one_line_and_exit_status_2(monkeypatch, capsys, tmp_path):
    out = tmp_path / "run"
    code, err = _moe_train(monkeypatch, capsys, out, ["--shards", "2", "--stop-at", "5"])
    assert code == 0, err
    part = out / "checkpoints" / "step-00000005" / "experts-l1-s0.safetensors"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    code, err = _moe_train(monkeypatch, capsys, out, ["--shards", "2", "--resume"])
    assert code == cli.EXIT_USER_ERROR
    last = [line for line in err.splitlines() if line.startswith("moe train:")][-1]
    assert last.startswith("moe train: error: checkpoint ") and "layer 1" in last
    assert "experts-l1-s0.safetensors does not match its sha256" in last and "Traceback" not in err

"""The launcher leaves no orphans: coordinator killed with -9, Ctrl-C, a shard that fails to start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from shardkit import wait_until

from moe.processes import pid_alive
from moe.sharding import session
from moe.sharding.launch import LaunchError, LocalShards

pytestmark = pytest.mark.distributed

SECRET = session.new_secret()

ROOT = str(Path(__file__).resolve().parents[2])

COORDINATOR = """
import json, sys, time
from moe.config import Config, ModelConfig, ShardConfig
from moe.sharding.coordinator import open_expert_groups
config = Config(model=ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2),
                shards=ShardConfig(local=2, heartbeat_s=0.5))
try:
    with open_expert_groups(config, sys.argv[1], echo=lambda s: None) as (groups, _):
        print(json.dumps([groups[0].links.pids, groups[0].links.endpoints]), flush=True)
        time.sleep(120)
except KeyboardInterrupt:
    sys.exit(130)
"""


def _wait_gone(pids: list[int], timeout_s: float = 60.0) -> bool:
    return wait_until(lambda: not any(pid_alive(p) for p in pids), timeout_s)


def _sigint_default() -> None:
    """SIGINT reaches the coordinator as from a terminal: a shell that started the suite in
    the background (`make test &`) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_coordinator(tmp_path: Path) -> tuple[subprocess.Popen, list[int], list[str]]:
    env = {**os.environ, "PYTHONPATH": ROOT}
    # stderr goes to a file: a pipe nobody reads could fill up and block the coordinator's exit
    with open(tmp_path / "coordinator.err", "w") as err:
        p = subprocess.Popen([sys.executable, "-c", COORDINATOR, str(tmp_path / "run")], stdout=subprocess.PIPE,
                             stderr=err, text=True, env=env, preexec_fn=_sigint_default)
    line = p.stdout.readline()
    assert line, (tmp_path / "coordinator.err").read_text()
    pids, endpoints = json.loads(line)
    assert len(pids) == 2 and all(pid_alive(q) for q in pids)
    return p, pids, endpoints


@pytest.mark.timeout(90)
def test_no_orphans_when_the_coordinator_is_killed_with_sigkill(tmp_path):
    p, pids, endpoints = _start_coordinator(tmp_path)
    folder = Path(endpoints[0][len("ipc://"):]).parent
    try:
        p.kill()  # SIGKILL: no cleanup code runs in the coordinator
        p.wait(timeout=10)
        assert _wait_gone(pids), [q for q in pids if pid_alive(q)]
        assert folder.name.startswith("moe-shards-")
        assert not folder.exists(), sorted(os.listdir(folder))  # the exiting shards tidied up
    finally:
        for q in pids:
            if pid_alive(q):
                os.kill(q, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)  # never leak it, even when the test fails


@pytest.mark.timeout(90)
def test_no_orphans_after_ctrl_c(tmp_path):
    p, pids, _ = _start_coordinator(tmp_path)
    try:
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=60) == 130
        # The coordinator waits for its shards before it exits: they are gone now, and they
        # stopped on its SIGTERM (not on a watchdog such as the parent-death signal or a kill).
        assert not any(pid_alive(q) for q in pids)
        logs = [(tmp_path / "run" / "shards" / f"shard-{i}.log").read_text() for i in range(2)]
        assert all("stopped on SIGTERM (parent alive)" in text for text in logs), logs
    finally:
        p.kill()
        for q in pids:
            if pid_alive(q):
                os.kill(q, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_a_shard_that_cannot_start_is_reported_and_nothing_is_left(tmp_path):
    shards = LocalShards([[0], [1]], n_layers=1, d_model=4, d_hidden=4, run="r", secret=SECRET, log_dir=tmp_path,
                         extra_args=lambda i: ["--bind", "tcp://0.0.0.0:59998"] if i == 1 else [])
    with pytest.raises(LaunchError, match="refusing to bind") as info:
        with shards:
            pass
    assert "shard 1" in str(info.value)
    assert shards.pids() and not any(pid_alive(q) for q in shards.pids())


@pytest.mark.timeout(60)
def test_restart_keeps_the_endpoint_and_starts_the_new_generation(tmp_path):
    with LocalShards([[0, 1]], n_layers=1, d_model=4, d_hidden=4, run="r", secret=SECRET, transport="tcp") as shards:
        before, old_pid = shards.endpoints[0], shards.pids()[0]
        os.kill(old_pid, signal.SIGKILL)
        shards.procs[0].wait(timeout=30)  # reaped: the event alive() reports
        assert "killed by signal 9" in shards.alive(0)
        shards.restart(0, gen=3)
        assert shards.endpoints[0] == before and shards.pids()[0] != old_pid
        assert shards.alive(0) is None and shards.gens[0] == 3
    assert not pid_alive(shards.pids()[0])


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.timeout(60)
def test_a_launch_folder_of_a_dead_launcher_is_removed_by_the_next_launch():
    import tempfile

    stale = Path(tempfile.mkdtemp(prefix=f"moe-shards-{_dead_pid()}-"))  # a launcher killed with -9
    (stale / "s0.ipc").write_bytes(b"")
    mine = Path(tempfile.mkdtemp(prefix=f"moe-shards-{os.getpid()}-"))  # a live launcher's: kept
    try:
        shards = LocalShards([[0]], n_layers=1, d_model=4, d_hidden=4, run="r", secret=SECRET)
        shards.stop()
        assert not stale.exists() and mine.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(mine, ignore_errors=True)


@pytest.mark.timeout(60)
def test_a_shard_whose_launcher_died_before_it_started_removes_the_launch_folder():
    """The coordinator was killed while this shard was starting: it exits at once and tidies up."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix=f"moe-shards-{_dead_pid()}-"))
    try:
        cmd = [sys.executable, "-m", "moe.sharding.serve", "--bind", f"ipc://{folder}/s0.ipc", "--experts", "0",
               "--layers", "1", "--d-model", "4", "--d-hidden", "4", "--run", "r", "--secret-file", "-",
               "--parent", str(_dead_pid())]
        done = subprocess.run(cmd, input=SECRET.hex() + "\n", capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert done.returncode == 0 and "READY" not in done.stdout, done.stderr
        assert not folder.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.timeout(60)
def test_a_restart_after_the_launch_folder_was_removed_binds_again(tmp_path):
    """Another process removed the ipc folder while the run used it: the restarted shard's bind
    would fail with 'No such file or directory' unless the launcher makes the folder again."""
    lines: list[str] = []
    with LocalShards([[0]], n_layers=1, d_model=4, d_hidden=4, run="r", secret=SECRET, log_dir=tmp_path,
                     echo=lines.append) as shards:
        os.kill(shards.pids()[0], signal.SIGKILL)
        shards.procs[0].wait(timeout=30)
        shutil.rmtree(shards.tmp)
        shards.restart(0, gen=1)
        assert shards.alive(0) is None and shards.endpoints[0].startswith(f"ipc://{shards.tmp}/")
        assert any("was removed while the run used it" in line for line in lines), lines
    assert not shards.tmp.exists()

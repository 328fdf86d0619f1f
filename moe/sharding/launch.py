"""Start N local shard processes, wait until each is ready, restart one, and always clean up.

Each shard is `python -m moe.sharding.serve ... --parent <our pid> --secret-file -`: the run
secret arrives on its standard input (never on a command line, where `ps` would show it), it
asks the kernel for SIGTERM when we die (prctl PR_SET_PDEATHSIG) and also polls its parent
id, so a coordinator killed with -9 leaves no orphans. A shard killed before it was ready is
started again (START_ATTEMPTS in all). `stop()` (also on exceptions and Ctrl-C, via the
context manager and an atexit hook) sends SIGTERM, then SIGKILL to whatever is still running.
"""

from __future__ import annotations

import atexit
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import moe
from moe.processes import pid_alive
from moe.sharding.serve import format_experts

READY_TIMEOUT_S = 60.0
START_ATTEMPTS = 3  # a shard killed by a signal before READY is started again, this often in all


class LaunchError(RuntimeError):
    """A shard process did not start (its log tail is in the message)."""


class LocalShards:
    """N shard processes on this machine, over ipc (socket files in a private temp folder) or
    tcp loopback (ports chosen by the kernel, kept across restarts)."""

    def __init__(
        self,
        expert_lists: Sequence[Sequence[int]],
        *,
        n_layers: int,
        d_model: int,
        d_hidden: int,
        activation: str = "relu",
        run: str,
        secret: bytes,
        transport: str = "ipc",
        log_dir: str | Path | None = None,
        root: str | Path | None = None,
        heartbeat_s: float = 1.0,
        idle_exit_s: float | None = 120.0,
        curve_dir: str | None = None,
        extra_args: Callable[[int], list[str]] | None = None,
        env: dict[str, str] | None = None,
        cpus: Sequence[Sequence[int] | None] | None = None,
        echo: Callable[[str], None] = lambda s: None,
    ) -> None:
        if transport not in ("ipc", "tcp"):
            raise ValueError(f"transport must be 'ipc' or 'tcp', got {transport!r}")
        if not expert_lists or any(len(e) == 0 for e in expert_lists):
            raise ValueError("every local shard needs at least one expert")
        self.expert_lists = [list(e) for e in expert_lists]
        self.n = len(self.expert_lists)
        self.common = ["--layers", str(n_layers), "--d-model", str(d_model), "--d-hidden", str(d_hidden),
                       "--activation", activation, "--run", run, "--heartbeat", repr(float(heartbeat_s)),
                       "--parent", str(os.getpid()), "--secret-file", "-"]
        self.secret = secret
        if idle_exit_s is not None:
            self.common += ["--idle-exit", repr(float(idle_exit_s))]
        if root is not None:
            self.common += ["--root", str(root)]
        if curve_dir is not None:
            self.common += ["--curve-dir", str(curve_dir)]
        self.transport, self.extra_args, self.echo = transport, extra_args, echo
        self.cpus = list(cpus) if cpus is not None else [None] * self.n
        for gone in remove_stale_launch_folders():
            echo(f"removed {gone}, the launch folder of a coordinator that is gone")
        # short path (ipc names max ~100 bytes); the pid lets a later launcher tidy up after a -9
        self.tmp = Path(tempfile.mkdtemp(prefix=f"moe-shards-{os.getpid()}-"))
        self.log_dir = Path(log_dir) if log_dir is not None else self.tmp
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        # N shards share this machine's cores: split them, and make idle OpenMP threads sleep
        # instead of spinning (spinning workers of N processes starve each other, ~30x slower).
        threads = str(max(1, (os.cpu_count() or 1) // self.n))
        for key, value in (("OMP_WAIT_POLICY", "passive"), ("OMP_NUM_THREADS", threads),
                           ("OPENBLAS_NUM_THREADS", threads)):
            self.env.setdefault(key, value)
        self.env.update(env or {})
        pkg_root = str(Path(moe.__file__).resolve().parent.parent)
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, self.env.get("PYTHONPATH")) if p)
        self.procs: list[subprocess.Popen | None] = [None] * self.n
        self.endpoints: list[str] = [
            f"ipc://{self.tmp}/s{i}.ipc" if transport == "ipc" else "tcp://127.0.0.1:*" for i in range(self.n)
        ]
        self.gens = [0] * self.n
        self.log_start = [0] * self.n
        self._closed = False
        atexit.register(self.stop)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> LocalShards:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> list[str]:
        """Start every shard, then wait for each one's ready line. Returns the endpoints."""
        for i in range(self.n):
            self._spawn(i, gen=0)
        for i in range(self.n):
            self._ready_or_retry(i, gen=0)
        return list(self.endpoints)

    def restart(self, i: int, gen: int) -> None:
        """Kill shard i if it still runs (dead or stalled), start it again on the same endpoint."""
        self._kill(i)
        self._spawn(i, gen=gen)
        self._ready_or_retry(i, gen=gen)

    def _ready_or_retry(self, i: int, gen: int) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._wait_ready(i)
                return
            except LaunchError:
                try:  # it printed no READY line: it exited (reap it), or it hangs (kill it)
                    rc = self.procs[i].wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._kill(i)
                    raise
                if attempt == START_ATTEMPTS or rc >= 0:
                    raise  # it exited by itself (a configuration it refuses): starting again will not help
                self.echo(f"shard {i} was killed before it was ready (signal {-rc}); starting it again")
                self._spawn(i, gen=gen, attempt=attempt)

    def alive(self, i: int) -> str | None:
        """None while shard i runs, else why not (for ShardLinks' liveness check)."""
        p = self.procs[i]
        if p is None:
            return "not started"
        rc = p.poll()
        if rc is None:
            return None
        how = f"killed by signal {-rc}" if rc < 0 else f"exited with status {rc}"
        return f"process {p.pid} {how} (log: {self.log_path(i)})"

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None]

    def log_path(self, i: int) -> Path:
        return self.log_dir / f"shard-{i}.log"

    def stop(self) -> None:
        """SIGTERM every shard, SIGKILL what is left after a grace period; remove the ipc folder."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.stop)
        for p in self.procs:
            if p is not None and p.poll() is None:
                _signal(p, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                _signal(p, signal.SIGTERM)
        end = time.monotonic() + 3.0
        for i in range(self.n):
            p = self.procs[i]
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._kill(i)
            if p.stdout is not None:
                p.stdout.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ one process
    def _spawn(self, i: int, gen: int, attempt: int = 0) -> None:
        old = self.procs[i]
        if old is not None and old.stdout is not None:
            old.stdout.close()
        args = [sys.executable, "-m", "moe.sharding.serve", "--bind", self.endpoints[i],
                "--experts", format_experts(self.expert_lists[i]), "--index", str(i), "--gen", str(gen),
                "--attempt", str(attempt), *self.common]
        if self.cpus[i] is not None:
            args += ["--cpus", ",".join(map(str, self.cpus[i]))]
        if self.extra_args is not None:
            args += self.extra_args(i)
        if not self.tmp.is_dir():  # removed by another process: the ipc bind (and the default logs) need it
            self.echo(f"the launch folder {self.tmp} was removed while the run used it; making it again")
            self.tmp.mkdir(mode=0o700, exist_ok=True)
            self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path(i), "ab")
        self.log_start[i] = log.tell()  # this process's lines start here (for one-line errors)
        try:
            p = self.procs[i] = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                                 env=self.env, close_fds=True)
        finally:
            log.close()
        try:
            p.stdin.write(self.secret.hex().encode() + b"\n")
            p.stdin.close()
        except OSError:  # it died at once; _wait_ready says so
            pass
        p.stdin = None
        self.gens[i] = gen

    def _wait_ready(self, i: int, timeout: float = READY_TIMEOUT_S) -> None:
        p = self.procs[i]
        assert p is not None and p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        end, line = time.monotonic() + timeout, b""
        try:
            while not line.endswith(b"\n"):
                left = end - time.monotonic()
                if left <= 0 or not sel.select(timeout=left):
                    raise LaunchError(f"shard {i} was not ready within {timeout:g} s{self._tail(i)}")
                chunk = os.read(p.stdout.fileno(), 4096)
                if not chunk:  # its stdout closed: it is exiting; reap it to say how it ended
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
                    raise LaunchError(f"shard {i} exited before it was ready ({self.alive(i)}){self._tail(i)}")
                line += chunk
        finally:
            sel.close()
        first = line.split(b"\n", 1)[0].decode(errors="replace").split()
        if len(first) < 2 or first[0] != "READY":
            raise LaunchError(f"shard {i} printed {line[:200]!r} instead of a READY line{self._tail(i)}")
        self.endpoints[i] = first[1]  # the real address (a tcp port chosen by the kernel)
        p.stdout.close()
        p.stdout = None
        self.echo(f"shard {i} ready on {self.endpoints[i]} (pid {p.pid}, gen {self.gens[i]})")

    def _kill(self, i: int) -> None:
        p = self.procs[i]
        if p is None or p.poll() is not None:
            return
        _signal(p, signal.SIGKILL)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - the kernel always reaps a SIGKILL
            pass

    def _tail(self, i: int) -> str:
        """'; its log FILE ends: LAST LINE' (one line, for one-line errors)."""
        try:
            with open(self.log_path(i), "rb") as f:
                f.seek(self.log_start[i])
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        last = f" ends: {lines[-1][-300:]}" if lines else ""
        return f"; its log {self.log_path(i)}{last}"


def remove_stale_launch_folders() -> list[Path]:
    """Remove `moe-shards-PID-*` folders whose launcher is gone (killed with -9 before any of its
    shards could tidy up, e.g. while they were starting). Returns what was removed."""
    gone = []
    for p in Path(tempfile.gettempdir()).glob("moe-shards-*-*"):
        pid = p.name.split("-")[2]
        if pid.isdigit() and p.is_dir() and not pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        p.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass

"""Many processes, many hosts: jax.distributed for `moe train --backend jax`.

Where a process learns its place in the run (the first that applies):
- flags: `--coordinator HOST:PORT --num-processes N --process-id I` (one command per host);
- `--coordinator auto`: JAX's own cluster detection reads the environment of a Cloud TPU pod
  slice (the TPU metadata server), SLURM (SLURM_JOB_ID, SLURM_NTASKS, SLURM_PROCID,
  SLURM_LOCALID, SLURM_STEP_NODELIST), Open MPI (OMPI_*) or JAX_COORDINATOR_ADDRESS;
- `--processes N`: the local launcher below starts N processes on this machine over loopback
  (for testing; `--cpu-devices D` gives each D simulated XLA host devices).

Every process of a run is a *worker* (the training loop, moe.accel.jax_train) watched by a
parent that the user started: the local launcher watches all N, and `moe train --coordinator
...` on a host watches its one worker. Why a parent: when a process of the run dies, JAX's
coordination service ends the others (after `--heartbeat-timeout` without heartbeats, at
once when the coordinator itself is gone) by aborting them with a multi-line C++ fatal
log; the parent turns that into one line naming what happened, and the launcher stops every
other process at once. A worker's native output (XLA, gloo, the coordination service) goes to
<out>/logs/process-<i>.log; Python's output (process 0's progress and tables) stays on the
terminal. Workers die with their parent (PR_SET_PDEATHSIG), so nothing outlives the command.

The coordinator service is JAX's and has no authentication: its port must be reachable only
from the hosts of the run (a private network). Loopback runs bind 127.0.0.1 only.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

POLL_S = 0.1
EXIT_LOST_PEER = 3  # a worker whose collective failed because another process is gone


@dataclass(frozen=True)
class Distributed:
    """How this process joins a run: coordinator "HOST:PORT", "auto" or None (one process)."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    heartbeat_timeout_s: int = 30

    def __post_init__(self) -> None:
        c = self.coordinator
        if c is None:
            if self.num_processes is not None or self.process_id is not None:
                raise ValueError("--num-processes and --process-id need --coordinator HOST:PORT (or auto)")
            return
        if c != "auto":
            host, _, port = c.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"--coordinator must be HOST:PORT or auto, got {c!r}")
            if self.num_processes is None or self.process_id is None:
                raise ValueError("--coordinator HOST:PORT needs --num-processes N and --process-id I "
                                 "(or use --coordinator auto on a TPU pod or under SLURM)")
        n, i = self.num_processes, self.process_id
        if n is not None and n < 1:
            raise ValueError(f"--num-processes must be >= 1, got {n}")
        if i is not None and not (0 <= i < (n if n is not None else i + 1)):
            raise ValueError(f"--process-id must be in [0, {n}), got {i}")
        if self.heartbeat_timeout_s < 1:
            raise ValueError(f"--heartbeat-timeout must be >= 1 s, got {self.heartbeat_timeout_s}")

    @property
    def enabled(self) -> bool:
        return self.coordinator is not None

    @property
    def loopback(self) -> bool:
        return self.coordinator is not None and self.coordinator.rpartition(":")[0] in ("127.0.0.1", "localhost")


def force_cpu_devices(n: int | None) -> None:
    """Simulate n XLA host devices (XLA_FLAGS); must run before jax is first imported."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--cpu-devices must be >= 1, got {n}")
    if "jax" in sys.modules:
        raise RuntimeError("--cpu-devices must be applied before jax is imported")
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={n}"])


def initialize(d: Distributed) -> None:
    """Join the run (jax.distributed.initialize); gloo carries the collectives between CPU
    processes (TPU and GPU processes use their own interconnect)."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {"heartbeat_timeout_seconds": d.heartbeat_timeout_s}
    if d.coordinator != "auto":
        kw.update(coordinator_address=d.coordinator, num_processes=d.num_processes, process_id=d.process_id)
        if d.loopback:
            kw["coordinator_bind_address"] = "127.0.0.1:" + d.coordinator.rpartition(":")[2]
    jax.distributed.initialize(**kw)


def shutdown() -> None:
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()


def isolate_native_output(log_path: Path) -> None:
    """Send what C/C++ code writes to fds 1 and 2 (XLA, gloo, the coordination service) to
    log_path, and keep Python's sys.stdout / sys.stderr on the terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = os.dup(1), os.dup(2)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = os.fdopen(out, "w", buffering=1)
    sys.stderr = os.fdopen(err, "w", buffering=1)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_options(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """argv without the given `--name VALUE` / `--name=VALUE` options."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in names:
            skip = "=" not in a
            continue
        out.append(a)
    return out


# ============================================================================ why a worker stopped
_UNHEALTHY = re.compile(r"tasks are unhealthy \(stopped sending heartbeats\):\s*([\d\s,]+)")


def death_reason(rc: int, log_text: str) -> str:
    """A short phrase for how a worker ended, from its status and its native log."""
    m = _UNHEALTHY.search(log_text)
    if m:
        ids = ", ".join(m.group(1).split())
        return f"process {ids} of the run stopped sending heartbeats (dead or stalled)"
    if "Failed to send RPC to coordination service" in log_text or "leader task was preempted/died" in log_text:
        return "lost the coordinator (process 0 is gone)"
    if "moe: a collective failed:" in log_text:
        return "another process of the run dropped its connection (it died or was killed)"
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        return f"killed by {name}"
    return f"exited with status {rc}"


_ECHOES = ("stopped sending heartbeats", "lost the coordinator", "dropped its connection")


def _is_consequence(w: Worker) -> bool:
    """Whether a failed worker only stopped because another one did (a dropped peer, a lost
    coordinator): when both are seen in one poll, the report names the one that died first."""
    return any(e in death_reason(w.proc.returncode, _read(w.log)[-20000:]) for e in _ECHOES)


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


# ============================================================================ workers and their parent
def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL when the parent dies (Linux
    PR_SET_PDEATHSIG survives exec). SIGKILL, not SIGTERM: JAX's preemption notifier takes
    SIGTERM as a notice and keeps running."""
    parent = os.getppid()
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@dataclass
class Worker:
    index: int | str
    proc: subprocess.Popen
    log: Path
    quiet: bool  # its Python output went to its log, not the terminal


class Workers:
    """Start worker processes, watch them, and always stop them (as moe.sharding.launch does
    for shards): when one fails, the others are stopped at once and one line says why."""

    def __init__(self, label: str = "moe train") -> None:
        self.label, self.workers = label, []

    def start(self, index: int | str, argv: list[str], log: Path, *, quiet: bool, env: dict[str, str] | None = None) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "ab") if quiet else None
        try:
            proc = subprocess.Popen([sys.executable, "-m", "moe.cli", *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=out, env={**os.environ, **(env or {})},
                                    preexec_fn=_die_with_parent)
        finally:
            if out is not None:
                out.close()
        self.workers.append(Worker(index, proc, log, quiet))

    def wait(self, total: int | None) -> int:
        """Wait for every worker; return the run's exit status. On the first failure, stop
        the rest and print one line (unless the failed worker printed its own)."""
        try:
            while True:
                live = [w for w in self.workers if w.proc.poll() is None]
                failed = [w for w in self.workers if w.proc.returncode not in (None, 0)]
                if failed:
                    first = min(failed, key=lambda w: _is_consequence(w))  # the cause, not an echo
                    self.stop()
                    return self._report(first, total)
                if not live:
                    return 0
                time.sleep(POLL_S)
        except KeyboardInterrupt:
            self.stop()
            return 130
        finally:
            self.stop()

    def _report(self, w: Worker, total: int | None) -> int:
        rc = w.proc.returncode
        if rc in (2, 130) and not w.quiet:  # a user error or Ctrl-C, already said on the terminal
            return rc
        reason = death_reason(rc, _read(w.log)[-20000:])
        said = _last_line(w.log) if w.quiet and rc == 2 else ""
        others = len(self.workers) - 1
        stopped = f"; stopped the other {others} process(es)" if others else ""
        pid = w.proc.pid
        what = said if said else reason
        of = f" of {total}" if total else ""
        print(f"{self.label}: error: process {w.index}{of} (pid {pid}) stopped: {what}{stopped} "
              f"(log: {w.log})", file=sys.stderr, flush=True)
        return 2 if rc == 2 else 1

    def stop(self) -> None:
        """SIGKILL every live worker and reap it. Nothing is lost: checkpoints are written
        atomically, and a worker of a broken run cannot finish its step anyway (SIGTERM would
        not do: JAX's preemption notifier takes it as a notice and keeps running)."""
        for w in self.workers:
            if w.proc.poll() is None:
                _signal(w.proc, signal.SIGKILL)
        for w in self.workers:
            w.proc.wait()


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        p.send_signal(sig)
    except (ProcessLookupError, OSError):
        pass


def log_path(out: Path, label: int | str) -> Path:
    return Path(out) / "logs" / f"process-{label}.log"


def launch_local(argv: list[str], n: int, out: Path, heartbeat_timeout_s: int) -> int:
    """`--processes N`: N workers on this machine over loopback, process 0 on the terminal."""
    port = free_loopback_port()
    base = without_options(argv, ("--processes", "--coordinator", "--num-processes", "--process-id"))
    group = Workers()
    for i in range(n):
        log = log_path(out, i)
        group.start(i, [*base, "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                        "--process-id", str(i), "--heartbeat-timeout", str(heartbeat_timeout_s),
                        "--worker", str(log)], log, quiet=i > 0)
    return group.wait(n)


def supervise(argv: list[str], d: Distributed, out: Path) -> int:
    """One command per host: run this host's worker and say in one line why it stopped.
    With --coordinator auto the process id is known only inside JAX: the log is named by host."""
    label = d.process_id if d.process_id is not None else f"{socket.gethostname()}-{os.getpid()}"
    log = log_path(out, label)
    group = Workers()
    group.start(label, [*without_options(argv, ("--worker",)), "--worker", str(log)], log, quiet=False)
    return group.wait(d.num_processes)

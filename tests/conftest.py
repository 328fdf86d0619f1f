"""Shared test setup.

- Every test runs with numpy raising on any floating-point error, on one BLAS thread.
- Nothing leaks: the session FAILS when, after the last test, a process started by the tests
  is still running, a `moe-shards-*` folder created during the session is left in the system
  temp dir, or a file appeared in the checkout (test files belong under tmp_path). Other
  agents may run tests on the same machine at the same time, so only this pytest process's
  descendants count (it is made a child subreaper, so an orphaned grandchild, e.g. a shard
  whose coordinator was killed, is still counted), and only folders created after the
  session started that no live process is still serving a socket from.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from pathlib import Path

# One BLAS thread per test process (and the subprocesses tests start, which inherit this):
# the suite's matrices are small, and on a loaded 2-core machine OpenBLAS's spinning worker
# threads cost ~20x the CPU of the work itself (a 500-step training: 105 s against 5.6 s).
# Set before numpy is imported; a value already in the environment is kept.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# processes and folders that are on their way out get this long to go (tests of the check shorten it)
GRACE_S = float(os.environ.get("MOE_LEAK_GRACE_S", "20"))
_PR_SET_CHILD_SUBREAPER = 36
_session: dict = {}


@pytest.fixture(autouse=True)
def _raise_on_float_errors():
    old = np.seterr(all="raise")
    yield
    np.seterr(**old)


@pytest.fixture(params=["numpy", "compiled"])
def gate_backend(request):
    """Run the test on the numpy path (the oracle) and on the compiled kernels."""
    from moe import bindings

    if request.param == "compiled" and not bindings.HAVE_COMPILED:
        pytest.skip("the compiled kernels are not built")
    with bindings.use_backend(request.param):
        yield request.param


# ----------------------------------------------------------------------------- leak check
def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state letter, command line) for every process we can read."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone while we looked
            continue
        table[int(entry.name)] = (int(rest[1]), rest[0], cmd)
    return table


def live_descendants(root: int | None = None) -> dict[int, str]:
    """Running (not zombie) descendants of `root` (default: this process): pid -> command line."""
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        _, state, cmd = table[pid]
        if state != "Z":
            found[pid] = cmd
        todo += children.get(pid, [])
    return found


def _reap_zombie_children() -> None:
    """Orphans re-parented to us (the subreaper) become our zombies when they exit."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _shard_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("moe-shards-*"))


def _sockets_in_use() -> set[str]:
    """Paths of the unix sockets some live process holds (ipc endpoints being served)."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return set()
    return {parts[7] for parts in (line.split() for line in lines) if len(parts) >= 8}


def left_folders() -> list[Path]:
    """moe-shards-* folders created during this session that nobody is serving from."""
    in_use = _sockets_in_use()
    out = []
    for folder in _shard_folders() - _session["folders"]:
        try:
            created = folder.stat().st_mtime >= _session["start"] - 1
            served = any(str(p) in in_use for p in folder.iterdir())
        except OSError:  # removed while we looked
            continue
        if created and not served:
            out.append(folder)
    return sorted(out)


def _checkout_files() -> set[Path]:
    """Files in the checkout outside hidden folders, caches and build outputs."""
    skip = {"__pycache__", "build", "dist", "runs"}
    out = set()
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip and not d.endswith(".egg-info")]
        out.update(Path(dirpath) / f for f in filenames)
    return out | ({ROOT / "runs"} if (ROOT / "runs").exists() else set())


def pytest_sessionstart(session: pytest.Session) -> None:
    try:  # Linux: orphaned descendants are re-parented to us instead of init
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    _session.update(start=time.time(), folders=_shard_folders(), files=_checkout_files())


def leaks() -> list[str]:
    """What the tests left behind, after giving what is already exiting time to finish."""
    deadline = time.monotonic() + GRACE_S
    while True:
        _reap_zombie_children()
        procs, folders = live_descendants(), left_folders()
        if not (procs or folders) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    new_files = sorted(_checkout_files() - _session["files"])
    return ([f"process {pid} still running: {cmd}" for pid, cmd in sorted(procs.items())]
            + [f"folder left in the temp dir: {f} (holds {sorted(p.name for p in f.iterdir())})" for f in folders]
            + [f"file written into the checkout (use tmp_path): {f.relative_to(ROOT)}" for f in new_files])


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if "start" not in _session or exitstatus == pytest.ExitCode.INTERRUPTED:
        return
    found = leaks()
    if not found:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = ["", "LEAK CHECK FAILED: the tests left these behind:", *(f"  {s}" for s in found)]
    if reporter is not None:
        reporter.write_line("\n".join(lines), red=True, bold=True)
    else:
        print("\n".join(lines))
    for pid in live_descendants():  # stop them, so one leak does not become many
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    _reap_zombie_children()
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

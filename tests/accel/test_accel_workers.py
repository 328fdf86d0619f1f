"""The launcher's report when several workers are found dead in one poll: it names the one
that died (killed, crashed), not the one that only stopped because its peer went away. The
race this pins down: process 1 is SIGKILLed, process 0's collective fails a moment later,
and the launcher's next poll sees both; CI hit it once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from moe.accel.distributed import Worker, Workers, death_reason


def _dead(index: int, code: str, log: Path) -> Worker:
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL)
    proc.wait()
    return Worker(index, proc, log, quiet=True)


@pytest.mark.parametrize("killed", [0, 1])
def test_the_report_names_the_cause_not_the_echo(tmp_path, capsys, killed):
    echo_log, kill_log = tmp_path / "echo.log", tmp_path / "kill.log"
    echo_log.write_text("moe: a collective failed: connection reset by peer\n")
    kill_log.write_text("step 3\n")
    echo = _dead(1 - killed, "raise SystemExit(1)", echo_log)
    dead = _dead(killed, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)", kill_log)
    ws = Workers()
    ws.workers = sorted([echo, dead], key=lambda w: w.index)
    assert ws.wait(2) == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (f"moe train: error: process {killed} of 2 (pid {dead.proc.pid}) stopped: killed by SIGKILL; "
                    f"stopped the other 1 process(es) (log: {kill_log})")


def test_an_echo_alone_is_still_reported(tmp_path, capsys):
    log = tmp_path / "p.log"
    log.write_text("moe: a collective failed: x\n")
    ws = Workers()
    ws.workers = [_dead(0, "raise SystemExit(1)", log)]
    assert ws.wait(1) == 1
    assert "dropped its connection" in capsys.readouterr().err
    assert death_reason(-signal.SIGKILL, "") == "killed by SIGKILL"

"""The session-level leak check of tests/conftest.py fails a run that leaves things behind.

Each case runs a small pytest session in its own folder (a copy of the real conftest.py
beside a generated test file) and reads its exit status and report.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(120)]

HERE = Path(__file__).resolve().parent

LEAKY = '''
import subprocess, sys, tempfile
from pathlib import Path

def test_leaves_a_process():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

def test_leaves_an_orphan():
    # the child starts a grandchild and exits at once: the grandchild is re-parented
    subprocess.run([sys.executable, "-c",
                    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])"],
                   check=True)

def test_leaves_a_shard_folder():
    Path(tempfile.mkdtemp(prefix="moe-shards-"), "s0.ipc").write_text("")

def test_writes_into_the_checkout():
    (Path(__file__).parents[1] / "stray.txt").write_text("x")
'''

CLEAN = '''
import subprocess, sys, shutil, tempfile

def test_cleans_up(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    p.kill()
    p.wait()
    folder = tempfile.mkdtemp(prefix="moe-shards-")
    shutil.rmtree(folder)
    (tmp_path / "fine.txt").write_text("x")
'''


def _session(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    root = tmp_path / "checkout"
    (root / "tests").mkdir(parents=True)
    shutil.copy(HERE / "conftest.py", root / "tests" / "conftest.py")
    (root / "tests" / "test_case.py").write_text(body)
    env = {**os.environ, "MOE_LEAK_GRACE_S": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), "-o", "addopts=",
         str(root / "tests")], capture_output=True, text=True, cwd=root, env=env, timeout=100)


def test_a_session_that_leaks_fails_and_names_each_leak(tmp_path):
    r = _session(tmp_path, LEAKY)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "4 passed" in out and "LEAK CHECK FAILED" in out
    assert out.count("still running: ") == 2, out  # the child and the re-parented grandchild
    assert "folder left in the temp dir: " in out and "s0.ipc" in out
    assert "file written into the checkout (use tmp_path): stray.txt" in out
    for line in out.splitlines():  # tidy up the folder this case planted on purpose
        if "folder left in the temp dir: " in line:
            shutil.rmtree(line.split(": ", 1)[1].split(" (holds")[0], ignore_errors=True)


def test_a_clean_session_passes(tmp_path):
    r = _session(tmp_path, CLEAN)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "LEAK CHECK" not in r.stdout

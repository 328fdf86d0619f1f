"""moe's thread defaults for shared machines (moe/threads.py): set on import, before the
libraries that read them start, and never over the user's own environment."""

import json
import os
import subprocess
import sys

import pytest

from moe import threads

VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT")
PROBE = (
    "import json, os, sys\n"  # noqa: UP031
    "import moe\n"
    "from moe import threads\n"
    "print(json.dumps({'env': {k: os.environ.get(k) for k in %r}, 'describe': threads.describe()}))\n" % (VARS,)
)


def probe(**user_env: str) -> dict:
    """`import moe` in a fresh interpreter whose environment sets only `user_env` of VARS."""
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    env.update(user_env)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_sets_the_defaults_before_blas_starts():
    got = probe()
    assert got["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": None, "OPENBLAS_THREAD_TIMEOUT": "4"}
    # "not in force" would mean numpy (and its OpenBLAS) loaded before moe set the variable
    assert got["describe"] == "OMP_WAIT_POLICY=PASSIVE (moe), OPENBLAS_THREAD_TIMEOUT=4 (moe)"


@pytest.mark.parametrize(
    "user, want",
    [
        ({"OMP_WAIT_POLICY": "active"}, {"OMP_WAIT_POLICY": "active", "OPENBLAS_THREAD_TIMEOUT": "4"}),
        ({"GOMP_SPINCOUNT": "1000"}, {"GOMP_SPINCOUNT": "1000", "OPENBLAS_THREAD_TIMEOUT": "4"}),
        ({"OPENBLAS_THREAD_TIMEOUT": "28"}, {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "28"}),
    ],
    ids=["wait-policy", "spin-count", "blas-timeout"],
)
def test_the_users_environment_wins(user, want):
    got = probe(**user)
    assert {k: v for k, v in got["env"].items() if v is not None} == want
    for key, value in user.items():
        assert f"{key}={value} (user)" in got["describe"]


def test_describe_flags_a_setting_made_after_its_library_started(monkeypatch):
    # in this process numpy and the kernels (libgomp) are loaded: a default set now is too late
    for k in VARS:
        monkeypatch.setenv(k, "")  # records the value to restore, then clears it
        monkeypatch.delenv(k)
    monkeypatch.setattr(threads, "_applied", {})
    monkeypatch.setattr(threads, "_late", set())
    threads.apply()
    assert "OPENBLAS_THREAD_TIMEOUT=4 (moe, set after its library started: not in force)" in threads.describe()
    assert "OMP_WAIT_POLICY=PASSIVE (moe, set after its library started: not in force)" in threads.describe()

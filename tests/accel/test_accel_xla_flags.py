"""moe.accel.xla_flags: the XLA:CPU flags moe sets before JAX starts its backend.

The user's XLA_FLAGS win, other flags are kept, an unmeasured jaxlib is left alone (XLA
aborts on a flag it does not know), and a fresh process that imports moe.accel and then
runs JAX has the flag in force and is not aborted by it."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe.accel import xla_flags

pytestmark = pytest.mark.accel

HAVE_JAX = importlib.util.find_spec("jaxlib") is not None
FLAG = "--xla_cpu_use_fusion_emitters"
ROOT = Path(__file__).resolve().parents[2]

needs_jax = pytest.mark.skipif(not HAVE_JAX, reason="jaxlib is not installed: no XLA flags to set")


@needs_jax
def test_the_default_is_added_to_an_empty_environment(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    xla_flags.apply(known=(xla_flags.jaxlib_release(),))
    assert os.environ["XLA_FLAGS"] == f"{FLAG}=false"
    assert xla_flags.describe() == f"{FLAG}=false (moe)"


@needs_jax
def test_other_flags_are_kept_and_applying_twice_adds_nothing(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    known = (xla_flags.jaxlib_release(),)
    xla_flags.apply(known=known)
    xla_flags.apply(known=known)
    assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4", f"{FLAG}=false"]


@needs_jax
def test_the_users_choice_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"{FLAG}=true")
    xla_flags.apply(known=(xla_flags.jaxlib_release(),))
    assert os.environ["XLA_FLAGS"] == f"{FLAG}=true"
    assert xla_flags.describe() == f"{FLAG}=true (user)"


def test_a_jaxlib_it_was_not_measured_on_is_left_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    xla_flags.apply(known=())
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
    assert xla_flags.describe() == f"{FLAG} (XLA's default)"


@needs_jax
def test_a_process_through_moe_runs_jax_with_the_flag():
    code = ("import os, moe.accel, jax, jax.numpy as jnp; "
            "y = jax.jit(lambda x: jnp.tanh(x) * 2 + 1)(jnp.arange(4.0)); "
            "print(os.environ['XLA_FLAGS'], float(y.sum()))")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-500:]
    flags, total = proc.stdout.split()
    assert flags == f"{FLAG}=false"
    assert float(total) == pytest.approx(sum(2 * math.tanh(i) + 1 for i in range(4)), rel=1e-6)

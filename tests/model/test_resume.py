"""Bit-exact resume: 60 steps straight equals 30 steps, a new process, and 30 more."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe.checkpoint import list_checkpoints, load_checkpoint

pytestmark = [pytest.mark.unit, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["n_family=2", "n_skills=0", "n_digit_sets=0", "family_size=120", "model.d_model=16", "model.n_experts=8", "model.d_hidden=16",
         "batch_size=32", "steps=60", "checkpoint_every=20", "eval_every=20", "baseline=false",
         "noise_final=0.3"]  # the noise schedule follows the step across the resume


def moe(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "moe.cli", *args], capture_output=True, text=True,
                          env=env, timeout=200)


def everything(run: Path) -> dict[str, np.ndarray]:
    manifest, files, where = load_checkpoint(list_checkpoints(run / "checkpoints")[-1], load_experts=True)
    flat = {f"{f}/{k}": v for f, tensors in files.items() for k, v in tensors.items()}
    return flat, manifest


def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    r = moe("train", "--out", str(straight), "--no-progress", *SMALL)
    assert r.returncode == 0, r.stderr
    r = moe("train", "--out", str(resumed), "--no-progress", "--stop-at", "30", *SMALL)
    assert r.returncode == 0, r.stderr
    assert list_checkpoints(resumed / "checkpoints")[-1].name == "step-00000030"
    r = moe("train", "--out", str(resumed), "--no-progress", "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout

    a, ma = everything(straight)
    b, mb = everything(resumed)
    assert ma["step"] == mb["step"] == 60
    assert sorted(a) == sorted(b)
    assert any(k.startswith("experts-l0/") for k in a), "expert weights must be compared too"
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert ma["rng"] == mb["rng"] and ma["data_cursor"] == mb["data_cursor"]
    # the resumed half must have moved the weights, or the comparison proves little
    _, mid, _ = load_checkpoint(resumed / "checkpoints" / "step-00000030", load_experts=True)
    assert not np.array_equal(mid["params"]["head.o3.w"], a["params/head.o3.w"])
    assert not np.array_equal(mid["experts-l0"]["w1"], a["experts-l0/w1"])


def test_resume_refuses_a_different_model(tmp_path):
    run = tmp_path / "run"
    assert moe("train", "--out", str(run), "--no-progress", "--stop-at", "20", *SMALL).returncode == 0
    r = moe("train", "--out", str(run), "--no-progress", "--resume", *SMALL, "model.n_experts=4")
    assert r.returncode == 2 and "must match the checkpoint" in r.stderr and "Traceback" not in r.stderr
    r = moe("train", "--out", str(run), "--no-progress", *SMALL)
    assert r.returncode == 2 and "already holds checkpoints" in r.stderr

"""Many processes over loopback (jax.distributed + gloo), through the `moe` command itself.

Runs of one small config (3 user tasks from CSV files, E=16, softmax top-k, dropless, 20
steps, 128 rows per step laid out by a plan as EP 4 x DP 2):
- N: the numpy backend;
- A: `--backend jax --plan plan8.json --cpu-devices 8`, one process with 8 devices;
- B: the same plan with `--processes 2 --cpu-devices 4`: two processes of 4 devices;
- C: B's run folder cut back to its step-10 checkpoint, resumed with one process of 4
  devices (plan4.json: EP 4 x DP 1, the same 128 rows per step).
B == A (loss at step 20 and every parameter) within 1e-5; C == A within 1e-5 (resume across
process and device counts); A == N within JAX_VS_NUMPY (see below); numpy `moe eval` loads
B's checkpoint. Then kill tests: a process killed mid-run makes the others exit with one
line, from the local launcher and from per-host commands, whichever process dies.

Norms. Between JAX runs: max|a - b| / max(max|b|, 1e-30) per parameter array, the worst
over all arrays. JAX against numpy (JAX_VS_NUMPY): max|a - b| over every parameter, relative
to the largest |parameter| of the model, and the loss relative to numpy's. The two take the
same steps but round differently (summation order in XLA's matmuls and psums, float32 Adam
bias corrections): measured 6e-7 after 10 steps and 9e-7 after 18, then at step 19 a top-k
near-tie routes one of the 128 rows to another expert and the gap jumps to 4e-5 after 20
(loss 5e-6). The bars: 1e-5 after 10 steps, 1e-4 after 20 (loss 1e-4).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.accel, pytest.mark.distributed, pytest.mark.slow]

HAVE_JAX = importlib.util.find_spec("jax") is not None
ROOT = Path(__file__).resolve().parents[2]
EQUAL_TOL = 1e-5
JAX_VS_NUMPY = {10: 1e-5, 20: 1e-4}  # step -> bar (see the module docstring)
CONFIG = ["data.builtin=false", "model.n_experts=16", "model.d_model=16", "model.d_hidden=16", "model.k=2",
          "model.gate=softmax_topk", "model.capacity_factor=none", "model.d_task_emb=4", "lr=0.01", "warmup=5",
          "baseline=false", "keep_last=5", "train.balanced_share=0"]  # the JAX backend trains with top-k


def _env() -> dict[str, str]:
    from accel.jaxcheck import FAST_XLA

    return {**os.environ, "XLA_FLAGS": FAST_XLA, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


def moe(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe.cli", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"rc {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p


def write_tasks(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, kind in (("cls", "multiclass"), ("reg", "regression"), ("bin", "binary")):
        x = rng.standard_normal((240, 5))
        y = {"multiclass": np.argmax(x[:, :3], axis=1), "regression": x[:, 0] - 0.5 * x[:, 1],
             "binary": (x[:, 2] > 0).astype(int)}[kind]
        rows = [",".join(f"f{j}" for j in range(5)) + ",y"]
        rows += [",".join(f"{v:.6f}" for v in xi) + f",{yi}" for xi, yi in zip(x, y, strict=True)]
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")
    toml = root / "tasks.toml"
    toml.write_text("".join(f'[[task]]\nname = "{n}"\npath = "{n}.csv"\ntarget = "y"\nkind = "{k}"\n\n'
                            for n, k in (("cls", "multiclass"), ("reg", "regression"), ("bin", "binary"))))
    return toml


def params_of(run: Path) -> dict[str, np.ndarray]:
    from moe.api import load

    return dict(load(run).params)


def worst(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float(np.max(np.abs(a[n] - b[n])) / max(float(np.max(np.abs(b[n]))), 1e-30)) for n in a)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    if not HAVE_JAX:
        pytest.skip("jax is not installed (pip install 'moe[accel]') - distributed JAX runs not tested")
    from moe.accel.layout import Layout, write_plan

    root = tmp_path_factory.mktemp("dist")
    cfg = [*CONFIG, f"data.task_file={write_tasks(root)}", "steps=20", "eval_every=20", "checkpoint_every=10",
           "batch_size=128"]
    plan8 = write_plan(root / "plan8.json", Layout(ep=4, dp=2, tokens_per_device=16, target="cpu:8"))
    plan4 = write_plan(root / "plan4.json", Layout(ep=4, dp=1, tokens_per_device=32, target="cpu:4"))
    out = {"root": root}
    out["N"] = ok(moe("train", "--out", str(root / "N"), "--no-progress", *cfg))
    out["A"] = ok(moe("train", "--backend", "jax", "--plan", str(plan8), "--cpu-devices", "8", "--out",
                      str(root / "A"), "--no-progress", *cfg))
    out["B"] = ok(moe("train", "--backend", "jax", "--plan", str(plan8), "--processes", "2", "--cpu-devices", "4",
                      "--out", str(root / "B"), "--no-progress", "--json", *cfg))
    shutil.copytree(root / "B", root / "C")
    shutil.rmtree(root / "C" / "checkpoints" / "step-00000020")
    (root / "C" / "metrics.jsonl").unlink()
    out["C"] = ok(moe("train", "--backend", "jax", "--plan", str(plan4), "--cpu-devices", "4", "--resume",
                      "--out", str(root / "C"), "--no-progress", *cfg))
    return out


def test_two_processes_equal_one(runs):
    root = runs["root"]
    a, b = metrics(root / "A"), metrics(root / "B")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [20]
    assert abs(b[0]["loss"] - a[0]["loss"]) <= EQUAL_TOL * abs(a[0]["loss"])
    assert worst(params_of(root / "B"), params_of(root / "A")) <= EQUAL_TOL
    assert "mesh DP 2 x EP 4 over 8 x cpu (2 process(es))" in runs["B"].stderr  # --json: human output on stderr
    assert "mesh DP 2 x EP 4 over 8 x cpu (1 process(es))" in runs["A"].stdout


def test_each_process_reads_only_its_share(runs):
    # 20 steps x 128 rows; each process's 4 devices hold half of every batch
    assert "2 processes read 1280, 1280 of the 2560 training examples in the 20 steps" in runs["B"].stderr


def test_jax_matches_the_numpy_model(runs):
    from moe.api import load

    root = runs["root"]
    for step, bar in JAX_VS_NUMPY.items():
        a = load(root / "A" / "checkpoints" / f"step-{step:08d}").params
        n = load(root / "N" / "checkpoints" / f"step-{step:08d}").params
        err = max(float(np.max(np.abs(a[k] - n[k]))) for k in n) / max(float(np.max(np.abs(p))) for p in n.values())
        assert 0 < err <= bar, (step, err)  # 0 would mean the comparison compared nothing
    n, a = metrics(root / "N")[0], metrics(root / "A")[0]
    assert abs(a["loss"] - n["loss"]) <= JAX_VS_NUMPY[20] * abs(n["loss"])


def test_resume_across_process_and_device_counts(runs):
    root = runs["root"]
    assert "resumed from" in runs["C"].stdout and "at step 10" in runs["C"].stdout
    assert "mesh DP 1 x EP 4 over 4 x cpu (1 process(es))" in runs["C"].stdout
    assert worst(params_of(root / "C"), params_of(root / "A")) <= EQUAL_TOL


def test_one_checkpoint_that_numpy_eval_loads(runs):
    root = runs["root"]
    names = sorted(p.name for p in (root / "B" / "checkpoints" / "step-00000020").iterdir())
    assert names == ["experts-l0.adam.safetensors", "experts-l0.safetensors", "manifest.json", "optim.safetensors",
                     "params.safetensors"]
    trained = json.loads(runs["B"].stdout)["tasks"]
    ev = ok(moe("eval", str(root / "B"), "--json"))
    scores = json.loads(ev.stdout)["tasks"]
    assert {n: s["score"] for n, s in scores.items()} == {n: s["score"] for n, s in trained.items()}
    assert trained["cls"]["score"] > 0.5  # 3 classes: it learned something


# ============================================================================ a process dies
def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_for_steps(run: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    """Until process 0 has logged an evaluation: the run is training."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().strip():
            return
        time.sleep(0.5)
    raise AssertionError("the run did not start training in time")


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moe.cli", *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _endless(tmp_path: Path) -> list[str]:
    return [*CONFIG, f"data.task_file={write_tasks(tmp_path)}", "steps=100000", "eval_every=2",
            "checkpoint_every=100000", "batch_size=64", "--no-progress", "--cpu-devices", "2"]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()  # our workers die with their parent (PR_SET_PDEATHSIG)
        p.communicate(timeout=30)


@pytest.fixture
def jax_needed():
    if not HAVE_JAX:
        pytest.skip("jax is not installed (pip install 'moe[accel]')")


def test_launcher_stops_everything_when_a_process_is_killed(tmp_path, jax_needed):
    run = tmp_path / "run"
    launcher = _start(["train", "--backend", "jax", "--processes", "2", "--out", str(run), *_endless(tmp_path)])
    try:
        _wait_for_steps(run, [launcher])
        workers = {(1 if "--process-id 1 " in _cmdline(c) else 0): c for c in _children(launcher.pid)}
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        _, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 1
        assert err.strip().splitlines()[-1] == (
            f"moe train: error: process 1 of 2 (pid {workers[1]}) stopped: killed by SIGKILL; stopped the other "
            f"1 process(es) (log: {run}/logs/process-1.log)")
        assert not Path(f"/proc/{workers[0]}").exists()  # process 0 is gone too
    finally:
        _stop([launcher])


@pytest.mark.parametrize("victim", [1, 0], ids=["worker", "coordinator"])
def test_per_host_commands_exit_with_one_line_when_a_peer_dies(tmp_path, jax_needed, victim):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    common = ["train", "--backend", "jax", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
              "--heartbeat-timeout", "10", "--out", str(run), *_endless(tmp_path)]
    hosts = [_start([*common, "--process-id", str(i)]) for i in range(2)]
    try:
        _wait_for_steps(run, hosts)
        hosts[victim].kill()  # the whole command: its worker dies with it
        hosts[victim].communicate(timeout=30)
        survivor = hosts[1 - victim]
        _, err = survivor.communicate(timeout=90)  # within the heartbeat timeout, not a hang
        assert survivor.returncode == 1
        lines = err.strip().splitlines()
        assert len(lines) == 1, err  # one line, not JAX's fatal log
        # Whoever notices first: gloo inside a collective (a connection drops at once), or
        # the coordination service (missed heartbeats; a gone coordinator).
        why = (["another process of the run dropped its connection (it died or was killed)",
                "process 1 of the run stopped sending heartbeats (dead or stalled)"] if victim == 1
               else ["another process of the run dropped its connection (it died or was killed)",
                     "lost the coordinator (process 0 is gone)"])
        head, _, tail = lines[0].partition(") stopped: ")
        assert head.startswith(f"moe train: error: process {1 - victim} of 2 (pid ")
        assert tail in [f"{w} (log: {run}/logs/process-{1 - victim}.log)" for w in why], lines[0]
    finally:
        _stop(hosts)

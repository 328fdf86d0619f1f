"""Every promised command and flag, run as a user runs it: `python -m moe.cli ...` in a subprocess.

The oracle for the sharded runs is the in-process run of the same config: the README
promises the same parameters bit for bit, wherever the experts live. Runs are tiny (two
user tasks from CSV files, 30 steps), so each command costs a few seconds.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe import checkpoint as ckpt
from moe.api import load
from moe.cli import build_parser, main
from moe.profiling.placement import save_placement

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
E = 4
# the per-example noisy router: two tasks' rows reach every expert, so every shard has traffic
TINY = ["model.gate=noisy_topk", "model.route_by=example+task", "data.builtin=false", "model.d_model=8", f"model.n_experts={E}", "model.d_hidden=8", "k=2",
        "batch_size=32", "steps=30", "checkpoint_every=30", "eval_every=30", "baseline=false",
        "warmup=3", "shards.deadline_s=20", "shards.heartbeat_s=0.5"]


def moe(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "moe.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    """A TOML task file with two small CSV tasks (multiclass and regression)."""
    folder = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 3))
    cls = (x @ [1.0, -1.0, 0.5] > 0).astype(int) + (x[:, 0] > 1).astype(int)
    reg = x @ [0.3, 0.2, -0.7] + 0.1 * rng.normal(size=150)
    for name, y in (("cls", cls), ("reg", reg)):
        rows = ["a,b,c,y"] + [f"{a:.6f},{b:.6f},{c:.6f},{t}" for (a, b, c), t in zip(x, y, strict=True)]
        (folder / f"{name}.csv").write_text("\n".join(rows) + "\n")
    both = folder / "both.toml"
    both.write_text('[[task]]\nname = "cls"\npath = "cls.csv"\ntarget = "y"\nkind = "multiclass"\n\n'
                    '[[task]]\nname = "reg"\npath = "reg.csv"\ntarget = "y"\nkind = "regression"\n')
    (folder / "reg_only.toml").write_text('[[task]]\nname = "reg"\npath = "reg.csv"\ntarget = "y"\nkind = "regression"\n')
    (folder / "unknown.toml").write_text('[[task]]\nname = "other"\npath = "reg.csv"\ntarget = "y"\n')
    return both


@pytest.fixture(scope="module")
def in_process(tasks, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("inproc") / "run"
    r = ok(moe("train", "--out", str(out), "--no-progress", "--json", f"data.task_file={tasks}", *TINY))
    return out, json.loads(r.stdout)


def assert_same_model(a: Path, b: Path) -> None:
    """Every parameter (experts included) and the run state of two final checkpoints are equal."""
    ma, mb = load(a), load(b)
    assert sorted(ma.params) == sorted(mb.params)
    assert any(".moe.experts." in n for n in ma.params)
    for n, p in ma.params.items():
        assert p.dtype == mb.params[n].dtype and np.array_equal(p, mb.params[n]), n
    for key in ("step", "rng", "data_cursor"):
        assert ma.manifest[key] == mb.manifest[key], key
    _, da, _ = ckpt.load_checkpoint(a)
    _, db, _ = ckpt.load_checkpoint(b)
    for n, v in da["optim"].items():  # the dense Adam moments too
        assert np.array_equal(v, db["optim"][n]), n


def _experts_of_parts(checkpoint: Path, layer: int = 0) -> dict[int, list[int]]:
    manifest = ckpt.read_manifest(checkpoint)
    out = {}
    for fname, entry in manifest["files"].items():
        if entry.get("kind") == "experts" and entry["layer"] == layer:
            shard = int(fname.removesuffix(".safetensors").rsplit("-s", 1)[1])
            _, files, _ = ckpt.load_checkpoint(checkpoint, load_experts=True)
            out[shard] = files[fname.removesuffix(".safetensors")]["ids"].tolist()
    return out


# ----------------------------------------------------------------------------- help
def _commands(parser, prefix=()):
    """(argv prefix, parser) for the top level and every (nested) subcommand."""
    yield prefix, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from _commands(sub, (*prefix, name))


def test_every_command_has_help_that_lists_its_options(capsys):
    seen = []
    for argv, parser in _commands(build_parser()):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0, argv
        text = capsys.readouterr().out
        assert text.startswith(f"usage: moe {' '.join(argv)}".rstrip()), text[:80]
        for action in parser._actions:
            if action.help != "==SUPPRESS==":
                for flag in action.option_strings:
                    assert flag in text, (argv, flag)
        seen.append(" ".join(argv))
    assert {"train", "eval", "add-task", "profile", "plan", "shard serve", "keys generate"} <= set(seen), seen


# ----------------------------------------------------------------------------- shards
def test_train_with_local_shards_and_a_placement_equals_in_process(in_process, tasks, tmp_path):
    reference, _ = in_process
    placement = tmp_path / "placement.json"
    save_placement(placement, np.array([1, 0, 1, 0]))  # not the contiguous default
    out = tmp_path / "run"
    r = ok(moe("train", "--out", str(out), "--no-progress", "--json", "--shards", "2", "--placement", str(placement),
               f"data.task_file={tasks}", *TINY))
    assert "on 2 shard(s)" in r.stderr
    final = Path(json.loads(r.stdout)["checkpoint"])
    assert _experts_of_parts(final) == {0: [1, 3], 1: [0, 2]}  # the placement was used
    assert_same_model(ckpt.resolve(reference), final)


def test_keys_generate_then_shard_serve_then_train_on_endpoints(in_process, tasks, tmp_path):
    """`moe keys generate` and `moe keys secret`, `moe shard serve` with CURVE and the run secret,
    and `moe train` with shards.endpoints."""
    reference, _ = in_process
    keys = tmp_path / "keys"
    r = ok(moe("keys", "generate", str(keys)))
    assert "server:" in r.stdout and "client:" in r.stdout
    for name in ("server", "client"):
        assert stat.S_IMODE((keys / f"{name}.key_secret").stat().st_mode) == 0o600
    assert (keys / "authorized" / "client.key").is_file()
    r = moe("keys", "generate", str(keys))
    assert r.returncode == 2 and "refusing to overwrite a key" in r.stderr and "Traceback" not in r.stderr
    secret = tmp_path / "run.secret"
    ok(moe("keys", "secret", str(secret)))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [sys.executable, "-m", "moe.cli", "shard", "serve", "--bind", "tcp://127.0.0.1:*", "--experts", f"0-{E - 1}",
         "--layers", "1", "--d-model", "8", "--d-hidden", "8", "--curve-dir", str(keys), "--root", str(tmp_path),
         "--secret-file", str(secret), "--idle-exit", "60", "--heartbeat", "0.5", "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, env=env)
    try:
        line = server.stdout.readline()  # blocks until the shard is up (or exits)
        assert line.startswith("READY tcp://127.0.0.1:"), (line, server.poll())
        endpoint = line.split()[1]
        r = ok(moe("train", "--out", str(run), "--no-progress", "--json", f"data.task_file={tasks}", *TINY,
                   f'shards.endpoints=["{endpoint}"]', f"shards.curve_dir={keys}", f"shards.secret_file={secret}"))
        assert "on 1 shard(s)" in r.stderr
        assert_same_model(ckpt.resolve(reference), Path(json.loads(r.stdout)["checkpoint"]))
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=60)
        server.stdout.close()
        server.stderr.close()
    assert rc == 0


def test_shard_serve_refuses_an_open_bind_without_keys(tmp_path):
    secret = tmp_path / "run.secret"
    ok(moe("keys", "secret", str(secret)))
    r = moe("shard", "serve", "--bind", "tcp://0.0.0.0:5799", "--experts", "0-3", "--layers", "1",
            "--d-model", "8", "--d-hidden", "8", "--secret-file", str(secret))
    assert r.returncode == 2 and "needs CURVE keys" in r.stderr and "Traceback" not in r.stderr


def test_train_with_the_jax_backend_writes_a_checkpoint_numpy_evaluates(tasks, tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "run"
    r = ok(moe("train", "--out", str(out), "--no-progress", "--json", "--backend", "jax",
               f"data.task_file={tasks}", *TINY))
    summary = json.loads(r.stdout)
    ev = json.loads(ok(moe("eval", str(out), "--json")).stdout)
    assert set(ev["tasks"]) == {"cls", "reg"}
    for name, t in summary["tasks"].items():
        assert ev["tasks"][name]["score"] == pytest.approx(t["score"], abs=1e-9), name
    r = moe("train", "--out", str(tmp_path / "x"), "--backend", "jax", "--shards", "2", f"data.task_file={tasks}", *TINY)
    assert r.returncode == 2 and "does not use shard servers" in r.stderr


# ----------------------------------------------------------------------------- eval/profile --data, plan
def test_eval_with_data_scores_only_those_tasks(in_process, tasks):
    run, summary = in_process
    ev = json.loads(ok(moe("eval", str(run), "--json", "--data", str(tasks))).stdout)
    assert set(ev["tasks"]) == {"cls", "reg"}
    ev_all = json.loads(ok(moe("eval", str(run), "--json")).stdout)
    assert ev["tasks"] == ev_all["tasks"]  # the same tasks from the file give the same scores
    only = json.loads(ok(moe("eval", str(run), "--json", "--data", str(tasks.parent / "reg_only.toml"))).stdout)
    assert set(only["tasks"]) == {"reg"} and only["tasks"]["reg"] == ev_all["tasks"]["reg"]
    r = moe("eval", str(run), "--data", str(tasks.parent / "unknown.toml"))
    assert r.returncode == 2 and "['other']" in r.stderr and "not in the checkpoint" in r.stderr


def test_profile_with_data_routes_only_those_tasks(in_process, tasks, tmp_path):
    run, _ = in_process

    def routed(*data):
        r = ok(moe("profile", str(run), "--json", *data, "--out", str(tmp_path / str(len(data)))))
        summary = json.loads(Path(json.loads(r.stdout)["files"]["json"]).read_text())["summary"]
        return {t: v["examples"] for t, v in summary["layers"]["block0"]["per_task"].items()}

    everything = routed()
    assert everything["cls"] > 80 and everything["reg"] > 80  # the train splits of 150 rows each
    assert routed("--data", str(tasks.parent / "reg_only.toml")) == {"cls": 0, "reg": everything["reg"]}
    r = moe("profile", str(run), "--data", str(tasks.parent / "unknown.toml"), "--out", str(tmp_path / "q"))
    assert r.returncode == 2 and "not in the checkpoint" in r.stderr


def test_plan_ranks_layouts_and_places_experts_from_a_profile(in_process, tasks, tmp_path):
    run, _ = in_process
    conf = ["--config", str(ROOT / "docs" / "examples" / "pod.toml")]
    plan = json.loads(ok(moe("plan", "--target", "tpu-v2-pod", "--json", *conf)).stdout)
    best = plan["best"]
    assert plan["target"] == "tpu-v2-pod" and plan["candidates"] > plan["rejected"] > 0
    assert best["ep"] * best["dp"] == 256 and best["memory_per_device_bytes"] <= 16 * 2**30
    prof = json.loads(ok(moe("profile", str(run), "--json", "--out", str(tmp_path / "p"))).stdout)["files"]["json"]
    r = ok(moe("plan", "--target", "tpu-v2-board", "--profile", prof, f"data.task_file={tasks}", *TINY))
    assert "device load max/mean (contiguous -> LPT)" in r.stdout
    before, after = (float(v) for v in re.search(r"EP +2: ([0-9.]+) -> ([0-9.]+)", r.stdout).groups())
    assert after <= before and before > 1.0  # the profile's uneven load, spread by LPT
    r = moe("plan", "--target", "tpu-v9")
    assert r.returncode == 2 and "unknown target 'tpu-v9'" in r.stderr and "Traceback" not in r.stderr

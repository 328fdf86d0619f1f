"""The `moe` command end to end on a small run: train, eval, add-task, profile, errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["n_family=2", "family_size=120", "model.d_model=16", "model.n_experts=8", "model.d_hidden=16",
         "batch_size=64", "steps=80", "checkpoint_every=40", "eval_every=40"]


def moe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "moe.cli", *args], capture_output=True, text=True,
                          env=env, timeout=240, cwd=cwd)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = moe("train", "--out", str(out), "--no-progress", "--json", *SMALL)
    assert r.returncode == 0, r.stderr
    return out, json.loads(r.stdout)


def test_train_json_and_files(run):
    out, summary = run
    assert set(summary) >= {"tasks", "balance", "checkpoint"}
    assert set(summary["balance"]) == {"cv_importance", "cv_load", "max_mean_load", "drop_rate"}
    assert len(summary["tasks"]) == 9
    for t in summary["tasks"].values():
        assert set(t) == {"metric", "score", "baseline"} and t["baseline"] is not None
    assert Path(summary["checkpoint"]).is_dir()
    assert (out / "metrics.jsonl").read_text().count("\n") == 2
    assert (out / "profile" / "profile.json").is_file()
    assert summary["active_expert_fraction"] == 2 / 8


def test_eval_reproduces_the_train_scores(run):
    out, summary = run
    r = moe("eval", str(out), "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    for name, t in summary["tasks"].items():
        assert ev["tasks"][name]["score"] == pytest.approx(t["score"], abs=1e-12)


def test_add_task_and_eval_of_the_new_checkpoint(run, tmp_path):
    out, _ = run
    r = moe("add-task", str(out), "--out", str(tmp_path / "added"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res) >= {"task", "metric", "score", "scratch_score", "shots"}
    assert res["task"] == "digits_ge5" and res["shots"] == 20
    r = moe("eval", str(tmp_path / "added"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"]["digits_ge5"]["score"] == pytest.approx(res["score"], abs=1e-12)


def test_add_task_from_a_user_table_and_grow_experts(run, tmp_path):
    out, _ = run
    csv = tmp_path / "t.csv"
    rows = ["a,b,c,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2},{int(i % 7 > 3)}" for i in range(120)]
    csv.write_text("\n".join(rows) + "\n")
    r = moe("add-task", str(out), "--name", "tbl", "--data", str(csv), "--target", "label",
            "--grow-experts", "2", "--out", str(tmp_path / "grown"), "--json")
    assert r.returncode == 0, r.stderr
    r = moe("eval", str(tmp_path / "grown"), "--json")
    assert r.returncode == 0, r.stderr
    assert "tbl" in json.loads(r.stdout)["tasks"]


def test_add_task_never_overwrites_and_its_result_resumes_joint_training(run):
    out, _ = run
    first = moe("add-task", str(out), "--shots", "1", "--json")
    assert first.returncode == 0, first.stderr
    a = json.loads(first.stdout)
    assert Path(a["checkpoint"]).parent.parent == out / "add-digits_ge5" and a["resumable"]
    assert a["shots"] == 2 and "fixed budget" in a["stop_rule"] and a["start"] in (None, *a["similarity"])
    second = moe("add-task", str(out), "--shots", "1", "--seed", "1", "--json")
    assert second.returncode == 0, second.stderr
    b = json.loads(second.stdout)
    assert Path(b["checkpoint"]).parent.parent == out / "add-digits_ge5.v2"
    assert "add-digits_ge5 exists (kept as it is)" in second.stderr
    assert Path(a["checkpoint"]).is_dir()  # the first result is still there
    r = moe("add-task", str(out), "--out", str(out / "add-digits_ge5"))
    assert r.returncode == 2 and "add-task never overwrites a result" in r.stderr and "Traceback" not in r.stderr
    r = moe("train", "--resume", "--out", str(out / "add-digits_ge5"), "--no-progress", "--json", "steps=90",
            "baseline=false")
    assert r.returncode == 0, r.stderr
    resumed = json.loads(r.stdout)
    assert "digits_ge5" in resumed["tasks"] and Path(resumed["checkpoint"]).name == "step-00000090"


def test_profile_json_and_pictures(run, tmp_path):
    out, _ = run
    r = moe("profile", str(out), "--out", str(tmp_path / "p"), "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert set(p) >= {"cv_importance", "cv_load", "max_mean_load", "drop_rate", "dead_experts", "files"}
    for path in p["files"].values():
        assert Path(path).is_file()
        if path.endswith(".png"):
            assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "/nonexistent/ckpt"], "does not exist"),
        (["train", "model.n_experts=0"], "model.n_experts must be an integer >= 1"),
        (["train", "bogus_key=1"], "unknown config key 'bogus_key'"),
        (["train", "--config", "/nonexistent.toml"], "does not exist"),
        (["profile", "/nonexistent", "--out", "/tmp/x"], "does not exist"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, needle):
    r = moe(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr


def test_bad_column_and_corrupt_checkpoint(run, tmp_path):
    out, summary = run
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\n1,2\n3,4\n")
    r = moe("add-task", str(out), "--name", "x", "--data", str(csv), "--target", "nope")
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(summary["checkpoint"], bad)
    (bad / "params.safetensors").write_bytes(b"garbage")
    r = moe("eval", str(bad))
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr


def test_help_documents_every_command():
    r = moe("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "add-task", "profile"):
        assert cmd in r.stdout

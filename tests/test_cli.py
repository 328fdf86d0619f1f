"""The `moe` command end to end on a small run: train, eval, add-task, profile, plan, errors."""

import argparse
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["n_family=2", "n_skills=0", "n_digit_sets=0", "family_size=120", "model.d_model=16", "model.n_experts=8", "model.d_hidden=16",
         "batch_size=64", "steps=80", "checkpoint_every=40", "eval_every=40"]
BALANCE_KEYS = {"cv_importance", "cv_load", "max_mean_load", "drop_rate", "split", "noise", "examples"}


def sigint_default() -> None:
    """Ctrl-C reaches the child as from a terminal: a shell that started the suite in the
    background (`make test &`) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def moe_here(capsys, *args: str) -> tuple[int, str]:
    """The command in this process (for the error paths: no interpreter start-up): (status, stderr)."""
    from moe.cli import main

    rc = main(list(args))
    return rc, capsys.readouterr().err


def moe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "moe.cli", *args], capture_output=True, text=True,
                          env=env, timeout=240, cwd=cwd)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    r = moe("train", "--out", str(out), "--json", *SMALL)  # progress on, into a pipe
    assert r.returncode == 0, r.stderr
    (out.parent / "train.stderr").write_text(r.stderr)
    return out, json.loads(r.stdout)


def wine_table(path: Path, rows: int = 150) -> Path:
    """Three grape varieties as text labels, separable by the first two columns."""
    lines = ["acid,sugar,noise,grape"]
    for i in range(rows):
        c = i % 3
        lines.append(f"{c + 0.1 * (i % 5)},{2 * c - 0.05 * (i % 7)},{(i * 7) % 11},"
                     f"{('barbera', 'barolo', 'grignolino')[c]}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def added(run, tmp_path_factory):
    """The small run plus a task from a TOML file whose table has text class labels."""
    out, _ = run
    folder = tmp_path_factory.mktemp("wine")
    wine_table(folder / "wine.csv")
    toml = folder / "tasks.toml"
    toml.write_text('[[task]]\nname = "grapes"\npath = "wine.csv"\ntarget = "grape"\n')
    r = moe("add-task", str(out), "--data", str(toml), "--out", str(folder / "added"), "--json")
    assert r.returncode == 0, r.stderr
    return folder, json.loads(r.stdout)


class Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.src.append(a["src"])
        if tag == "a" and not a.get("href", "#").startswith("#"):
            self.links.append(a["href"])


def assert_page_complete(html_path: Path) -> Images:
    """Every picture and file the page references exists beside it (and is a PNG when a picture)."""
    page = Images()
    page.feed(html_path.read_text())
    assert page.src, "the page shows no pictures"
    for src in page.src + page.links:
        target = html_path.parent / src
        assert target.is_file(), src
        if src.endswith(".png"):
            assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    return page


def test_progress_into_a_pipe_is_plain_lines_for_every_long_phase(run):
    """stderr is not a terminal here: no carriage returns, and each phase ends with one line."""
    err = (run[0].parent / "train.stderr").read_text()
    assert "\r" not in err
    lines = err.splitlines()
    for phase in ("train: 80/80 steps (100%), took", "dense baselines: 9/9 tasks (100%), took",
                  "profile (train split): "):
        assert sum(line.startswith(phase) for line in lines) == 1, (phase, err)
    assert len(err) < 3000  # a handful of lines, not a stream of redraws


def test_train_json_and_files(run):
    out, summary = run
    assert set(summary) >= {"tasks", "balance", "balance_inference", "checkpoint", "compared", "groups",
                            "specialisation", "inference_routing"}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary["compared"]) == {"moe", "moe without MoE outputs", "dense net per task", "sklearn linear per task"}
    for name, t in summary["tasks"].items():  # the table's columns are the per-task figures
        assert summary["compared"]["moe"][name] == t["score"] and summary["compared"]["dense net per task"][name] == t["baseline"]
    assert summary["groups"]["moe"]["all"] == pytest.approx(np.mean([t["score"] for t in summary["tasks"].values()]))
    assert set(summary["specialisation"]) == {"train", "noise_free"}
    # the last half of the steps trained on balanced seats (factor 1): its figures are of that routing
    assert set(summary["balance"]) == BALANCE_KEYS | {"routing", "balance_factor"}
    assert (summary["balance"]["split"], summary["balance"]["noise"]) == ("train", False)  # the default gate has no noise
    assert (summary["balance"]["routing"], summary["balance"]["balance_factor"]) == ("balanced", 1.0)
    # every full batch puts exactly B k / E rows on each expert; the split's last batch is partial
    assert summary["balance"]["max_mean_load"] <= 1.01 and summary["balance"]["cv_load"] <= 0.01
    assert (summary["balance_inference"]["split"], summary["balance_inference"]["noise"]) == ("test", False)
    assert len(summary["tasks"]) == 9
    for t in summary["tasks"].values():
        assert set(t) == {"metric", "score", "baseline"} and t["baseline"] is not None
    assert Path(summary["checkpoint"]).is_dir()
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2
    for record in log:  # the scores are on val; the balance figure is the training batch's, and says so
        assert (record["split"], record["cv_load_split"], record["cv_load_noise"]) == ("val", "train", False)
    assert (out / "profile" / "profile.json").is_file()
    assert summary["active_expert_fraction"] == 2 / 8
    context = json.loads((out / "profile" / "profile.json").read_text())["context"]
    assert (context["split"], context["noise"], context["step"]) == ("train", False, 80)  # no noise in the default gate
    assert_page_complete(out / "profile" / "profile.html")


def test_eval_reproduces_the_train_scores_and_inference_balance(run):
    out, summary = run
    r = moe("eval", str(out), "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    for name, t in summary["tasks"].items():
        assert ev["tasks"][name]["score"] == pytest.approx(t["score"], abs=1e-12)
    assert set(ev["balance"]) == BALANCE_KEYS
    for key in ("cv_importance", "cv_load", "max_mean_load", "drop_rate"):  # same routing, other batching
        assert ev["balance"][key] == pytest.approx(summary["balance_inference"][key], rel=1e-5, abs=1e-9), key
    assert "test split, no gate noise" in r.stderr


def test_balanced_routing_in_eval_and_profile(run, tmp_path):
    out, summary = run
    r = moe("eval", str(out), "--json", "--routing", "balanced")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["routing"] == "balanced" and "balanced routing in mixed test batches of 256" in r.stderr
    assert ev["balance"]["max_mean_load"] < summary["balance_inference"]["max_mean_load"]
    r = moe("profile", str(out), "--out", str(tmp_path / "p"), "--routing", "balanced")
    assert r.returncode == 2 and "--routing balanced routes as at inference; add --no-noise" in r.stderr
    r = moe("profile", str(out), "--out", str(tmp_path / "p"), "--routing", "balanced", "--no-noise", "--split", "test")
    assert r.returncode == 0, r.stderr
    context = json.loads((tmp_path / "p" / "profile.json").read_text())["context"]
    assert (context["routing"], context["noise"]) == ("balanced", False)


def test_eval_prints_no_empty_baseline_column(run):
    out, _ = run
    r = moe("eval", str(out))
    assert r.returncode == 0, r.stderr
    table = r.stdout.split("\n\n")[0].splitlines()
    assert table[0].split() == ["task", "metric", "moe"]
    assert all(len(line.split()) == 3 for line in table[1:-1]) and table[-1].split()[0] == "mean"
    assert "baseline" not in r.stdout and " - " not in r.stdout


def test_add_task_and_eval_of_the_new_checkpoint(run, tmp_path):
    out, _ = run
    r = moe("add-task", str(out), "--out", str(tmp_path / "added"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert set(res) >= {"task", "metric", "score", "scratch_score", "shots"}
    assert res["task"] == "digits_ge5" and res["shots"] == 20 and res["shots_short"] == {}
    r = moe("eval", str(tmp_path / "added"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"]["digits_ge5"]["score"] == pytest.approx(res["score"], abs=1e-12)


def test_add_task_with_an_own_encoder_evaluates_from_its_checkpoint(run, tmp_path):
    out, _ = run
    r = moe("add-task", str(out), "--adapter", "own", "--out", str(tmp_path / "added"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["adapter"] == "own" and res["adapter_why"] == "asked for (--adapter own)"
    manifest = json.loads(next((tmp_path / "added" / "checkpoints").glob("step-*/manifest.json")).read_text())
    assert manifest["data_source"]["added"][-1]["adapter"] == "own"
    r = moe("eval", str(tmp_path / "added"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tasks"]["digits_ge5"]["score"] == pytest.approx(res["score"], abs=1e-12)
    r = moe("add-task", str(out), "--adapter", "mine")
    assert r.returncode == 2 and "--adapter" in r.stderr and "Traceback" not in r.stderr


def test_add_task_from_a_user_table_and_grow_experts(run, tmp_path):
    out, _ = run
    csv = tmp_path / "t.csv"
    rows = ["a,b,c,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2},{int(i % 7 > 3)}" for i in range(120)]
    csv.write_text("\n".join(rows) + "\n")
    r = moe("add-task", str(out), "--data", str(csv), "--target", "label",
            "--grow-experts", "2", "--out", str(tmp_path / "grown"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["task"] == "t"  # a table's task is named after the file by default
    r = moe("eval", str(tmp_path / "grown"), "--json")
    assert r.returncode == 0, r.stderr
    assert "t" in json.loads(r.stdout)["tasks"]


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


def test_text_class_labels_are_mapped_stored_and_shown(added):
    folder, res = added
    assert res["task"] == "grapes"
    manifest = json.loads(next((folder / "added" / "checkpoints").glob("step-*/manifest.json")).read_text())
    spec = next(t for t in manifest["tasks"]["tasks"] if t["name"] == "grapes")
    assert spec["classes"] == ["barbera", "barolo", "grignolino"] and spec["n_outputs"] == 3
    r = moe("eval", str(folder / "added"), "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["tasks"]["grapes"]["classes"] == ["barbera", "barolo", "grignolino"]
    assert ev["tasks"]["grapes"]["score"] == pytest.approx(res["score"], abs=1e-12)
    assert "class labels of grapes: 0=barbera, 1=barolo, 2=grignolino" in r.stderr


@pytest.mark.parametrize("form", ["toml", "csv"])
def test_data_takes_the_same_forms_in_eval_and_profile(added, form, tmp_path):
    folder, res = added
    data = (["--data", str(folder / "tasks.toml")] if form == "toml" else
            ["--data", str(folder / "wine.csv"), "--target", "grape", "--name", "grapes"])
    r = moe("eval", str(folder / "added"), *data, "--json")
    assert r.returncode == 0, r.stderr
    assert list(json.loads(r.stdout)["tasks"]) == ["grapes"]
    assert json.loads(r.stdout)["tasks"]["grapes"]["score"] == pytest.approx(res["score"], abs=1e-12)
    r = moe("profile", str(folder / "added"), *data, "--out", str(tmp_path / "p"), "--json", "--no-progress")
    assert r.returncode == 0, r.stderr
    doc = json.loads((tmp_path / "p" / "profile.json").read_text())
    assert doc["context"]["tasks"] == 1 and list(doc["summary"]["layers"]["block0"]["per_task"])[-1] == "grapes"


@pytest.mark.parametrize("command", ["eval", "profile", "add-task"])
@pytest.mark.parametrize(
    "data,extra,needle",
    [
        ("wine.csv", [], "--data wine.csv is a table: say which column is the target with --target COLUMN"),
        ("tasks.toml", ["--target", "grape"], "--target describe a .csv/.npz table; a TOML task file names"),
        ("notes.txt", [], "--data must be a TOML task file (.toml), or a table (.csv or .npz) with --target"),
    ],
)
def test_data_mistakes_get_the_same_message_in_every_command(added, tmp_path, capsys, command, data, extra, needle):
    folder, _ = added
    (folder / "notes.txt").write_text("x\n")
    more = ["--out", str(tmp_path / "o")] if command == "profile" else []
    rc, err = moe_here(capsys, command, str(folder / "added"), "--data", str(folder / data), *extra, *more)
    assert rc == 2 and needle in err
    assert len(err.strip().splitlines()) == 1


def test_eval_refuses_a_table_that_is_not_the_checkpoints_task(added, tmp_path):
    folder, _ = added
    other = tmp_path / "grapes.csv"
    lines = (folder / "wine.csv").read_text().replace("grignolino", "nebbiolo")
    other.write_text(lines)
    r = moe("eval", str(folder / "added"), "--data", str(other), "--target", "grape")
    assert r.returncode == 2, r.stderr
    assert "task 'grapes' from" in r.stderr and "has class labels ['barbera', 'barolo', 'nebbiolo']" in r.stderr


def test_text_labels_for_a_task_that_learned_bare_class_ids_are_refused(run, tmp_path, capsys):
    out, _ = run
    def table(labels):  # the built-in wine's width (13 features), three classes
        path = tmp_path / "wine.csv"
        rows = [",".join(f"{(i * (j + 3)) % 7}" for j in range(13)) + f",{labels[i % 3]}" for i in range(60)]
        path.write_text(",".join(f"f{j}" for j in range(13)) + ",grape\n" + "\n".join(rows) + "\n")
        return str(path)

    rc, err = moe_here(capsys, "eval", str(out), "--data", table(["barbera", "barolo", "nebbiolo"]),
                       "--target", "grape")
    assert rc == 2
    assert ("task 'wine' from '" in err and "has text class labels ['barbera', 'barolo', 'nebbiolo']; the "
            "checkpoint's task learned class ids without labels" in err)
    rc, err = moe_here(capsys, "eval", str(out), "--data", table(["0", "1", "2"]), "--target", "grape")
    assert rc == 0, err  # class ids as numbers map as in training


def test_shots_beyond_the_data_say_so(run, tmp_path):
    out, _ = run
    csv = wine_table(tmp_path / "few.csv", rows=30)  # 6 training rows per class
    r = moe("add-task", str(out), "--data", str(csv), "--target", "grape", "--shots", "50",
            "--out", str(tmp_path / "a"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["shots_short"] == {"barbera": 6, "barolo": 6, "grignolino": 6} and res["shots"] == 18
    assert ("note: --shots 50 asks for more examples than the train split of 'few' holds "
            "(class 'barbera': 6, 'barolo': 6, 'grignolino': 6); all of those are used") in r.stderr


def test_a_continuous_target_declared_multiclass_is_named(run, tmp_path):
    out, _ = run
    csv = tmp_path / "price.csv"
    csv.write_text("a,b,price\n" + "".join(f"{i % 5},{i % 3},{1.5 + i * 0.37:.2f}\n" for i in range(90)))
    r = moe("add-task", str(out), "--data", str(csv), "--target", "price", "--kind", "multiclass")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "target 'price' is declared multiclass but holds 90 distinct non-integer values" in r.stderr
    assert "looks continuous" in r.stderr and "--kind regression" in r.stderr


def test_profile_page_names_split_noise_and_every_picture_exists(run, tmp_path):
    out, _ = run
    r = moe("profile", str(out), "--out", str(tmp_path / "p"), "--json", "--no-noise", "--split", "test",
            "--shards", "3")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert set(p) >= BALANCE_KEYS | {"dead_experts", "files"} and (p["split"], p["noise"]) == ("test", False)
    for path in p["files"].values():
        assert Path(path).is_file()
    page = assert_page_complete(Path(p["files"]["html"]))
    names = {Path(s).name for s in page.src}
    assert names == {f"profile_block0_{k}.png" for k in ("load", "sorted", "heatmap", "bins")}
    html = Path(p["files"]["html"]).read_text()
    assert "the test split" in html and "no gate noise" in html and "Load per shard" in html
    doc = json.loads(Path(p["files"]["json"]).read_text())
    assert doc["placement"]["n_bins"] == 3 and doc["placement"]["assignment"] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert "routing measured on: test split, no gate noise" in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["eval", "/nonexistent/ckpt"], "does not exist"),
        (["train", "model.n_experts=0"], "model.n_experts must be an integer >= 1"),
        (["train", "bogus_key=1"], "unknown config key 'bogus_key'"),
        (["train", "--config", "/nonexistent.toml"], "does not exist"),
        (["profile", "/nonexistent", "--out", "{tmp}/x"], "does not exist"),
        (["plan", "--target", "tpu-v2", "max_drop_rate=0.01"],
         "max_drop_rate is a planner option, not a config key: pass --max-drop-rate 0.01"),
        (["plan", "--target", "tpu-v2", "--max-drop-rate", "5"], "--max-drop-rate must be a fraction in [0, 1], got 5.0"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, needle, capsys, tmp_path):
    rc, err = moe_here(capsys, *(a.format(tmp=tmp_path) for a in args))
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_plan_takes_the_options_its_warning_names_and_fails_when_nothing_fits():
    r = moe("plan", "--target", "tpu-v2", "--max-drop-rate", "0.001", "--tokens-per-device", "1024,512",
            "--top", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert "over the drop-rate limit" in r.stderr
    r = moe("plan", "--target", "tpu-v2", "--json", "model.n_experts=4096", "model.d_model=4096",
            "model.d_hidden=16384")
    assert r.returncode == 1, r.stderr
    assert json.loads(r.stdout)["best"] is None and "no layout fits in HBM" in r.stderr


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


def test_version_matches_the_installed_metadata():
    r = moe("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"moe {importlib.metadata.version('moe')}"


def test_every_command_has_a_description_and_every_option_help():
    from moe.cli import build_parser

    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        if not parser.description:
            missing.append(f"{path}: no description")
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: no help")

    walk(build_parser(), "moe")
    assert missing == []
    r = moe("--help")
    assert r.returncode == 0
    for cmd in ("train", "eval", "add-task", "profile", "plan", "shard", "keys"):
        assert cmd in r.stdout


def test_ctrl_c_keeps_a_checkpoint_and_prints_how_to_resume(tmp_path):
    """SIGINT mid-run: the newest checkpoint is named on a line of its own with the command that
    resumes from it, and that command does resume there. Progress goes to a pipe: plain lines."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    steps = [*SMALL[:-3], "steps=100000", "checkpoint_every=10", "eval_every=100000", "baseline=false"]
    p = subprocess.Popen([sys.executable, "-m", "moe.cli", "train", "--out", str(out), *steps],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=sigint_default)
    try:
        deadline = time.monotonic() + 200  # stops a hang only; no timing is asserted
        while len(list((out / "checkpoints").glob("step-*/manifest.json"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, err
    assert "\r" not in err and "Traceback" not in err
    kept = sorted((out / "checkpoints").glob("step-*"))[-1]
    step = int(kept.name.split("-")[1])
    lines = err.strip().splitlines()
    assert lines[-2] == f"moe train: interrupted; kept checkpoint {kept} (step {step} of 100000)"
    assert lines[-1] == f"resume with: moe train --out {shlex.quote(str(out))} --resume"
    resume = shlex.split(lines[-1].removeprefix("resume with: "))
    assert resume[0] == "moe"
    r = moe(*resume[1:], "--stop-at", str(step + 5), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"resumed from {kept} at step {step}" in r.stdout
    assert f"stopped at step {step + 5}" in r.stdout
    assert "train:" not in r.stderr  # --no-progress

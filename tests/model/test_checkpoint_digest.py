"""A checkpoint's manifest cannot be edited silently, and writers killed mid-save leave nothing.

Oracles: the manifest's own digest (any edit, any removed key is refused with one line, never
a KeyError), the process table (a temporary folder is stale exactly when its writer is gone),
and `moe train --resume` (exit status 2 with one line; the resumed run of an unedited
checkpoint is unaffected by stale folders).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe import checkpoint as ckpt
from moe import cli
from moe.config import Config, ModelConfig, TrainConfig
from moe.tasks.family import make_family
from moe.train import Trainer

pytestmark = pytest.mark.unit


def _config() -> Config:
    return Config(model=ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2),
                  train=TrainConfig(steps=6, batch_size=16, checkpoint_every=3, eval_every=100, warmup=1,
                                    progress=False))


@pytest.fixture
def run(tmp_path):
    data = make_family(2, 60, seed=0)
    trainer = Trainer(_config(), data, tmp_path / "run", echo=lambda s: None)
    trainer.train(stop_at=3)
    return data, tmp_path / "run", ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]


def _edit(where: Path, change) -> None:
    path = where / ckpt.MANIFEST
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m, indent=1, sort_keys=True))


def _state_of(m: dict) -> dict:
    return m["rng"]["noise"]["state"]


@pytest.mark.parametrize("what,change", [
    ("step 3 -> 2", lambda m: m.update(step=2)),
    ("one RNG state value", lambda m: _state_of(m).update(state=_state_of(m)["state"] + 1)),
    ("data_cursor removed", lambda m: m.pop("data_cursor")),
    ("a file's sha256", lambda m: next(iter(m["files"].values())).update(sha256="0" * 64)),
    ("the digest itself", lambda m: m.update(digest="0" * 64)),
    ("the digest removed", lambda m: m.pop("digest")),
])
def test_an_edited_manifest_is_refused(run, what, change):
    data, out, where = run
    _edit(where, change)
    with pytest.raises(ckpt.CheckpointError) as info:
        Trainer(_config(), data, out, echo=lambda s: None).train(resume=True)
    assert str(info.value).endswith("manifest.json was edited (its digest does not match its contents)"), what


def test_a_manifest_missing_a_key_under_a_valid_digest_is_one_clear_error(run):
    """Written by some other tool that recomputed the digest: still a clear line, not a KeyError."""
    data, out, where = run

    def drop_cursor(m):
        m.pop("data_cursor")
        m["digest"] = ckpt.manifest_digest(m)

    _edit(where, drop_cursor)
    with pytest.raises(ckpt.CheckpointError, match=r"manifest key 'data_cursor' must be a dict, got nothing$"):
        Trainer(_config(), data, out, echo=lambda s: None).train(resume=True)


def test_the_digest_is_over_canonical_json(run):
    """Re-formatting the file (indentation, key order) is not an edit; the digest is recomputable."""
    _, _, where = run
    m = json.loads((where / ckpt.MANIFEST).read_text())
    assert m["digest"] == ckpt.manifest_digest(m)
    (where / ckpt.MANIFEST).write_text(json.dumps(m))  # one line, another key order
    assert ckpt.read_manifest(where)["step"] == 3


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporary_folders_are_removed_by_the_next_save_and_resume(run, tmp_path):
    data, out, where = run
    root = out / "checkpoints"
    stale = [root / f".step-00000004.tmp-{_dead_pid()}", root / ".step-00000003.tmp-999999999"]
    alive = root / f".step-00000005.tmp-{os.getppid()}"  # a live writer's: left alone
    for folder in (*stale, alive):
        folder.mkdir()
        (folder / "params.safetensors").write_bytes(b"half")
    trainer = Trainer(_config(), data, out, echo=lambda s: None)
    trainer.train(resume=True, stop_at=3)  # only the resume runs (no step, no save): it removes them
    assert not any(f.exists() for f in stale) and alive.exists()
    stale[0].mkdir()
    trainer.train(stop_at=4)  # one more step, then its save: that removes them too
    assert not stale[0].exists() and alive.exists()
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003", "step-00000004"]


def test_moe_train_resume_of_an_edited_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--no-progress", "--stop-at", "3", "train.steps=6", "train.batch_size=16",
            "train.checkpoint_every=3", "train.warmup=1", "model.d_model=8", "model.n_experts=4", "model.d_hidden=8",
            "data.builtin=false", "data.task_file=" + str(_task_file(tmp_path))]
    assert cli.main(args) == 0
    where = ckpt.list_checkpoints(out / "checkpoints")[-1]
    _edit(where, lambda m: m.update(step=1))
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("moe train: error: ") and err[-1].endswith("manifest.json was edited (its digest "
                                                                          "does not match its contents)")


def _task_file(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((90, 3))
    y = (x[:, 0] > 0).astype(int)
    rows = "\n".join(",".join(f"{v:.6f}" for v in r) + f",{t}" for r, t in zip(x, y, strict=True))
    (tmp_path / "t.csv").write_text("a,b,c,y\n" + rows + "\n")
    (tmp_path / "tasks.toml").write_text('[[task]]\nname = "t"\npath = "t.csv"\ntarget = "y"\nkind = "binary"\n')
    return tmp_path / "tasks.toml"

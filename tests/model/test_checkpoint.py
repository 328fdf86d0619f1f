"""Checkpoints are atomic, verified on load, and refuse anything tampered with or truncated."""

import json

import numpy as np
import pytest

from moe import checkpoint as ckpt
from moe.api import load, save_model
from moe.config import Config, ModelConfig
from moe.model import Chunk, MultiTaskMoE
from moe.tasks.spec import TaskRegistry, TaskSpec

pytestmark = pytest.mark.unit


@pytest.fixture
def saved(tmp_path):
    cfg = Config(model=ModelConfig(d_model=8, n_experts=4, d_hidden=8))
    reg = TaskRegistry([TaskSpec("a", "multiclass", 3, 2)])
    model = MultiTaskMoE(cfg.model, reg, rng=np.random.default_rng(0))
    where = save_model(tmp_path / "ckpts", 7, model, cfg, {"data_source": {}})
    return model, where


def test_round_trip_gives_the_same_function(saved):
    model, where = saved
    x = np.random.default_rng(1).standard_normal((5, 3), dtype=np.float32)
    again = load(where)
    a = model.forward([Chunk("a", x)], train=False).outputs[0]
    b = again.forward([Chunk("a", x)], train=False).outputs[0]
    assert np.array_equal(a, b)
    for n, p in model.params.items():
        assert np.array_equal(p, again.params[n]), n


@pytest.mark.parametrize("fname", ["params.safetensors", "experts-l0.safetensors"])
def test_a_flipped_byte_is_refused(saved, fname):
    _, where = saved
    path = where / fname
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        load(where)


def test_a_truncated_file_is_refused(saved):
    _, where = saved
    path = where / "params.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        load(where)


@pytest.mark.parametrize("fname", ["params.safetensors", "experts-l0.safetensors"])
def test_a_missing_file_is_refused(saved, fname):
    _, where = saved
    (where / fname).unlink()
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        load(where)


def test_an_inference_load_leaves_the_optimizer_files_unread(saved):
    """moe.load (eval, profile, add-task) reads the weights only: optimizer files may even be
    gone or damaged; a training load (every file) still refuses them."""
    model, where = saved
    manifest = ckpt.read_manifest(where)
    adam = [f for f, e in manifest["files"].items() if e.get("kind") == "experts-adam"]
    assert adam == ["experts-l0.adam.safetensors"]
    (where / "optim.safetensors").unlink()
    data = bytearray((where / adam[0]).read_bytes())
    data[-1] ^= 0x01
    (where / adam[0]).write_bytes(bytes(data))
    again = load(where)
    for n, p in model.params.items():
        assert np.array_equal(p, again.params[n]), n
    assert again.layers[0].experts.memory()["adam_bytes"] == 0
    with pytest.raises(ckpt.CheckpointError, match="optim.safetensors' is missing"):
        ckpt.load_checkpoint(where)
    with pytest.raises(ckpt.CheckpointError, match="adam.safetensors does not match its sha256"):
        again.layers[0].experts.load_part(where, manifest["files"], 0)


def test_a_folder_without_manifest_is_not_a_checkpoint(saved, tmp_path):
    _, where = saved
    (where / ckpt.MANIFEST).unlink()
    assert ckpt.list_checkpoints(where.parent) == []
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint"):
        load(where)


def test_a_bad_manifest_is_refused(saved):
    _, where = saved
    (where / ckpt.MANIFEST).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match="not valid JSON"):
        load(where)
    (where / ckpt.MANIFEST).write_text(json.dumps({"format": "other/9", "files": {}}))
    with pytest.raises(ckpt.CheckpointError, match="expected format"):
        load(where)


def test_save_is_atomic_and_keeps_the_last_k(tmp_path):
    root = tmp_path / "c"
    for step in range(1, 6):
        ckpt.save_checkpoint(root, step, {"params": {"w": np.full(3, step, np.float32)}}, {}, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004", "step-00000005"]
    # a writer that fails leaves no checkpoint and no temporary folder behind
    def boom(folder):
        raise OSError("disk full")
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 6, {"params": {"w": np.zeros(3, np.float32)}}, {}, writers=[boom])
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000004", "step-00000005"]
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_loading_into_a_different_shape_names_the_mismatch(saved):
    _, where = saved
    target = {"task.a.head.w": np.zeros((9, 2), np.float32)}
    _, files, _ = ckpt.load_checkpoint(where)
    with pytest.raises(ckpt.CheckpointError, match="missing|expected"):
        ckpt.assign(target, files["params"], "params")

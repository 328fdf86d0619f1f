"""Checkpoints are atomic, verified on load, and refuse anything tampered with or truncated."""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

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


def refusal(where, *, load_fn=None) -> str:
    """The CheckpointError message of loading `where`, with the folder's path replaced by <ckpt>.

    pytest's tmp folders are named after the test ("test_a_truncated_file_is_refus0"), so a
    pattern searched in the raw message could match the path instead of the error."""
    with pytest.raises(ckpt.CheckpointError) as e:
        (load_fn or load)(where)
    return str(e.value).replace(str(where), "<ckpt>")


def write_signed(where, manifest) -> None:
    """Write a manifest with its digest recomputed (as a tool that edits it on purpose would), so
    the checks after the digest's are the ones that can refuse it."""
    if isinstance(manifest, dict):
        manifest = {**manifest, "digest": ckpt.manifest_digest(manifest)}
    (where / ckpt.MANIFEST).write_text(json.dumps(manifest))


def rewrite(where, fname, change) -> None:
    """Replace a file's tensors by change(tensors) and re-sign it in the manifest, so only the
    content check (not the hash or size check) can refuse it."""
    path = where / fname
    data = st_save(change(dict(st_load(path.read_bytes()))))
    path.write_bytes(data)
    manifest = json.loads((where / ckpt.MANIFEST).read_text())
    manifest["files"][fname].update(sha256=ckpt.sha256_bytes(data), bytes=len(data))
    write_signed(where, manifest)


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
    msg = refusal(where)
    assert re.fullmatch(rf"(checkpoint '<ckpt>': )?{re.escape(fname)} does not match its sha256 \(tampered or corrupt\)", msg), msg


def test_a_truncated_file_is_refused(saved):
    _, where = saved
    path = where / "params.safetensors"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    msg = refusal(where)
    assert msg == f"checkpoint '<ckpt>': params.safetensors has {size - 10} bytes, manifest says {size} (truncated?)"


@pytest.mark.parametrize("fname", ["params.safetensors", "experts-l0.safetensors"])
def test_a_missing_file_is_refused(saved, fname):
    _, where = saved
    (where / fname).unlink()
    assert refusal(where) == f"checkpoint '<ckpt>': file '{fname}' is missing"


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


def test_assign_names_missing_and_unexpected_tensors(saved):
    _, where = saved
    _, files, _ = ckpt.load_checkpoint(where)
    names = sorted(files["params"])
    target = {names[0]: files["params"][names[0]].copy(), "nope": np.zeros(1, np.float32)}
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.assign(target, files["params"], "params")
    assert str(e.value) == f"params: missing ['nope'], unexpected {names[1:6]}"


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda a: a.astype(np.float64), "expected float32[16, 4], got float64[16, 4]"),
        (lambda a: np.zeros((25, 4), np.float32), "expected float32[16, 4], got float32[25, 4]"),
    ],
    ids=["dtype", "shape"],
)
def test_a_tensor_of_another_dtype_or_shape_is_refused_not_cast(saved, change, expected):
    """Same names, same hash (re-signed), one tensor differs: the shape/dtype check must fire."""
    _, where = saved
    gate = "block0.moe.gate.w_gate"  # [d_task_emb, E] (the default router reads the task embedding alone)
    rewrite(where, "params.safetensors", lambda t: {**t, gate: change(t[gate])})
    assert refusal(where) == f"checkpoint '<ckpt>' parameters '{gate}': {expected}"


@pytest.mark.parametrize(
    "change,expected",
    [
        (lambda a: a.astype(np.float64), "expected float32[8, 8] rows, got float64[8, 8]"),
        (lambda a: a[:, :, :7].copy(), "expected float32[8, 8] rows, got float32[8, 7]"),
    ],
    ids=["dtype", "shape"],
)
def test_an_expert_part_of_another_dtype_or_shape_is_refused(saved, change, expected):
    _, where = saved
    rewrite(where, "experts-l0.safetensors", lambda t: {**t, "w1": change(t["w1"])})
    assert refusal(where) == f"experts-l0.safetensors tensor 'w1': {expected}"


def test_a_path_that_does_not_exist(tmp_path):
    assert refusal(tmp_path / "nope") == "checkpoint path '<ckpt>' does not exist"


@pytest.mark.parametrize(
    "manifest,expected",
    [
        ([1, 2], f"checkpoint '<ckpt>': expected format '{ckpt.FORMAT}', got 'list'"),
        ({"format": ckpt.FORMAT, "step": 1, "files": []},
         "checkpoint '<ckpt>': manifest key 'files' must be a dict, got list"),
        ({"format": ckpt.FORMAT, "step": 1}, "checkpoint '<ckpt>': manifest key 'files' must be a dict, got nothing"),
    ],
)
def test_a_manifest_of_the_wrong_shape_is_refused(saved, manifest, expected):
    _, where = saved
    write_signed(where, manifest)
    assert refusal(where) == expected


def test_a_signed_file_that_is_not_safetensors_is_refused(saved):
    _, where = saved
    path = where / "params.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not js}")
    manifest = json.loads((where / ckpt.MANIFEST).read_text())
    manifest["files"]["params.safetensors"].update(sha256=ckpt.sha256_bytes(path.read_bytes()), bytes=16)
    write_signed(where, manifest)
    assert refusal(where).startswith("checkpoint '<ckpt>': params.safetensors is not a valid safetensors file (")


def test_expert_parts_are_read_only_when_asked(saved):
    _, where = saved
    _, files, _ = ckpt.load_checkpoint(where)
    assert sorted(files) == ["optim", "params"]
    _, files, _ = ckpt.load_checkpoint(where, load_experts=True)
    assert sorted(files) == ["experts-l0", "experts-l0.adam", "optim", "params"]


def _save(root, step, value):
    return ckpt.save_checkpoint(root, step, {"params": {"w": np.full(2, value, np.float32)}}, {})


def test_a_run_folder_means_its_newest_checkpoint(tmp_path):
    run = tmp_path / "run"
    for step in (3, 10, 7):
        _save(run / "checkpoints", step, step)
    assert ckpt.resolve(run) == ckpt.resolve(run / "checkpoints") == run / "checkpoints" / "step-00000010"
    assert ckpt.resolve(run / "checkpoints" / "step-00000003") == run / "checkpoints" / "step-00000003"


def test_save_creates_missing_parents_and_replaces_a_step_whole(tmp_path):
    root = tmp_path / "a" / "b" / "c"
    first = ckpt.save_checkpoint(root, 5, {"params": {"w": np.zeros(2, np.float32)}, "extra": {"x": np.ones(1)}}, {})
    again = _save(root, 5, 9.0)  # e.g. after a rollback: the old folder goes, extra file included
    assert first == again and sorted(p.name for p in again.iterdir()) == ["manifest.json", "params.safetensors"]
    _, files, _ = ckpt.load_checkpoint(again)
    assert files["params"]["w"].tolist() == [9.0, 9.0]


def test_a_stale_temporary_folder_of_this_process_is_replaced(tmp_path):
    root = tmp_path / "c"
    stale = root / f".step-00000004.tmp-{os.getpid()}"
    stale.mkdir(parents=True)
    (stale / "junk.safetensors").write_bytes(b"junk")
    where = _save(root, 4, 1.0)
    assert sorted(p.name for p in where.iterdir()) == ["manifest.json", "params.safetensors"]
    assert not stale.exists()


def test_save_makes_every_file_durable_before_the_rename_commits_it(tmp_path, monkeypatch):
    """The order of docs/FORMAT.md: each file written in full and fsynced, the manifest last, the
    folder fsynced, the rename, then the parent folder fsynced. No descriptor is left open."""
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        events.append(("fsync", path.name, os.fstat(fd).st_size if path.is_file() else None))
        real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", Path(src).name, Path(dst).name))
        real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    open_before = len(os.listdir("/proc/self/fd"))
    root = tmp_path / "c"
    where = ckpt.save_checkpoint(root, 2, {"params": {"w": np.ones(3, np.float32)}, "optim": {"t": np.ones(1)}}, {})
    assert len(os.listdir("/proc/self/fd")) == open_before
    size = {p.name: p.stat().st_size for p in where.iterdir()}
    tmp = f".step-00000002.tmp-{os.getpid()}"
    assert events == [
        ("fsync", "params.safetensors", size["params.safetensors"]),
        ("fsync", "optim.safetensors", size["optim.safetensors"]),
        ("fsync", "manifest.json", size["manifest.json"]),
        ("fsync", tmp, None),
        ("rename", tmp, "step-00000002"),
        ("fsync", "c", None),
    ]



def test_a_failed_save_raises_its_own_error_and_leaves_no_temporary_folder(tmp_path):
    """Even when the failing writer already took the temporary folder with it (a writer in
    another process may clean up on its own failure), the caller sees the writer's error."""
    def failing_writer(tmp):
        shutil.rmtree(tmp)
        raise RuntimeError("disk full")

    root = tmp_path / "c"
    with pytest.raises(RuntimeError, match="^disk full$"):
        ckpt.save_checkpoint(root, 1, {"params": {"w": np.ones(2, np.float32)}}, {}, writers=[failing_writer])
    assert list(root.iterdir()) == []


def test_pruning_tolerates_a_checkpoint_another_process_already_removed(tmp_path, monkeypatch):
    root = tmp_path / "c"
    for step in (1, 2):
        _save(root, step, step)
    gone = root / "step-00000000"  # listed, then removed by someone else before the prune
    real = ckpt.list_checkpoints
    monkeypatch.setattr(ckpt, "list_checkpoints", lambda r: [gone, *real(r)])
    where = ckpt.save_checkpoint(root, 3, {"params": {"w": np.zeros(2, np.float32)}}, {}, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == [where.name] == ["step-00000003"]


def test_remove_stale_takes_the_folders_of_gone_writers_and_of_this_process_only(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no running process
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folders = {who: tmp_path / f".step-00000010.tmp-{pid}" for who, pid in
                   (("dead", dead.pid), ("live", live.pid), ("self", os.getpid()))}
        for p in folders.values():
            p.mkdir()
        (tmp_path / "step-00000010").mkdir()  # a committed checkpoint: never touched
        (tmp_path / ".step-00000010.tmp-x").mkdir()  # not a writer's name: left alone
        gone = ckpt.remove_stale(tmp_path)
        assert sorted(gone) == sorted([folders["dead"], folders["self"]])
        assert folders["live"].is_dir() and not folders["dead"].exists() and not folders["self"].exists()
        assert (tmp_path / "step-00000010").is_dir() and (tmp_path / ".step-00000010.tmp-x").is_dir()
        assert ckpt.remove_stale(tmp_path / "absent") == []
    finally:
        live.kill()
        live.wait()


def test_assign_names_missing_and_unexpected_arrays_alone_or_together():
    dst = {"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)}
    with pytest.raises(ckpt.CheckpointError, match=r"missing \['b'\], unexpected \[\]"):
        ckpt.assign(dst, {"a": np.ones(2, np.float32)}, "params")
    with pytest.raises(ckpt.CheckpointError, match=r"missing \[\], unexpected \['c'\]"):
        ckpt.assign(dst, {"a": np.ones(2, np.float32), "b": np.ones(2, np.float32), "c": np.ones(1)}, "params")
    ckpt.assign(dst, {"a": np.ones(2, np.float32), "b": np.full(2, 2, np.float32)}, "params")
    assert dst["b"].tolist() == [2.0, 2.0]


def test_require_refuses_a_bool_where_an_int_is_needed(tmp_path):
    ckpt.require({"step": 3, "tasks": {"a": 1}}, {"step": int, "tasks": dict}, tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"manifest key 'step' must be a"):
        ckpt.require({"step": True}, {"step": int}, tmp_path)
    ckpt.require({"flag": True}, {"flag": bool}, tmp_path)  # a bool where a bool is asked: fine

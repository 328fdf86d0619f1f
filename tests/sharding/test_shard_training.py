"""Training with experts on shard processes equals training in-process, bit for bit.

Real processes on ipc sockets in a temp folder. The oracle is the in-process Trainer on the
same config and seed: every dense parameter and every expert parameter and Adam moment of the
final checkpoint must be np.array_equal. Faults (kill -9 during forward, during backward) must
be survived with the same final bits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from shardkit import STEPS, assert_same_checkpoint, shard_config

import moe.api
from moe import checkpoint as ckpt
from moe.config import Config
from moe.processes import pid_alive as _alive
from moe.sharding.coordinator import open_expert_groups
from moe.train import Trainer

pytestmark = pytest.mark.distributed


def _train_sharded(config: Config, data, out: Path, **launch) -> tuple[Path, list[int], list[str]]:
    said: list[str] = []
    with open_expert_groups(config, out, echo=said.append, **launch) as (groups, on_failure):
        trainer = Trainer(config, data, out, expert_groups=groups, on_failure=on_failure, echo=said.append)
        pids = [p for g in groups[:1] for p in _shard_pids(g)]
        result = trainer.train()
    assert result.step == STEPS
    return result.checkpoint, pids, said


def _shard_pids(group) -> list[int]:
    return [int(p) for p in group.links.pids] if hasattr(group.links, "pids") else []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_sharded_training_is_bit_identical_to_in_process(n_shards, data, reference, tmp_path):
    got, _, said = _train_sharded(shard_config(n_shards), data, tmp_path)
    assert sum("ready on ipc://" in s for s in said) == n_shards
    part_files = [f for f in ckpt.read_manifest(got)["files"] if f.startswith("experts-")]
    assert len(part_files) == 2 * 2 * n_shards  # each shard wrote its weights and Adam files of each layer
    assert_same_checkpoint(got, reference)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault,victim", [("forward@7", 1), ("backward@13", 0)])
def test_kill_9_mid_step_is_survived_bit_exactly(fault, victim, data, reference, tmp_path):
    extra = lambda i: ["--fault", fault] if i == victim else []  # noqa: E731
    got, _, said = _train_sharded(shard_config(2), data, tmp_path, extra_args=extra)
    failures = [s for s in said if "failed:" in s]
    assert len(failures) == 1 and f"shard {victim}" in failures[0], said
    assert "killed by signal 9" in failures[0]
    assert any(f"restarting shard {victim}" in s for s in said)
    assert_same_checkpoint(got, reference)


@pytest.mark.timeout(120)
def test_shard_processes_are_gone_after_the_run_and_after_an_exception(data, tmp_path):
    config = shard_config(2)
    with open_expert_groups(config, tmp_path / "a", echo=lambda s: None) as (groups, _):
        pids = list(groups[0].links.pids)
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    assert not any(_alive(p) for p in pids)
    with pytest.raises(RuntimeError, match="boom"):
        with open_expert_groups(config, tmp_path / "b", echo=lambda s: None) as (groups, _):
            pids = list(groups[0].links.pids)
            raise RuntimeError("boom")
    assert not any(_alive(p) for p in pids)


@pytest.mark.timeout(120)
def test_resharding_save_with_3_load_with_2_gives_equal_outputs(data, tmp_path):
    config3 = shard_config(3)
    got3, _, _ = _train_sharded(config3, data, tmp_path / "three")
    manifest = ckpt.read_manifest(got3)
    rng = np.random.default_rng(5)
    E, d = config3.model.n_experts, config3.model.d_model
    counts = rng.integers(0, 6, E)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    x = rng.standard_normal((int(offsets[-1]), d)).astype(np.float32)
    local = moe.api.load(got3)  # every expert in this process: the oracle
    config2 = shard_config(2)
    with open_expert_groups(config2, got3.parent.parent, echo=lambda s: None) as (groups, _):
        for layer, group in enumerate(groups):
            group.load_part(got3, manifest["files"], layer)
            y = group.forward(x, offsets)
            want = local.layers[layer].experts.forward(x, offsets)
            assert y.dtype == np.float32 and np.array_equal(y, want)
        assert groups[0].step == STEPS  # the step came from the checkpoint's manifest

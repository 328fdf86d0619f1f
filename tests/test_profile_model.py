"""collect_profile: mixed batches route every example once, as routing each task alone does."""

import numpy as np
import pytest

from moe.config import ModelConfig, ShardConfig
from moe.model import Chunk, MultiTaskMoE
from moe.profile_model import balance_summary, collect_profile, mixed_batches, shard_placement
from moe.tasks.family import make_family
from moe.tasks.spec import TaskRegistry

pytestmark = pytest.mark.unit


def test_mixed_batches_cover_every_example_once_in_proportion():
    sizes = [300, 100, 50]
    batches = mixed_batches(sizes, 45)
    pairs = [(int(t), int(i)) for task, index in batches for t, i in zip(task, index, strict=True)]
    assert sorted(pairs) == sorted((t, i) for t, n in enumerate(sizes) for i in range(n))
    assert [len(t) for t, _ in batches] == [45] * 10
    for task, index in batches:  # each batch holds the tasks 6:2:1, within one example
        counts = np.bincount(task, minlength=3)
        np.testing.assert_allclose(counts, 45 * np.array(sizes) / 450, atol=1.0)
        for t in range(3):
            assert np.all(np.diff(index[task == t]) > 0)  # a task's examples keep their order
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        mixed_batches(sizes, 0)


def _model(capacity_factor=None):
    data = make_family(3, 90, seed=1)
    cfg = ModelConfig(d_model=8, n_experts=6, d_hidden=8, k=2, gate="softmax_topk", capacity_factor=capacity_factor)
    model = MultiTaskMoE(cfg, TaskRegistry([d.spec for d in data]), rng=np.random.default_rng(0))
    for layer in model.layers:  # a router with favourites, so balance figures are not trivial
        layer.params["gate.w_gate"][...] = np.random.default_rng(1).standard_normal(layer.params["gate.w_gate"].shape)
    return model, data


def test_noise_free_profile_equals_routing_each_task_alone():
    """Oracle: without noise and capacity, the routing of an example does not depend on its batch."""
    model, data = _model()
    profile = collect_profile(model, data, split="val", noise_seed=None, batch_size=7)
    s = profile.summary()["layers"]["block0"]
    counts = np.zeros(6, dtype=np.int64)
    for d in data:
        routing = model.forward([Chunk(d.name, d.x_val)], train=False).routings[0]
        counts += routing.counts
    assert s["counts"] == counts.tolist() and s["examples"] == sum(d.x_val.shape[0] for d in data)
    ctx = profile.summary()["context"]
    assert ctx == {"split": "val", "noise": False, "noise_seed": None, "tasks": 3, "examples": s["examples"],
                   "batch_size": 7, "batching": "mixed", "gates": ["softmax_topk"], "k": 2,
                   "capacity_factor": None, "routing": "topk"}
    b = balance_summary(profile)
    assert (b["split"], b["noise"], b["examples"]) == ("val", False, s["examples"])
    # a gate without noise routes the same with a noise seed, and the context says no noise
    again = collect_profile(model, data, split="val", noise_seed=0, batch_size=7).summary()
    assert again["context"]["noise"] is False and again["context"]["noise_seed"] is None
    assert again["layers"]["block0"]["counts"] == s["counts"]


def test_drops_in_the_profile_equal_the_models_own_at_its_capacity_factor():
    model, data = _model(capacity_factor=1.25)
    profile = collect_profile(model, data, split="train", noise_seed=None, batch_size=32)
    s = profile.summary()["layers"]["block0"]
    at_125 = next(d for d in s["drops_by_capacity"] if d["capacity_factor"] == 1.25)
    assert s["dropped"] > 0 and at_125["dropped"] == s["dropped"]


def test_shard_placement_is_the_launchers():
    from moe.sharding.remote import contiguous_placement

    assert shard_placement(ShardConfig(), 10) == (None, None)
    placement, note = shard_placement(ShardConfig(local=4), 10)
    assert note is None and placement["assignment"] == contiguous_placement(10, 4).tolist()
    assert placement["source"] == "contiguous expert ids over 4 shards"
    placement, note = shard_placement(ShardConfig(local=20), 10)
    assert placement is None and note.startswith("no load-per-shard view: need 1 <= shards <= n_experts=10")

"""Mixed-batch inference: top-k equals per-task evaluation (dropless, no noise), balanced routing
keeps every batch within its seats, drop rates against a direct count."""

import math

import numpy as np
import pytest

from moe.config import ModelConfig
from moe.inference import drop_rates, predict_mixed
from moe.model import MultiTaskMoE
from moe.tasks.builtin import builtin_tasks
from moe.tasks.spec import TaskRegistry
from moe.train import evaluate_tasks

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def setup():
    data = builtin_tasks(seed=0, n_family=3, family_size=60, n_digit_sets=4)
    cfg = ModelConfig(d_model=16, n_experts=8, d_hidden=16, k=2, gate="softmax_topk")
    rng = np.random.default_rng(0)
    model = MultiTaskMoE(cfg, TaskRegistry([d.spec for d in data]), rng=rng)
    for layer in model.layers:  # a skewed router, so balancing has work to do
        layer.gate.params["w_gate"][...] = rng.normal(size=layer.gate.params["w_gate"].shape).astype(np.float32)
        layer.gate.params["w_gate"][:, 0] += 2.0
    return model, data


def test_topk_mixed_batches_equal_per_task_evaluation(setup):
    model, data = setup
    res = predict_mixed(model, data, "test", batch_size=64, routing="topk", rng=np.random.default_rng(1))
    ref = evaluate_tasks(model, data, "test")
    for d in data:
        for m, v in ref[d.name].items():
            assert res.metrics[d.name][m] == pytest.approx(v, abs=1e-6), (d.name, m)
    assert res.worst_max_mean > 1.3


def test_balanced_batches_stay_within_their_seats(setup):
    model, data = setup
    res = predict_mixed(model, data, "test", batch_size=64, routing="balanced", rng=np.random.default_rng(1))
    for blocks in res.expert_index:
        for idx in blocks:
            cap = math.ceil(1.25 * idx.shape[0] * 2 / 8)
            assert np.bincount(idx.ravel(), minlength=8).max() <= cap
    rates = drop_rates(res, 8, (1.0, 100.0))
    assert rates[100.0] == 0.0
    topk = predict_mixed(model, data, "test", batch_size=64, routing="topk", rng=np.random.default_rng(1))
    direct = sum(int(np.maximum(np.bincount(i.ravel(), minlength=8) - math.ceil(i.shape[0] * 2 / 8), 0).sum())
                 for blocks in topk.expert_index for i in blocks) / sum(i.size for b in topk.expert_index for i in b)
    assert drop_rates(topk, 8, (1.0,))[1.0] == pytest.approx(direct) and direct > 0

"""MultiTaskMoE backward against finite differences (float64), for each routing mode."""

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad

from moe.config import ModelConfig
from moe.model import Chunk, MultiTaskMoE
from moe.tasks.spec import TaskRegistry, TaskSpec

pytestmark = pytest.mark.unit


def _model(route_by, gate="noisy_topk,softmax_topk", layers=2, k=2):
    reg = TaskRegistry([TaskSpec("a", "multiclass", 3, 4), TaskSpec("b", "regression", 5, 1)])
    cfg = ModelConfig(d_model=4, n_experts=5, d_hidden=6, k=k, n_layers=layers, gate=gate,
                      route_by=route_by, d_task_emb=3, w_importance=0.3, w_load=0.2, w_z=0.01)
    rng = np.random.default_rng(0)
    model = MultiTaskMoE(cfg, reg, rng=rng, dtype=np.float64)
    for n, p in model.params.items():
        if ".gate." in n:
            p[...] = rng.normal(size=p.shape) * 0.5
    return model, rng


@pytest.mark.parametrize("route_by", ["example+task", "example", "task"])
def test_model_gradients(route_by):
    model, rng = _model(route_by)
    chunks = [Chunk("a", rng.normal(size=(4, 3))), Chunk("b", rng.normal(size=(3, 5)))]
    ups = [rng.normal(size=(4, 4)), rng.normal(size=(3, 1))]

    def loss():
        out = model.forward(chunks, rng=np.random.default_rng(2))
        return float(sum(np.sum(o * u) for o, u in zip(out.outputs, ups, strict=True)) + out.aux_loss)

    loss()
    model.backward([u.copy() for u in ups])
    grads = {n: g.copy() for n, g in model.grads.items()}
    for n, p in model.params.items():
        assert_close(grads[n], numerical_grad(loss, p), name=n)
    if route_by == "example":
        assert not grads["task.emb.e"].any()
    else:
        assert grads["task.emb.e"].any()


def test_absent_task_gets_zero_grads_and_unknown_task_errors():
    model, rng = _model("example+task", layers=1, gate="noisy_topk")
    out = model.forward([Chunk("a", rng.normal(size=(4, 3)))], rng=rng)
    model.backward([np.ones_like(out.outputs[0])])
    out = model.forward([Chunk("b", rng.normal(size=(2, 5)))], rng=rng)
    model.backward([np.ones_like(out.outputs[0])])
    a_enc = model.space_row["task:a"]
    assert not model.grads["enc.3.w"][a_enc].any() and not model.grads["task.emb.e"][0].any()
    assert model.grads["enc.5.w"][model.space_row["task:b"]].any() and model.grads["task.emb.e"][1].any()
    with pytest.raises(ValueError, match="unknown task 'zz'"):
        model.forward([Chunk("zz", rng.normal(size=(2, 5)))])
    with pytest.raises(ValueError, match="task 'a' has 3 input features, got \\[2, 5\\]"):
        model.forward([Chunk("a", rng.normal(size=(2, 5)))])


def test_add_task_with_grown_experts_keeps_old_function():
    model, rng = _model("example+task", layers=1, gate="softmax_topk")
    x = rng.normal(size=(6, 3))
    before = model.forward([Chunk("a", x)], train=False).outputs[0]
    model.add_task(TaskSpec("c", "binary", 3, 1), rng=rng, init_from="a", grow_experts=2)
    assert model.config.n_experts == 7 and model.layers[0].n_experts == 7
    assert model.params["block0.moe.experts.w1"].shape[0] == 7
    enc = model.params["enc.3.w"]
    np.testing.assert_array_equal(enc[model.space_row["task:c"]], enc[model.space_row["task:a"]])
    # new gate columns start like a fresh gate; old outputs only change if new experts win a slot
    out = model.forward([Chunk("a", x), Chunk("c", x)], train=False)
    assert out.outputs[1].shape == (6, 1)
    routed_new = (out.routings[0].expert_index >= 5).any()
    if not routed_new:
        np.testing.assert_allclose(out.outputs[0], before, rtol=1e-12)

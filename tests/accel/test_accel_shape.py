"""MoEShape validation and parameter counts against arrays built by hand."""

import numpy as np
import pytest

from moe.accel.shape import MoEShape

pytestmark = pytest.mark.accel


def tiny(**kw) -> MoEShape:
    base = dict(d_model=3, d_hidden=5, n_experts=4, k=2, n_layers=2, tokens=6, capacity_factor=None,
                d_in=2, n_out=3, n_tasks=2, d_task_emb=1, gate="noisy_topk")
    base.update(kw)
    return MoEShape(**base)


def build_model(s: MoEShape) -> dict[str, list[np.ndarray]]:
    """Every tensor the model holds, as real (empty) arrays."""
    d, h, E = s.d_model, s.d_hidden, s.n_experts
    gate_mats = 2 if s.gate == "noisy_topk" else 1
    model = {"dense": [], "expert": []}
    for _ in range(s.n_tasks):
        model["dense"] += [np.empty((int(s.d_in), d)), np.empty(d)]
        model["dense"] += [np.empty((d, int(s.n_out))), np.empty(int(s.n_out))]
    if s.d_task_emb:
        model["dense"].append(np.empty((s.n_tasks, s.d_task_emb)))
    for _ in range(s.n_layers):
        model["dense"] += [np.empty(d), np.empty(d)]
        model["dense"] += [np.empty((d + s.d_task_emb, E)) for _ in range(gate_mats)]
        for _ in range(E):
            model["expert"] += [np.empty((d, h)), np.empty(h), np.empty((h, d)), np.empty(d)]
    return model


@pytest.mark.parametrize("gate", ["noisy_topk", "softmax_topk"])
def test_param_counts_match_built_arrays(gate):
    s = tiny(gate=gate)
    model = build_model(s)
    assert s.dense_params == sum(a.size for a in model["dense"])
    assert s.expert_params == sum(a.size for a in model["expert"])
    assert s.total_params == s.dense_params + s.expert_params


def test_active_params_are_what_one_token_touches():
    s = tiny()
    d, h = s.d_model, s.d_hidden
    adapter = 2 * 3 + 3  # W [2, 3] + b [3]
    head = 3 * 3 + 3
    layer = 2 * d + 2 * (d + 1) * 4 + 2 * (2 * d * h + h + d)  # LN + W_g, W_noise + 2 experts
    assert s.active_params == adapter + head + 2 * layer


def test_capacity_is_gshard_ceil():
    s = tiny(capacity_factor=1.25, n_experts=8, k=2)
    assert s.capacity(100) == 32  # ceil(1.25 * 100 * 2 / 8) = ceil(31.25)
    assert tiny().capacity(100) == 50  # dropless: as factor 1.0
    assert tiny().effective_capacity_factor == 1.0 and tiny().dropless


@pytest.mark.parametrize(
    ("kw", "err", "match"),
    [
        ({"d_model": 0}, ValueError, "d_model must be >= 1, got 0"),
        ({"n_experts": 2.0}, TypeError, "n_experts must be an int"),
        ({"k": 5}, ValueError, "k must be <= n_experts"),
        ({"gate": "hash"}, ValueError, "gate must be one of"),
        ({"gate": "top1"}, ValueError, "needs k == 1"),
        ({"capacity_factor": -1.0}, ValueError, "capacity_factor"),
        ({"optimizer": "lion"}, ValueError, "optimizer"),
        ({"dtype": "float16"}, ValueError, "dtype"),
        ({"bytes_per_param": 8}, ValueError, "bytes_per_param"),
        ({"d_in": float("nan")}, ValueError, "d_in"),
        ({"d_task_emb": -1}, ValueError, "d_task_emb"),
    ],
)
def test_validation_names_what_was_expected(kw, err, match):
    with pytest.raises(err, match=match):
        tiny(**kw)


def test_top1_with_k1_is_fine():
    assert tiny(gate="top1", k=1).gate_matrices == 1

"""Checkpoints hold Adam state only for experts that were updated (absent, not zero-filled),
and a run resumed from such a checkpoint equals the uninterrupted run bit for bit."""

import numpy as np
import pytest
from safetensors.numpy import load_file

from moe import checkpoint as ckpt
from moe.config import Config, ModelConfig, TrainConfig
from moe.tasks.family import make_family
from moe.train import Trainer

pytestmark = [pytest.mark.unit, pytest.mark.timeout(240)]

E = 16


def _config() -> Config:
    # the gate sees only the task embedding: each task's batch goes to the same few experts,
    # so most experts are never updated (at lr 3e-3 the two tasks' choices stay put for 12 steps)
    return Config(
        model=ModelConfig(d_model=8, n_experts=E, d_hidden=8, k=2, gate="softmax_topk", route_by="task"),
        train=TrainConfig(steps=12, batch_size=32, checkpoint_every=6, eval_every=1000, warmup=2, lr=3e-3,
                          progress=False, keep_last=10, balanced_share=0.0),  # balanced seats use every expert
    )


def _tensors(where):
    _, files, _ = ckpt.load_checkpoint(where, load_experts=True)
    return {f"{f}/{k}": v for f, t in files.items() for k, v in t.items()}


def test_untouched_experts_have_no_moments_and_resume_is_bit_exact(tmp_path):
    data = make_family(2, 120, seed=0)
    straight = Trainer(_config(), data, tmp_path / "straight", echo=lambda s: None)
    init = {n: p.copy() for n, p in straight.model.layers[0].experts.params.items()}
    end = straight.train().checkpoint

    first = Trainer(_config(), data, tmp_path / "resumed", echo=lambda s: None)
    first.train(stop_at=6)
    mid = ckpt.list_checkpoints(tmp_path / "resumed" / "checkpoints")[-1]
    second = Trainer(_config(), data, tmp_path / "resumed", echo=lambda s: None)
    got = second.train(resume=True).checkpoint

    for where in (mid, end):
        adam = load_file(str(where / "experts-l0.adam.safetensors"))
        weights = load_file(str(where / "experts-l0.safetensors"))
        assert weights["ids"].tolist() == list(range(E))  # every expert's weights
        ids = adam["ids"]
        assert 0 < ids.size < E, "the test needs experts that were never updated"
        assert adam["adam.m.w1"].shape[0] == ids.size and adam["adam.t"].shape == ids.shape
        assert (adam["adam.t"] >= 1).all()
        for k in ("adam.m.w1", "adam.v.w1", "adam.m.b2"):  # stored rows are real state, not zeros
            assert all(row.any() for row in adam[k]), k
        untouched = np.setdiff1d(np.arange(E), ids)
        final = load_file(str(where / "experts-l0.safetensors"))
        for n, p in init.items():  # an expert without state was indeed never updated
            np.testing.assert_array_equal(final[n][untouched], p[untouched])

    a, b = _tensors(end), _tensors(got)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    sa, sb = (t.model.layers[0].experts.optimizer for t in (straight, second))
    assert sa.state_rows().tolist() == sb.state_rows().tolist()
    for k, v in sa.state_dict().items():
        np.testing.assert_array_equal(sb.state_dict()[k], v)

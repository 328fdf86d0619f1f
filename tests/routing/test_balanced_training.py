"""Training through balanced seats (train.balanced_share): every expert takes the same rows, the
gradient is the true gradient of the routed model, and the last share of the steps take them."""

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad

from moe.config import Config, ModelConfig, TrainConfig
from moe.layer import MoELayer
from moe.routing.balanced import balanced_capacity, balanced_topk
from moe.routing.gates import tiled_matmul

pytestmark = pytest.mark.unit


def _layer(gate: str, dtype=np.float64) -> MoELayer:
    return MoELayer(6, 8, 5, k=2, gate=gate, rng=np.random.default_rng(0), dtype=dtype, d_gate_extra=3)


@pytest.mark.parametrize("gate", ["softmax_topk", "noisy_topk"])
def test_a_balanced_step_seats_every_row_where_the_assignment_says(gate):
    layer = _layer(gate)
    rng = np.random.default_rng(1)
    x, emb = rng.standard_normal((64, 6)), np.repeat(rng.standard_normal((8, 3)), 8, axis=0)  # 8 tasks x 8 rows
    y, r = layer.forward(x, emb, train=True, rng=np.random.default_rng(2), routing="balanced", balance_factor=1.0)
    assert r.counts.tolist() == [16] * 8 and r.dropped == 0  # B k / E rows on every expert
    clean = tiled_matmul(np.concatenate([x, emb], axis=1), layer.gate.params["w_gate"])
    want = balanced_topk(clean, 2, balanced_capacity(1.0, 64, 2, 8))
    assert np.array_equal(np.sort(r.expert_index, axis=1), np.sort(want, axis=1))
    top = np.argsort(-clean, axis=1)[:, :2]
    assert not np.array_equal(np.sort(top, axis=1), np.sort(want, axis=1))  # the seats are not the top-k
    layer.backward(np.ones_like(y))  # a training forward keeps what backward needs


def test_training_through_seats_has_the_routed_models_gradient():
    """float64 central differences of sum(y * up) + aux with the seats held fixed (they are
    piecewise constant in the weights; eps is far too small to move one)."""
    layer = _layer("softmax_topk")
    rng = np.random.default_rng(3)
    x, emb = rng.standard_normal((24, 6)), rng.standard_normal((24, 3))
    up = rng.standard_normal((24, 6))

    def loss() -> float:
        y, r = layer.forward(x, emb, train=True, routing="balanced", balance_factor=1.0)
        return float(np.sum(y * up) + r.aux_loss)

    loss()
    dx = layer.backward(up.copy())
    grads = {n: g.copy() for n, g in layer.grads.items()}
    for n, p in layer.params.items():
        assert_close(grads[n], numerical_grad(loss, p), rtol=1e-5, atol=1e-8, name=n)
    assert_close(dx, numerical_grad(loss, x), rtol=1e-5, atol=1e-8, name="x")


@pytest.mark.parametrize("share", [0.0, 0.25, 0.5, 1.0])
def test_the_trainer_routes_the_last_share_of_its_steps_by_balanced_seats(share, monkeypatch):
    from moe.tasks.spec import TaskSpec
    from moe.tasks.splits import make_task_data, split_indices
    from moe.train import Trainer

    rng = np.random.default_rng(4)
    data = []
    for i in range(4):
        x = rng.standard_normal((40, 3))
        data.append(make_task_data(TaskSpec(f"t{i}", "regression", 3, 1), x, x[:, :1], split_indices(40, rng)))
    config = Config(model=ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2, d_task_emb=3),
                    train=TrainConfig(steps=8, batch_size=16, progress=False, balanced_share=share))
    trainer = Trainer(config, data, "unused", save_checkpoints=False)
    seen, outs = [], []
    forward = trainer.model.forward_batch

    def spy(*a, **kw):
        seen.append(kw["routing"])
        outs.append(forward(*a, **kw))
        return outs[-1]

    monkeypatch.setattr(trainer.model, "forward_batch", spy)
    for i in range(8):
        assert trainer.routing_at(i) == ("balanced" if i >= 8 - round(8 * share) else "topk")
        trainer.train_step()
        assert trainer.last_routings is outs[-1].routings  # what a tally of training batches reads
    balanced = [i for i, s in enumerate(seen) if s == "balanced"]
    assert balanced == list(range(8 - round(8 * share), 8))


def test_balanced_training_refuses_experts_grown_for_one_task():
    from moe.tasks.spec import TaskSpec
    from moe.tasks.splits import make_task_data, split_indices
    from moe.train import Trainer

    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 3))
    data = [make_task_data(TaskSpec(f"t{i}", "regression", 3, 1), x, x[:, :1], split_indices(30, rng)) for i in range(2)]
    config = Config(model=ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2, d_task_emb=3),
                    train=TrainConfig(steps=2, batch_size=8, progress=False))
    with pytest.raises(ValueError, match=r"experts grown for one task \(\['t1'\]\); set train.balanced_share=0"):
        Trainer(config, data, "unused", save_checkpoints=False, expert_owners={"t1": [3]})
    no_seats = Config(model=config.model, train=TrainConfig(steps=2, batch_size=8, progress=False, balanced_share=0.0))
    Trainer(no_seats, data, "unused", save_checkpoints=False, expert_owners={"t1": [3]}).train_step()


def test_a_checkpoint_written_before_balanced_training_resumes_with_top_k():
    """A saved config without train.balanced_share was trained with top-k throughout: reading
    it must not switch the rest of its run to today's default."""
    from moe.config import saved_config

    old = Config().to_dict()
    del old["train"]["balanced_share"]
    assert saved_config(old).train.balanced_share == 0.0
    assert saved_config(Config().to_dict()).train.balanced_share == 0.5  # written now: as saved
    new = Config(train=TrainConfig(balanced_share=0.25)).to_dict()
    assert saved_config(new).train.balanced_share == 0.25
    with pytest.raises(ValueError, match="unknown key"):
        saved_config({"train": {"balanced_sharez": 1.0}})

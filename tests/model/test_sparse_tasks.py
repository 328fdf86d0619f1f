"""Many tasks in one model: shared domain encoders, and a step that leaves absent tasks alone."""

import numpy as np
import pytest
from gradcheck import assert_close, numerical_grad

from moe.config import Config, ModelConfig, TrainConfig
from moe.model import Chunk, MultiTaskMoE
from moe.tasks.spec import TaskRegistry, TaskSpec
from moe.tasks.splits import make_task_data, split_indices
from moe.train import Trainer

pytestmark = pytest.mark.unit


def _specs(n_shared: int, n_own: int) -> list[TaskSpec]:
    kinds = [("binary", 1), ("multiclass", 3), ("regression", 1)]
    specs = [TaskSpec(f"s{i}", kinds[i % 3][0], 4, kinds[i % 3][1], domain="pix") for i in range(n_shared)]
    specs += [TaskSpec(f"own{i}", "regression", 2 + i % 2, 1) for i in range(n_own)]
    return specs


def test_tasks_of_a_domain_share_one_encoder_and_own_only_embedding_and_head():
    cfg = ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2, d_task_emb=3)
    model = MultiTaskMoE(cfg, TaskRegistry(_specs(6, 3)), rng=np.random.default_rng(0))
    assert model.params["enc.4.w"].shape == (1, 4, 8)  # one encoder for the six "pix" tasks
    assert model.params["enc.2.w"].shape == (2, 2, 8) and model.params["enc.3.w"].shape == (1, 3, 8)
    own = model.task_views("s0")
    assert sorted(own) == ["head.o1.b[0]", "head.o1.w[0]", "task.emb.e[0]"]
    assert sum(p.size for p, _ in own.values()) == 8 + 1 + 3
    assert any(k.startswith("enc.2.") for k in model.task_views("own0"))
    with pytest.raises(ValueError, match="task 'bad' has 5 inputs, but domain 'pix' has 4"):
        TaskRegistry([*_specs(1, 0), TaskSpec("bad", "binary", 5, 1, domain="pix")])


def test_model_gradients_with_many_tasks_and_mlp_heads():
    """20 tasks in a batch takes the gathered path of the tables; float64 finite differences."""
    specs = _specs(14, 6)
    cfg = ModelConfig(d_model=4, n_experts=3, d_hidden=5, k=2, d_task_emb=2, gate="softmax_topk", w_z=0.01)
    rng = np.random.default_rng(1)
    hidden = {s.name: 3 for s in specs[::4]}
    model = MultiTaskMoE(cfg, TaskRegistry(specs), rng=rng, dtype=np.float64, head_hidden=hidden)
    chunks = [Chunk(s.name, rng.normal(size=(1 + i % 2, s.n_inputs))) for i, s in enumerate(specs)]
    ups = [rng.normal(size=(ch.x.shape[0], s.n_outputs)) for ch, s in zip(chunks, specs, strict=True)]

    def loss():
        out = model.forward(chunks, train=False, grad=True)  # no gate noise, but a backward
        return float(sum(np.sum(o * u) for o, u in zip(out.outputs, ups, strict=True)) + out.aux_loss)

    loss()
    model.backward([u.copy() for u in ups])
    grads = {n: g.copy() for n, g in model.grads.items()}
    for n, p in model.params.items():
        if ".experts." in n:
            continue  # covered by the layer's own tests; keeps this one fast
        assert_close(grads[n], numerical_grad(loss, p), name=n)


def _task(spec: TaskSpec, rng: np.random.Generator, n: int = 40):
    x = rng.normal(size=(n, spec.n_inputs))
    if spec.kind == "multiclass":
        y, classes = rng.integers(0, spec.n_outputs, size=n), np.arange(spec.n_outputs)
    elif spec.kind == "binary":
        y, classes = (rng.random(n) > 0.5).astype(np.float32), np.arange(2)
    else:
        y, classes = rng.normal(size=(n, 1)), None
    return make_task_data(spec, x, y, split_indices(n, rng), classes=classes)


def test_a_step_leaves_every_absent_task_bit_identical():
    """Parameters, Adam moments and step counts of tasks with no example in the batch do not
    change; those of the present tasks (and their shared encoder) do."""
    rng = np.random.default_rng(3)
    data = [_task(s, rng) for s in _specs(40, 20)]
    config = Config(model=ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2, d_task_emb=3),
                    train=TrainConfig(steps=10, batch_size=16, warmup=0, progress=False, weight_decay=0.01))
    trainer = Trainer(config, data, "unused", save_checkpoints=False)
    for _ in range(3):  # moments are non-zero for some rows before the step we check
        trainer.train_step()

    def snapshot():
        state = {n: p.copy() for n, p in trainer.model.params.items()}
        for name, opt in trainer.table_optimizers.items():  # moments by row (zeros where none yet)
            state[f"opt.{name}.t"] = opt.t.copy()
            for p in opt.params:
                state[f"opt.{name}.m.{p}"], state[f"opt.{name}.v.{p}"] = (a.copy() for a in opt.moments(p))
        return state

    before = snapshot()
    draw_state = trainer.sampler.rng.bit_generator.state
    batch = trainer.sampler.next_batch()
    trainer.sampler.rng.bit_generator.state = draw_state  # train_step draws the same batch again
    present = {ch.task for ch in batch}
    absent = [d.name for d in data if d.name not in present]
    assert len(absent) >= 40
    trainer.train_step()
    after = snapshot()
    model = trainer.model
    moved = 0
    for name in (d.name for d in data):
        tid = model.tasks.id(name)
        key, row = model.head_row[tid]
        spec = model.tasks.spec(name)
        rows = {f"head.{key}": row, "task.emb": tid}
        if spec.domain is None:
            rows[f"enc.{spec.n_inputs}"] = model.space_row[spec.input_space]
        same = all(np.array_equal(before[k][r], after[k][r])
                   for prefix, r in rows.items()
                   for k in before if k.startswith((f"{prefix}.", f"opt.{prefix}.")))
        if name in present:
            moved += not same
        else:
            assert same, f"absent task {name!r} changed"
    assert moved == len(present)
    enc = model.space_row["pix"]
    assert not np.array_equal(before["enc.4.w"][enc], after["enc.4.w"][enc])  # shared domain encoder trains

"""Packed batches (moe.batch): the same rows, the same bits, and a sampler that draws what one
call per task would."""

import numpy as np
import pytest

from moe.batch import Batch
from moe.config import ModelConfig
from moe.model import Chunk, MultiTaskMoE
from moe.sampler import TaskSampler
from moe.tasks.spec import TaskRegistry, TaskSpec
from moe.tasks.splits import make_task_data, split_indices

pytestmark = pytest.mark.unit


def _specs() -> list[TaskSpec]:
    """Shared-domain and own-space tasks over three widths; binary and regression share head "o1"."""
    kinds = [("binary", 1), ("multiclass", 3), ("regression", 1), ("multilabel", 2)]
    specs = [TaskSpec(f"s{i}", kinds[i % 4][0], 4, kinds[i % 4][1], domain="pix", loss_weight=1 + i % 3)
             for i in range(14)]
    specs += [TaskSpec(f"own{i}", kinds[i % 4][0], 2 + i % 2, kinds[i % 4][1]) for i in range(8)]
    return specs


def _model(specs, **kw) -> MultiTaskMoE:
    cfg = ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2, d_task_emb=3, **kw)
    hidden = {s.name: 5 for s in specs[::3]}
    return MultiTaskMoE(cfg, TaskRegistry(specs), rng=np.random.default_rng(0), head_hidden=hidden)


@pytest.mark.parametrize("route_by", ["task", "example+task"])
def test_each_row_gets_its_own_tasks_output_whatever_the_batch_order(route_by):
    """A mixed batch in shuffled task order: every chunk's outputs equal that chunk run alone
    (rows do not interact at inference without capacity drops), and the packed call gives the
    chunk call's bits."""
    specs = _specs()
    model = _model(specs, route_by=route_by, gate="softmax_topk")
    rng = np.random.default_rng(1)
    order = rng.permutation(len(specs))
    chunks = [Chunk(specs[i].name, rng.standard_normal((1 + i % 3, specs[i].n_inputs)).astype(np.float32))
              for i in order]
    together = model.forward(chunks, train=False).outputs
    for ch, out in zip(chunks, together, strict=True):
        alone = model.forward([ch], train=False).outputs[0]
        assert out.shape == alone.shape == (ch.x.shape[0], model.tasks.spec(ch.task).n_outputs)
        np.testing.assert_allclose(out, alone, rtol=1e-5, atol=1e-6, err_msg=ch.task)
    batch = model.pack(chunks)
    packed = model.forward_batch(batch, train=False)
    cols = model.tasks.columns()
    for key, rows in packed.layout.target_rows.items():
        want = np.concatenate([o for o, ch in zip(together, chunks, strict=True)
                               if cols.targets[cols.target[model.tasks.id(ch.task)]] == key])
        assert np.array_equal(packed.outputs[key], want) and rows.size == want.shape[0]


def test_packed_backward_gives_the_chunk_backwards_gradients_bit_for_bit():
    specs = _specs()
    model = _model(specs)
    rng = np.random.default_rng(2)
    chunks = [Chunk(s.name, rng.standard_normal((2, s.n_inputs)).astype(np.float32)) for s in reversed(specs)]
    ups = [rng.standard_normal((2, s.n_outputs)).astype(np.float32) for s in reversed(specs)]
    model.forward(chunks, train=True, rng=np.random.default_rng(5))
    model.backward(ups)
    want = {n: g.copy() for n, g in model.grads.items()}
    batch = model.pack(chunks)
    out = model.forward_batch(batch, train=True, rng=np.random.default_rng(5))
    cols = model.tasks.columns()
    d: dict = {}
    for ch, u in zip(chunks, ups, strict=True):
        d.setdefault(cols.targets[cols.target[model.tasks.id(ch.task)]], []).append(u)
    model.backward_batch({k: np.concatenate(v) for k, v in d.items()})
    assert set(d) == set(out.outputs)
    for n, g in model.grads.items():
        assert np.array_equal(g, want[n]), n
    model.forward_batch(batch, train=True, rng=np.random.default_rng(5))
    with pytest.raises(ValueError, match="call backward_batch"):
        model.backward(ups)


def test_a_malformed_packed_batch_is_refused_with_what_was_expected():
    specs = _specs()
    model = _model(specs)
    x4 = np.zeros((3, 4), np.float32)
    ok = Batch(np.array([0, 1]), np.array([0, 1, 3]), {4: x4})
    model.forward_batch(ok, train=False)
    cases = [
        (Batch(np.array([0, 99]), ok.starts, ok.x), r"task ids must be in \[0, 22\), got \[0, 99\]"),
        (Batch(np.array([0, 0]), ok.starts, ok.x), "each task may appear once"),
        (Batch(ok.tasks, np.array([0, 3, 3]), ok.x), "starts must be ints"),
        (Batch(ok.tasks, ok.starts, {4: x4, 2: np.zeros((1, 2), np.float32)}), r"keyed by its tasks' input widths \[4\]"),
        (Batch(ok.tasks, ok.starts, {4: np.zeros((2, 4), np.float32)}), r"width 4: expected \[3, 4\], got \[2, 4\]"),
        (Batch(ok.tasks, ok.starts, {4: x4.astype(np.float64)}), "must be float32, got float64"),
        (Batch(ok.tasks, ok.starts, {4: np.full((3, 4), np.nan, np.float32)}), "NaN or Inf"),
        (Batch(np.array([], np.int64), np.array([0]), {}), "non-empty int array"),
    ]
    for batch, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model.forward_batch(batch, train=False)
    out = model.forward_batch(ok, train=True, rng=np.random.default_rng(0))
    from moe.train import batch_loss

    with pytest.raises(ValueError, match=r"targets must be keyed by .*\('binary', 1\), \('multiclass', 3\)\], got none"):
        batch_loss(model, ok, out)
    with pytest.raises(ValueError, match=r"multiclass tasks with 3 outputs: expected \[2, 3\], got nothing"):
        model.backward_batch({("binary", 1): np.zeros((1, 1), np.float32)})


def _data(specs, rng):
    out = []
    for i, s in enumerate(specs):
        n = 6 + i % 5  # tiny training splits: epochs end inside batches
        x = rng.standard_normal((n, s.n_inputs))
        if s.kind == "multiclass":
            y, classes = rng.integers(0, s.n_outputs, size=n), np.arange(s.n_outputs)
        elif s.kind in ("binary", "multilabel"):
            y, classes = (rng.random((n, s.n_outputs)) > 0.5).astype(np.float32), (np.arange(2) if s.kind == "binary" else None)
        else:
            y, classes = rng.normal(size=(n, 1)), None
        out.append(make_task_data(s, x, y, split_indices(n, rng), classes=classes))
    return out


def _reference_batches(data, batch_size, seed, steps):
    """The documented draw, one task at a time: B task draws by inverse CDF, then each present
    task (ascending) takes its next rows, reshuffling when its epoch ends."""
    rng = np.random.default_rng(seed)
    sizes = np.array([d.x_train.shape[0] for d in data])
    cdf = np.cumsum(sizes / sizes.sum())
    order = [rng.permutation(int(n)) for n in sizes]
    pos = np.zeros(len(data), dtype=np.int64)
    for _ in range(steps):
        draws = np.minimum(np.searchsorted(cdf, rng.random(batch_size), side="right"), len(data) - 1)
        tasks, counts = np.unique(draws, return_counts=True)
        batch = []
        for t, n in zip(tasks.tolist(), counts.tolist(), strict=True):
            taken = []
            while n > 0:
                m = min(n, sizes[t] - pos[t])
                taken.extend(order[t][pos[t] : pos[t] + m].tolist())
                pos[t] += m
                n -= m
                if pos[t] == sizes[t]:
                    order[t] = rng.permutation(int(sizes[t]))
                    pos[t] = 0
            batch.append((t, taken))
        yield batch


def test_the_packed_sampler_draws_the_reference_batches_and_their_rows():
    specs = _specs()
    data = _data(specs, np.random.default_rng(4))
    model = _model(specs)
    sampler = TaskSampler(data, 32, sampling="proportional", temperature=1.0, rng=np.random.default_rng(9))
    twin = TaskSampler(data, 32, sampling="proportional", temperature=1.0, rng=np.random.default_rng(9))
    for want in _reference_batches(data, 32, 9, steps=30):
        batch = sampler.next_packed()
        chunks = twin.next_batch()
        assert batch.tasks.tolist() == [t for t, _ in want]
        assert np.diff(batch.starts).tolist() == [len(i) for _, i in want]
        for ch, (t, idx) in zip(chunks, want, strict=True):
            assert ch.task == data[t].name
            assert np.array_equal(ch.x, data[t].x_train[idx]) and np.array_equal(ch.y, data[t].y_train[idx])
        same = model.pack(chunks)
        for w in same.x:
            assert np.array_equal(batch.x[w], same.x[w])
        assert set(batch.y) == set(same.y) and all(np.array_equal(batch.y[k], same.y[k]) for k in same.y)
    assert int(sampler.epoch.sum()) > 20  # epochs did end inside batches
    for a, b in zip(sampler.state()[0].values(), twin.state()[0].values(), strict=True):
        assert np.array_equal(a, b)

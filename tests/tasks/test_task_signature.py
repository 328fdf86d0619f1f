"""Task signatures and the embeddings they start: checked against the skill bank's truth, the
exact kernel PCA, and the invariances the similarity promises."""

import dataclasses

import numpy as np
import pytest

import moe.tasks.signature as sig
from moe.config import Config, ModelConfig, TrainConfig, load_config
from moe.model import MultiTaskMoE
from moe.tasks.skills import make_bank, make_skill_tasks
from moe.tasks.spec import TaskRegistry, TaskSpec
from moe.tasks.splits import make_task_data, split_indices
from moe.train import Trainer

N_SKILL_TASKS = 60


@pytest.fixture(scope="module")
def skills():
    return make_skill_tasks(N_SKILL_TASKS, 300, seed=0), make_bank(N_SKILL_TASKS, seed=0)


def _features(n_in, rng):
    return rng.standard_normal((n_in, sig.FEATURES)) / np.sqrt(n_in), rng.standard_normal(sig.FEATURES)


def _gram(emb, names):
    e = np.stack([emb[n] for n in names])
    return e @ e.T


def test_related_skill_tasks_start_closer_than_unrelated_ones(skills):
    """The bank says which tasks share a skill; their embeddings' squared cosine must be larger
    on average (measured at 60 tasks, seed 0: 0.26 against 0.04)."""
    tasks, bank = skills
    emb = sig.signature_embeddings(tasks, 16, np.random.default_rng(0))
    assert sorted(emb) == sorted(t.name for t in tasks)
    g = _gram(emb, [t.name for t in tasks]) / 16  # cosines: every row has norm sqrt(16)
    i, j = np.triu_indices(len(tasks), 1)
    related = np.array([bank.shared_skills(a, b) > 0 for a, b in zip(i, j, strict=True)])
    cos2 = g[i, j] ** 2
    assert related.sum() >= 10
    assert cos2[related].mean() > 3 * cos2[~related].mean(), (cos2[related].mean(), cos2[~related].mean())
    np.testing.assert_allclose(np.diag(g), 1.0, rtol=1e-12)


def test_the_nystroem_map_on_every_task_is_the_exact_kernel_pca(skills, monkeypatch):
    """With every task a landmark the embeddings are the centred kernel PCA's, computed here
    from K directly; the chunked rows of a smaller CHUNK_COLUMNS give the same numbers."""
    tasks = skills[0][:40]
    rng = np.random.default_rng(5)
    w, b = _features(tasks[0].spec.n_inputs, rng)
    c = [sig.signature(t, w, b) for t in tasks]
    k = np.array([[np.linalg.norm(a.T @ bb) ** 2 for bb in c] for a in c])  # [n, n]
    h = np.eye(len(tasks)) - 1.0 / len(tasks)
    lam, u = np.linalg.eigh(h @ k @ h)
    top = u[:, ::-1][:, :8] * np.sqrt(lam[::-1][:8])
    want = top / np.linalg.norm(top, axis=1, keepdims=True) * np.sqrt(8)
    monkeypatch.setattr(sig, "CHUNK_COLUMNS", 7)
    got = sig.domain_embeddings(tasks, 8, np.random.default_rng(5))
    e = np.stack([got[t.name] for t in tasks])
    np.testing.assert_allclose(e @ e.T, want @ want.T, atol=1e-8)  # equal up to each axis' sign


def test_the_similarity_ignores_label_flips_class_order_and_feature_scale(skills):
    tasks, _ = skills
    rng = np.random.default_rng(1)
    w, b = _features(tasks[0].spec.n_inputs, rng)
    binary = next(t for t in tasks if t.spec.kind == "binary")
    flipped = dataclasses.replace(binary, y_train=1.0 - binary.y_train)
    np.testing.assert_allclose(sig.signature(flipped, w, b), -sig.signature(binary, w, b), atol=1e-12)
    multi = next(t for t in tasks if t.spec.kind == "multiclass")
    perm = np.array([2, 0, 1])
    permuted = dataclasses.replace(multi, y_train=perm[multi.y_train].astype(np.int32))
    np.testing.assert_allclose(sig.signature(permuted, w, b)[:, perm], sig.signature(multi, w, b), atol=1e-12)
    s = sig.signature(multi, w, b)
    assert np.linalg.norm(s.T @ s) == pytest.approx(1.0)  # K(t, t) = 1
    scale = rng.uniform(0.1, 10.0, sig.FEATURES)  # relu(a z) = a relu(z): the same features, rescaled
    np.testing.assert_allclose(sig.signature(multi, w * scale, b * scale), s, atol=1e-12)


def _linear_task(name, rng, domain="lin", width=5):
    x = rng.standard_normal((120, width))
    spec = TaskSpec(name, "regression", width, 1, domain=domain)
    y = (x @ rng.standard_normal(width) + 0.3).astype(np.float32)[:, None]  # [n, 1]
    return make_task_data(spec, x, y, split_indices(120, rng),
                          x_stats=(np.zeros(width, np.float32), np.ones(width, np.float32)))


def test_targets_without_a_nonlinear_part_keep_their_random_start(skills):
    """A linear task's signature is zero (its head reads all it needs), so it is left out; the
    rest of its domain still gets embeddings."""
    rng = np.random.default_rng(2)
    lin = _linear_task("lin", rng, domain="skills", width=8)
    w, b = _features(5, rng)
    assert not sig.signature(_linear_task("l2", rng), w, b).any()
    emb = sig.signature_embeddings([*skills[0][:10], lin], 16, np.random.default_rng(0))
    assert "lin" not in emb and len(emb) == 10
    assert sig.signature_embeddings([_linear_task("a", rng), _linear_task("b", rng)], 16, rng) == {}


def test_the_nonlinear_share_is_what_a_linear_fit_leaves_adjusted_for_its_parameters():
    """rho against its definition on a task with a known split of variance: y = x a + s(x) with
    s orthogonal to [x, 1] in-sample, so rho = ||s||^2 / ||y - mean||^2 * (n - 1) / (n - d - 1)."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 6))
    design = np.c_[x, np.ones(200)]
    s = np.abs(x[:, 0]) * x[:, 1]
    s -= design @ np.linalg.lstsq(design, s, rcond=None)[0]  # exactly no linear part in-sample
    y = x @ rng.standard_normal(6) + 2.0 * s
    split = (np.arange(200), np.arange(200, 210), np.arange(210, 220))
    xs, ys = np.concatenate([x, rng.standard_normal((20, 6))]), np.concatenate([y, rng.standard_normal(20)])
    task = make_task_data(TaskSpec("r", "regression", 6, 1, domain="d"), xs, ys[:, None].astype(np.float32), split,
                          x_stats=(np.zeros(6, np.float32), np.ones(6, np.float32)))
    ty, tx = task.y_train.astype(np.float64).ravel(), np.c_[task.x_train.astype(np.float64), np.ones(200)]
    r = ty - tx @ np.linalg.lstsq(tx, ty, rcond=None)[0]
    want = (r @ r) / ((ty - ty.mean()) @ (ty - ty.mean())) * 199 / 193
    assert 0.05 < want < 0.95
    assert sig.nonlinear_share(task) == pytest.approx(want, rel=1e-9)
    assert sig.nonlinear_share(_linear_task("l", rng)) == 0.0


def test_tasks_of_their_own_space_or_alone_in_a_domain_are_left_out(skills):
    one = dataclasses.replace(skills[0][0], spec=dataclasses.replace(skills[0][0].spec, domain="alone"))
    own = skills[0][1].with_own_space()
    assert sig.signature_embeddings([one, own], 16, np.random.default_rng(0)) == {}


def _config(init):
    return Config(model=ModelConfig(d_model=16, n_experts=8, d_hidden=16, task_emb_init=init),
                  train=TrainConfig(steps=1, progress=False))


def test_the_trainer_starts_domain_tasks_from_signatures_and_the_rest_at_random(skills, tmp_path):
    data = [*skills[0][:12], _linear_task("own", np.random.default_rng(3), domain=None)]
    rand = Trainer(_config("random"), data, tmp_path / "r", save_checkpoints=False).model
    ref = MultiTaskMoE(_config("random").model, TaskRegistry([d.spec for d in data]), rng=np.random.default_rng([0, 0]))
    np.testing.assert_array_equal(rand.task_emb.params["e"], ref.task_emb.params["e"])
    a = Trainer(_config("signature"), data, tmp_path / "a", save_checkpoints=False).model
    b = Trainer(_config("signature"), data, tmp_path / "b", save_checkpoints=False).model
    ea, eb, er = a.task_emb.params["e"], b.task_emb.params["e"], rand.task_emb.params["e"]
    np.testing.assert_array_equal(ea, eb)  # same seed, same bits
    want = sig.signature_embeddings(data, 16, np.random.default_rng([0, 3]))
    for t in data[:12]:
        rho = sig.nonlinear_share(t)
        assert 0.85 < rho <= 1.0, (t.name, rho)  # a skill task: nearly all of it is nonlinear
        mixed = np.sqrt(1 - rho) * er[rand.tasks.id(t.name)] + np.sqrt(rho) * want[t.name]
        np.testing.assert_allclose(ea[a.tasks.id(t.name)], mixed, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ea[a.tasks.id("own")], er[rand.tasks.id("own")])  # its own space
    for name in a.params:  # nothing else moves
        if name != "task.emb.e":
            np.testing.assert_array_equal(a.params[name], rand.params[name])
    # a trainer whose weights will come from a checkpoint does not draw the start (a resume)
    restoring = Trainer(_config("signature"), data, tmp_path / "c", save_checkpoints=False, restoring=True).model
    np.testing.assert_array_equal(restoring.task_emb.params["e"], er)


def test_an_unknown_start_is_refused_in_one_line():
    with pytest.raises(ValueError, match="model.task_emb_init must be one of"):
        load_config(None, ["model.task_emb_init=nearest"])


def test_a_large_task_is_read_through_max_rows_evenly_spaced_rows(skills, monkeypatch):
    """A task with more train rows than MAX_ROWS gives the signature and share of the task cut
    to those rows, which span the whole split (first and last row included)."""
    task = skills[0][4]
    monkeypatch.setattr(sig, "MAX_ROWS", 50)
    rows = sig._rows(task)
    assert len(rows) == 50 and rows[0] == 0 and rows[-1] == task.x_train.shape[0] - 1
    cut = dataclasses.replace(task, x_train=task.x_train[rows], y_train=task.y_train[rows])
    w, b = _features(task.spec.n_inputs, np.random.default_rng(6))
    np.testing.assert_array_equal(sig.signature(task, w, b), sig.signature(cut, w, b))
    assert sig.nonlinear_share(task) == sig.nonlinear_share(cut)


def test_a_task_of_many_outputs_keeps_its_top_directions_exactly_when_they_span_it(skills, monkeypatch):
    """K reads a signature only through c c^T: with 20 labels that repeat 5 columns (rank 5), the
    16 kept directions give the same K against another task as all 20 columns."""
    base = next(t for t in skills[0] if t.spec.kind == "multiclass")
    other = next(t for t in skills[0] if t.spec.kind == "binary")
    onehot = np.eye(3, dtype=np.float32)[base.y_train]  # [n, 3]
    labels = np.concatenate([onehot, (onehot[:, :2].sum(1, keepdims=True) > 0).astype(np.float32),
                             (onehot[:, 1:].sum(1, keepdims=True) > 0).astype(np.float32)], axis=1)  # [n, 5]
    wide = dataclasses.replace(
        base, spec=dataclasses.replace(base.spec, kind="multilabel", n_outputs=20),
        y_train=np.tile(labels, 4), y_val=np.zeros((base.y_val.shape[0], 20), np.float32),
        y_test=np.zeros((base.y_test.shape[0], 20), np.float32), classes=None)
    w, b = _features(base.spec.n_inputs, np.random.default_rng(7))
    kept, o = sig.signature(wide, w, b), sig.signature(other, w, b)
    assert kept.shape == (sig.FEATURES, sig.MAX_OUTPUTS)
    monkeypatch.setattr(sig, "MAX_OUTPUTS", 100)
    full = sig.signature(wide, w, b)
    assert full.shape == (sig.FEATURES, 20)
    k = lambda a, c: np.linalg.norm(a.T @ c) ** 2  # noqa: E731
    assert k(kept, o) == pytest.approx(k(full, o), rel=1e-9)
    assert k(kept, kept) == pytest.approx(1.0) and k(full, full) == pytest.approx(1.0)

"""The benchmark's quality bars, checked at a smaller scale than `moe train`'s default.

Every bar is asserted on the WORST of three training seeds: a bar that one lucky seed clears
proves nothing. Everything is seeded, so these are deterministic; the margins are what the
bars demand. The add-task 10-shot bar and the growth bar miss on the worst seed today (xfails
with their figures: the first strict, the second not, its worst seed has moved with the machine).
"""

import numpy as np
import pytest

from moe import compare
from moe.api import load, save_model
from moe.baseline import train_baseline
from moe.config import load_config
from moe.datasets import load_added, load_source, source_of
from moe.profile_model import balance_summary, collect_profile
from moe.train import Trainer
from moe.transfer import add_task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

SEEDS = (0, 1, 2)
SMALL = ["steps=500", "n_family=8", "progress=false"]


def _train(tmp_path, seed, *extra):
    config = load_config(None, [*SMALL, f"train.seed={seed}", *extra])
    source = source_of(config.data)
    data = load_source(source)
    trainer = Trainer(config, data, tmp_path, data_source=source, save_checkpoints=False)
    return config, data, trainer, trainer.train()


def _kept(old, new):
    """A per-task table gains the new task's row at the end; everything else is unchanged."""
    return old.shape[1:] == new.shape[1:] and np.array_equal(old, new[: old.shape[0]])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """seed -> (config, data, trainer, result), one balanced run per seed."""
    return {s: _train(tmp_path_factory.mktemp(f"quality{s}"), s) for s in SEEDS}


def test_the_seeds_give_different_models(trained):
    """Otherwise "worst of three seeds" would be one seed three times."""
    firsts = {s: next(iter(t[2].model.params.values())) for s, t in trained.items()}
    assert not np.array_equal(firsts[0], firsts[1]) and not np.array_equal(firsts[1], firsts[2])


def test_one_moe_model_beats_per_task_dense_baselines(trained):
    margins = {}
    for seed, (config, data, _, result) in trained.items():
        moe = [result.test[d.name][d.spec.metric] for d in data]
        base = [train_baseline(config, d, result.seen[d.name])[d.spec.metric] for d in data]
        margins[seed] = float(np.mean(moe) - np.mean(base))
        assert config.model.k / config.model.n_experts <= 0.25
    assert min(margins.values()) >= 0.0, margins


def test_the_experts_carry_the_skills_the_dense_model_of_their_active_size_cannot(trained):
    """The many-task benchmark's bars (issue 9): on every seed the MoE beats a dense model with
    its active parameters (k * d_hidden units) trained on the same tasks, batches and steps, and
    leaving out the MoE blocks' output costs at least 5 points."""
    margins, costs = {}, {}
    for seed, (config, data, trainer, result) in trained.items():
        moe = compare.primary(result.test, data)
        assert sum(compare.group_of(d.name) == "skills" for d in data) == 100  # the default job's tasks
        dense = compare.train_dense(config, data, config.model.k * config.model.d_hidden)
        margins[seed] = float(np.mean(list(moe.values())) - np.mean(list(dense.values())))
        costs[seed] = float(np.mean(list(moe.values())) - np.mean(list(compare.ablated(trainer.model, data).values())))
    assert min(margins.values()) > 0.0, margins
    assert min(costs.values()) >= 0.05, costs


@pytest.fixture(scope="module")
def added(trained, tmp_path_factory):
    """seed -> (result, names of trunk tensors whose existing rows changed): the held-out
    task added from 10 shots per class to each seed's trunk (saved and loaded, as a user would)."""
    task = load_added({"heldout": True, "name": "digits_ge5", "seed": 0})
    out = {}
    for seed, (config, _, trainer, _) in trained.items():
        trunk = save_model(tmp_path_factory.mktemp(f"trunk{seed}"), 0, trainer.model, config, {"data_source": {}})
        model = load(trunk)
        before = {n: p.copy() for n, p in model.params.items()}
        res = add_task(model, config, task, shots=10, rng=np.random.default_rng(seed))
        out[seed] = res, [n for n, p in before.items() if not _kept(p, model.params[n])]
    return out


def test_add_task_uses_ten_shots_per_class_and_keeps_the_trunk(added):
    for seed, (res, moved) in added.items():
        assert res.shots == 20, seed
        assert moved == [], (seed, moved)  # the trunk is frozen: every row that existed is kept


@pytest.mark.xfail(
    strict=True, raises=AssertionError,
    reason="bar missed on the worst seed (measured 2026-12-02 on the default job's 135-task trunk at steps=500, "
    "n_family=8, task router with signature starts, issue 10): the gains over scratch are 0.187, 0.206, 0.022 on "
    "training seeds 0, 1, 2 (0.181, 0.134, 0.078 with random task-embedding starts); bench/add_task.py's "
    "2,000-step trunks meet it on 5 of 5 add-task seeds for training seed 0 (worst +0.150) and reach +0.106 and "
    "+0.075 for training seeds 1 and 2. Strict: it fails as soon as the bar holds",
)
def test_add_task_from_ten_shots_per_class_beats_scratch_by_ten_points(added):
    gains = {seed: res.score - res.scratch_score for seed, (res, _) in added.items()}
    assert min(gains.values()) >= 0.10, gains


@pytest.mark.xfail(
    strict=False, raises=AssertionError,
    reason="bar missed on the 500-step trunks (issue 10, fresh grown experts): grow 4 minus none on skill_108 "
    "is +0.117, -0.017, +0.033 on training seeds 0, 1, 2 with signature starts (2026-12-02 15:20; with random "
    "starts +0.133, -0.017, +0.300 on one machine and +0.150, +0.033, +0.283 on another); on bench/add_task.py's "
    "2,000-step trunk +0.100..+0.317 over 5 add-task seeds (met; -0.050..+0.267 with random starts). Not strict: "
    "which side of the bar the worst seed lands on has moved with the machine's bits",
)
def test_grown_experts_add_the_capacity_a_task_of_unseen_skills_needs(trained, tmp_path_factory):
    """A held-out skill task whose two skills no trained task reads (capacity the model does
    not have), from its training split: 4 grown experts beat no growth by >= 3 points on the
    worst seed (issue 10's growth bar)."""
    from moe.tasks.skills import make_bank

    gains = {}
    for seed, (config, _, trainer, _) in trained.items():
        n, size, bank_seed = config.data.n_skills, config.data.skill_size, 0
        bank = make_bank(n + 400, bank_seed)
        used = set(bank.subsets[:n].ravel().tolist())
        t = next(t for t in range(n, n + 400) if not used & set(bank.subsets[t].tolist()))
        task = load_added({"skill": t, "seed": bank_seed, "size": size, "name": f"skill_{t:03d}"})
        trunk = save_model(tmp_path_factory.mktemp(f"grow{seed}"), 0, trainer.model, config, {"data_source": {}})
        scores = {}
        for grow in (0, 4):
            model = load(trunk)
            scores[grow] = add_task(model, config, task, shots=None, rng=np.random.default_rng(seed),
                                    grow_experts=grow).score
        gains[seed] = scores[4] - scores[0]
    assert min(gains.values()) >= 0.03, gains


# Shazeer's per-example noisy router on the 23 original tasks: the balance losses' own effect.
# The default task router's balance follows which tasks share an expert (bench/RESULTS.md).
PER_EXAMPLE = ["model.gate=noisy_topk", "model.route_by=example+task", "n_skills=0", "n_digit_sets=0",
               "train.balanced_share=0"]  # what the balance losses do to the gate's own top-k


def test_balance_losses_balance_the_load(tmp_path):
    balanced, unbalanced = {}, {}
    for seed in SEEDS:
        _, data, trainer, _ = _train(tmp_path / f"on{seed}", seed, *PER_EXAMPLE)
        balanced[seed] = balance_summary(collect_profile(trainer.model, data))
        _, data0, trainer0, _ = _train(tmp_path / f"off{seed}", seed, *PER_EXAMPLE, "w_importance=0", "w_load=0")
        unbalanced[seed] = balance_summary(collect_profile(trainer0.model, data0))
    worst = {k: max(b[k] for b in balanced.values()) for k in ("cv_load", "max_mean_load")}
    assert worst["cv_load"] <= 0.15 and worst["max_mean_load"] <= 1.3, balanced
    # each seed's run without the losses against the same seed's run with them
    cv_ratio = min(unbalanced[s]["cv_load"] / balanced[s]["cv_load"] for s in SEEDS)
    max_ratio = min(unbalanced[s]["max_mean_load"] / balanced[s]["max_mean_load"] for s in SEEDS)
    assert cv_ratio >= 3 and max_ratio >= 2, (balanced, unbalanced)


def test_related_tasks_share_more_experts_than_unrelated_ones(trained):
    """Issue 9's specialisation bar: skill tasks that read a common skill put more of their
    routing on the same experts than unrelated pairs, with the routing the model trains with
    (balanced seats) and noise-free top-k, on every seed. Chance is k / E = 0.03; with random
    task-embedding starts both were ~0.03 (bench/RESULTS.md), with signature starts ~0.15."""
    ratios = {}
    for seed, (config, data, trainer, _) in trained.items():
        spec = compare.specialisation(trainer.model, data, seed=seed, related=compare.skill_relatedness_of(config),
                                      train_routing=(config.train.routing, config.train.balanced_factor))
        ratios[seed] = {mode: spec[mode]["overlap_related"] / spec[mode]["overlap_unrelated"] for mode in ("train", "noise_free")}
    assert min(min(r.values()) for r in ratios.values()) >= 2.0, ratios

"""The benchmark's quality bars, checked at a smaller scale than `moe train`'s default.

Everything is seeded, so these are deterministic; the margins are what the bars demand.
"""

import numpy as np
import pytest

from moe.api import load, save_model
from moe.baseline import train_baseline
from moe.config import load_config
from moe.datasets import load_added, load_source, source_of
from moe.profile_model import balance_summary, collect_profile
from moe.train import Trainer
from moe.transfer import add_task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SMALL = ["steps=500", "n_family=8", "progress=false"]


def _train(tmp_path, *extra):
    config = load_config(None, [*SMALL, *extra])
    source = source_of(config.data)
    data = load_source(source)
    trainer = Trainer(config, data, tmp_path, data_source=source, save_checkpoints=False)
    return config, data, trainer, trainer.train()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("quality"))


def test_one_moe_model_beats_per_task_dense_baselines(trained):
    config, data, _, result = trained
    moe = [result.test[d.name][d.spec.metric] for d in data]
    base = [train_baseline(config, d, result.seen[d.name])[d.spec.metric] for d in data]
    assert np.mean(moe) >= np.mean(base), (np.mean(moe), np.mean(base))
    assert config.model.k / config.model.n_experts <= 0.25


def test_add_task_from_ten_shots_per_class_beats_scratch_by_ten_points(trained, tmp_path):
    config, _, trainer, _ = trained
    trunk = save_model(tmp_path, 0, trainer.model, config, {"data_source": {}})
    task = load_added({"heldout": True, "name": "digits_ge5", "seed": 0})
    gains = []
    for seed in range(3):
        model = load(trunk)
        before = {n: p.copy() for n, p in model.params.items()}
        res = add_task(model, config, task, shots=10, rng=np.random.default_rng(seed))
        assert res.shots == 20
        gains.append(res.score - res.scratch_score)
        for n, p in before.items():  # the trunk is frozen: nothing that existed before moved
            after = model.params[n]  # stacked per-task tables grow by a row; old rows stay
            assert after.shape[1:] == p.shape[1:] and after.shape[0] >= p.shape[0], n
            assert np.array_equal(p, after[: p.shape[0]]), n
    assert min(gains) >= 0.10, gains


def test_balance_losses_balance_the_load(trained, tmp_path):
    _, data, trainer, _ = trained
    balanced = balance_summary(collect_profile(trainer.model, data))
    _, data0, trainer0, _ = _train(tmp_path, "w_importance=0", "w_load=0")
    unbalanced = balance_summary(collect_profile(trainer0.model, data0))
    assert balanced["cv_load"] <= 0.15 and balanced["max_mean_load"] <= 1.3, balanced
    assert unbalanced["cv_load"] >= 3 * balanced["cv_load"], (balanced, unbalanced)
    assert unbalanced["max_mean_load"] >= 2 * balanced["max_mean_load"], (balanced, unbalanced)

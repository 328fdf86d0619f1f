"""The gate noise schedule: the scale each step trains with, its effect, and a loaded model's."""

import numpy as np
import pytest

from moe.api import load
from moe.config import load_config
from moe.datasets import load_source, source_of
from moe.optim import noise_scale_at
from moe.train import Trainer

pytestmark = pytest.mark.unit

# the noisy per-example router (the default task router has no noise to schedule)
SMALL = ["model.gate=noisy_topk", "model.route_by=example+task", "n_family=2", "n_skills=0", "n_digit_sets=0",
         "family_size=60", "model.d_model=16", "model.n_experts=8", "model.d_hidden=16",
         "batch_size=32", "steps=6", "checkpoint_every=6", "eval_every=6", "baseline=none", "progress=false"]


def test_schedule_falls_linearly_from_one_to_final():
    assert [noise_scale_at(s, final=0.2, total=5) for s in range(6)] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2, 0.2])
    assert noise_scale_at(3, final=1.0, total=5) == 1.0
    with pytest.raises(ValueError, match=r"train.noise_final must be in \(0, 1\], got 0"):
        load_config(None, ["noise_final=0"])


def _trainer(tmp_path, final):
    config = load_config(None, [*SMALL, f"noise_final={final}"])
    return config, Trainer(config, load_source(source_of(config.data)), tmp_path)


def test_each_step_trains_with_its_scale_and_a_loaded_model_keeps_the_last(tmp_path):
    config, trainer = _trainer(tmp_path / "a", 0.25)
    _, plain = _trainer(tmp_path / "b", 1.0)
    for step in range(config.train.steps):
        m = trainer.train_step()
        plain.train_step()
        assert m["noise_scale"] == noise_scale_at(step, final=0.25, total=6)
        assert all(layer.gate.noise_scale == m["noise_scale"] for layer in trainer.model.layers)
        same = all(np.array_equal(trainer.model.params[n], plain.model.params[n]) for n in plain.model.params)
        assert same == (step == 0), step  # step 0 trains with the full noise in both runs
    trainer.save()  # at step 6: the schedule's end
    model = load(tmp_path / "a")
    assert all(layer.gate.noise_scale == 0.25 for layer in model.layers)


def test_a_two_step_run_reaches_the_final_noise_at_its_last_step():
    assert [noise_scale_at(s, final=0.5, total=2) for s in range(2)] == [1.0, 0.5]
    assert noise_scale_at(0, final=0.5, total=1) == 1.0  # one step: it starts and ends at 1

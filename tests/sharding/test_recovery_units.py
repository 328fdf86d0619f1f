"""The trainer's recovery logic without processes: an ExpertGroup that fails on chosen calls.

Oracles: the uninterrupted in-process run (bit-identical parameters and the same
metrics.jsonl), and counting (how often the owner was asked to repair; when it gives up).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from shardkit import STEPS, assert_same_checkpoint, shard_config

from moe import train as train_module
from moe.experts.local import LocalExperts
from moe.experts.protocol import ExpertGroupFailure
from moe.train import TooManyFailures, Trainer

pytestmark = pytest.mark.unit


class Flaky:
    """LocalExperts whose forward raises ExpertGroupFailure the first time it is called in each
    of the trainer phases listed in `fail_in` (or always, with `always`)."""

    def __init__(self, n_experts: int, d_model: int, d_hidden: int, fail_in: set[str], always: bool) -> None:
        self.inner = LocalExperts(n_experts, d_model, d_hidden, rng=np.random.default_rng(123))
        self.n_experts, self.d_model, self.fail_in, self.always = n_experts, d_model, fail_in, always
        self.trainer: Trainer | None = None

    def _maybe_fail(self) -> None:
        phase = self.trainer.phase if self.trainer is not None else "start"
        if self.always or phase in self.fail_in:
            self.fail_in.discard(phase)
            raise ExpertGroupFailure(f"planted failure in {phase}")

    def forward(self, packed, offsets, keep=True):
        self._maybe_fail()
        return self.inner.forward(packed, offsets, keep)

    def save_part(self, folder, layer):
        if not self.always:
            self._maybe_fail()
        return self.inner.save_part(folder, layer)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _trainer(config, data, out, *, fail_in=(), always=False, on_failure=lambda e: None) -> Trainer:
    m = config.model
    shared = set(fail_in)  # one set for every layer: each phase fails once in the run
    groups = [Flaky(m.n_experts, m.d_model, m.d_hidden, shared, always) for _ in range(m.n_layers)]
    trainer = Trainer(config, data, out, expert_groups=groups, on_failure=on_failure, echo=lambda s: None)
    for g in groups:
        g.trainer = trainer
    return trainer


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_failures_in_steps_evaluations_and_the_final_evaluation_are_repaired_bit_exactly(data, reference, tmp_path):
    repairs: list[str] = []
    config = dataclasses.replace(shard_config(), shards=dataclasses.replace(shard_config().shards, max_failures=4))
    trainer = _trainer(config, data, tmp_path, on_failure=lambda e: repairs.append(str(e)),
                       fail_in={"step", "evaluation", "checkpoint save", "final evaluation"})
    result = trainer.train()
    assert result.step == STEPS
    assert sorted(repairs) == ["planted failure in checkpoint save", "planted failure in evaluation",
                               "planted failure in final evaluation", "planted failure in step"]
    assert_same_checkpoint(result.checkpoint, reference)
    got, want = _metrics(tmp_path), _metrics(Path(reference).parent.parent)
    assert [r["step"] for r in got] == [5, 10, 15, 20, 25, 30]  # every evaluation once, none repeated
    assert got == want  # with the values of the uninterrupted run


@pytest.mark.timeout(120)
def test_giving_up_after_max_failures(data, tmp_path):
    config = dataclasses.replace(shard_config(), shards=dataclasses.replace(shard_config().shards, max_failures=3))
    repairs: list[Exception] = []
    trainer = _trainer(config, data, tmp_path, always=True, on_failure=repairs.append)
    with pytest.raises(TooManyFailures, match=r"^4 expert failures within 600 s \(limit 3\); giving up at step 0\. "
                                             r"Last: planted failure in (step|rollback)$"):
        trainer.train()
    assert len(repairs) == 3  # repaired max_failures times, then it stops


def test_failures_outside_the_window_do_not_count(data, tmp_path, monkeypatch):
    """Three failures, each 601 s after the last, with max_failures = 1 and a 600 s window:
    none is within the window of another, so the run goes on."""
    now = [0.0]

    def clock() -> float:
        now[0] += 601.0
        return now[0]

    monkeypatch.setattr(train_module.time, "monotonic", clock)
    config = dataclasses.replace(shard_config(), shards=dataclasses.replace(shard_config().shards, max_failures=1))
    trainer = _trainer(config, data, tmp_path, fail_in={"step", "evaluation", "checkpoint save"})
    assert trainer.train().step == STEPS

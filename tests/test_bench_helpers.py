"""The benchmarks' shared pieces: alternation order, the noisy-row rule, and the floor model.

Nothing here times anything: the timed functions are stand-ins, and the floor is checked
against hand arithmetic (the numbers issue 17 worked out for E = 4096).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import _bound  # noqa: E402
import _timing  # noqa: E402
from _bound import ffn_phases, floor_seconds, moe_phases  # noqa: E402
from _timing import Limits, alternate  # noqa: E402

pytestmark = pytest.mark.unit

T, D, H, K = 8192, 256, 512, 2
SGEMM, COPY = 195.4e9, 36.2e9  # the limits of the table issue 17 checked


def test_alternate_runs_one_warmup_round_then_rounds_of_every_contender_in_order():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    timings = alternate(fns, reps=3, warmup=1)
    assert calls == list("ABC") * 4
    assert {n: len(t.times) for n, t in timings.items()} == {"A": 3, "B": 3, "C": 3}
    assert all(t.best <= t.median for t in timings.values())


def test_alternate_refuses_no_rounds():
    with pytest.raises(ValueError, match="reps >= 1"):
        alternate({"A": lambda: None}, reps=0)


@pytest.mark.parametrize(
    ("start", "end", "noisy"),
    [
        (Limits(100e9, 30e9), Limits(91e9, 30e9), False),  # 9% apart
        (Limits(100e9, 30e9), Limits(89e9, 30e9), True),  # 11% apart
        (Limits(100e9, 30e9), Limits(100e9, 26e9), True),  # the copy probe moved
        (Limits(100e9, 26e9), Limits(100e9, 30e9), True),  # either direction
    ],
)
def test_a_row_is_noisy_when_a_limit_probe_moves_by_more_than_ten_percent(monkeypatch, start, end, noisy):
    probes = iter([start, end])
    monkeypatch.setattr(_timing, "probe_limits", lambda *a, **k: next(probes))
    row = _timing.measure_row({"A": lambda: None}, reps=1)
    assert row.noisy is noisy
    # the floor uses the faster reading of each limit
    assert row.limits == Limits(max(start.sgemm, end.sgemm), max(start.copy, end.copy))


def test_floor_at_4096_experts_is_the_overlap_the_data_flow_allows():
    E = 4096
    weights = E * (2 * D * H + H + D) * 4  # bytes
    router_fwd = 2 * T * D * E / SGEMM  # compute-bound
    experts_fwd = weights / COPY  # weight streaming dominates 2 N d h x 2 FLOPs
    backward = (8 * T * K * D * H + 4 * T * D * E) / SGEMM  # both GEMM sets overlap 2x weights
    assert backward > 2 * weights / COPY  # so the backward phase is compute-bound here
    got = floor_seconds(moe_phases(T, D, H, E, T * K, E), SGEMM, COPY)
    assert got == pytest.approx(router_fwd + experts_fwd + backward, rel=0.02)
    assert got == pytest.approx(0.471, rel=0.01)  # issue 17: "471 ms", against the table's 396


@pytest.mark.parametrize("E", [8, 64, 512, 4096, 65536])
@pytest.mark.parametrize("gate_matrices", [1, 2])
def test_floor_lies_between_the_max_and_the_sum_of_compute_and_traffic(E, gate_matrices):
    phases = moe_phases(T, D, H, E, T * K, min(E, T * K), gate_matrices=gate_matrices)
    flops = sum(p.flops for p in phases) / SGEMM
    traffic = sum(p.nbytes for p in phases) / COPY
    got = floor_seconds(phases, SGEMM, COPY)
    assert max(flops, traffic) <= got <= flops + traffic


def test_inference_floor_is_the_forward_phases_only():
    train = moe_phases(T, D, H, 512, T * K, 512)
    infer = moe_phases(T, D, H, 512, T * K, 512, train=False)
    assert infer == train[:2]


def test_ffn_floor_counts_weights_three_times_at_the_read_plus_write_copy_rate():
    E = 4096
    weights = _bound.expert_bytes(E, D, H)
    phases = ffn_phases(T * K, D, H, E)
    assert sum(p.nbytes for p in phases) == pytest.approx(3 * weights, rel=0.02)
    # memory-bound in both phases at E = 4096: the floor is the traffic at the copy rate
    assert floor_seconds(phases, SGEMM, COPY) == pytest.approx(3 * weights / COPY, rel=0.02)


def test_copy_bandwidth_counts_bytes_read_plus_written(monkeypatch):
    from moe.accel import devices

    def one_second(fn, budget):  # every timed copy takes 1 s: the rate is the bytes counted
        fn()
        return 1.0

    monkeypatch.setattr(devices, "_median_seconds", one_second)
    assert devices.copy_bandwidth(0.01) == 2 * 64 * 2**20  # 64 MiB read + 64 MiB written


def test_the_training_batch_tally_adds_up_each_phase_of_the_steps_it_trained():
    """bench/multitask.py's tally against the routings recorded step by step: the load is the
    sum of each phase's per-batch assignment counts, and the steps split as balanced_share says."""
    import numpy as np
    from multitask import TallyingTrainer

    from moe.config import Config, ModelConfig, TrainConfig
    from moe.profiling.stats import cv
    from moe.tasks.spec import TaskSpec
    from moe.tasks.splits import make_task_data, split_indices
    from moe.train import Trainer

    rng = np.random.default_rng(5)
    data = []
    for i in range(5):
        x = rng.standard_normal((40, 3))
        data.append(make_task_data(TaskSpec(f"t{i}", "regression", 3, 1), x, x[:, :1], split_indices(40, rng)))
    config = Config(model=ModelConfig(d_model=8, n_experts=4, d_hidden=8, k=2, d_task_emb=3),
                    train=TrainConfig(steps=8, batch_size=16, progress=False, balanced_share=0.25))
    trainer = Trainer(config, data, "unused", save_checkpoints=False)
    tally = TallyingTrainer(trainer)
    counts = {"topk": [], "balanced": []}
    for i in range(8):
        phase = trainer.routing_at(i)
        trainer.train_step()
        counts[phase].append(trainer.last_routings[0].counts.astype(np.float64))
    got = tally.summary()
    assert {p: got[p]["steps"] for p in got} == {"topk": 6, "balanced": 2}
    for phase, c in counts.items():
        load = np.sum(c, axis=0)  # [E]
        assert load.sum() == len(c) * 16 * 2  # dropless: every row's k assignments
        assert got[phase]["cv_load"] == pytest.approx(cv(load))
        assert got[phase]["max_mean_load"] == pytest.approx(load.max() / load.mean())
    assert got["balanced"]["batch_max_mean_median"] == pytest.approx(1.0)  # seats: 8 per expert each batch

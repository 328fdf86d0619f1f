"""The planner: ranking, rejection with miss amounts, LPT placement, profile reading."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe.accel.cost import predict
from moe.accel.devices import GiB, get_pod
from moe.accel.planner import format_plan, plan, read_profile_loads
from moe.accel.shape import MoEShape
from moe.profiling.placement import contiguous_placement

pytestmark = pytest.mark.accel


def shape(**kw) -> MoEShape:
    base = dict(d_model=512, d_hidden=2048, n_experts=64, k=2, n_layers=4, tokens=64 * 2048)
    base.update(kw)
    return MoEShape(**base)


def test_planner_ranks_by_step_time_and_best_is_the_brute_force_minimum():
    s, pod = shape(), get_pod("tpu-v4-slice")
    result = plan(s, pod, capacity_factors=(1.0, 2.0), per_device_batches=[2048, 512])
    times = [r.step_time for r in result.ranked]
    assert times == sorted(times) and len(result.ranked) == 5
    brute = [
        predict(MoEShape(**{**s.__dict__, "capacity_factor": cf}), pod, ep, 64 // ep, tokens_per_device=t,
                ep_inner=inner)
        for cf in (1.0, 2.0) for ep in (1, 2, 4, 8, 16, 32, 64) for t in (2048, 512)
        for inner in ((True, False) if 1 < ep < 64 else (True,))  # both nestings on a torus
    ]
    fitting = [r for r in brute if r.fits]
    assert result.n_candidates == len(brute)
    assert result.best.step_time == pytest.approx(min(r.step_time for r in fitting))
    assert result.runners_up == result.ranked[1:]


def test_layouts_that_do_not_fit_are_rejected_with_the_miss():
    s = shape(d_model=2048, d_hidden=8192, n_layers=8, tokens=64 * 1024)
    result = plan(s, get_pod("tpu-v4-slice"), capacity_factors=(1.25,), per_device_batches=[1024])
    assert result.n_rejected > 0 and result.best is not None
    assert all(r.fits for r in result.ranked)
    misses = [m.miss_gib for m in result.closest_misses]
    assert misses == sorted(misses) and misses[0] > 0
    for m in result.closest_misses:
        assert m.miss_gib == pytest.approx((m.report.memory_total - 32 * GiB) / GiB)
    assert "over by" in format_plan(result)


def test_nothing_fits_is_said_plainly():
    s = shape(d_model=4096, d_hidden=16384, n_experts=256, n_layers=16, tokens=8 * 1024)
    result = plan(s, get_pod("tpu-v2-board"), capacity_factors=(1.0,))
    assert result.best is None and result.n_rejected == result.n_candidates
    assert "no layout fits" in format_plan(result)


def skewed_loads(E: int) -> np.ndarray:
    return 0.7 ** np.arange(E) + 0.01


def test_lpt_lowers_device_load_on_a_skewed_profile():
    E = 16
    s = shape(n_experts=E, capacity_factor=None, tokens=8 * 1024, n_layers=2)
    pod = get_pod("h100-node")
    loads = skewed_loads(E)
    result = plan(s, pod, profile_loads=loads, capacity_factors=(None,))
    for ep in (2, 4, 8):
        b = result.balance[ep]
        per_bin = np.bincount(contiguous_placement(E, ep), weights=loads, minlength=ep)
        assert b.before == pytest.approx(per_bin.max() / per_bin.mean())
        assert b.after < b.before
        assert np.bincount(b.placement, minlength=ep).max() <= E // ep  # memory stays as modelled
    # dropless: the busiest device sets expert and all-to-all time, so LPT is faster
    lpt = predict(s, pod, 8, 1, expert_loads=loads, placement=result.balance[8].placement)
    contiguous = predict(s, pod, 8, 1, expert_loads=loads)
    assert lpt.times["experts"] < contiguous.times["experts"]
    assert lpt.times["all_to_all"] < contiguous.times["all_to_all"]
    assert "contiguous -> LPT" in format_plan(result)


def test_max_drop_rate_filters_candidates():
    s = shape(n_experts=16, n_layers=1, tokens=8 * 1024)
    loads = skewed_loads(16)
    result = plan(s, get_pod("h100-node"), profile_loads=loads, capacity_factors=(1.0, 2.0), max_drop_rate=0.05)
    assert result.n_over_drop_limit > 0
    assert all(r.drop_rate <= 0.05 for r in result.ranked)


def test_plan_argument_errors():
    s, pod = shape(), get_pod("tpu-v4-slice")
    with pytest.raises(ValueError, match="profile_loads must be float\\[64\\]"):
        plan(s, pod, profile_loads=np.ones(3))
    with pytest.raises(ValueError, match="exceeds the share"):
        plan(s, pod, per_device_batches=[10**6])
    with pytest.raises(ValueError, match="capacity_factors"):
        plan(s, pod, capacity_factors=())


def test_read_profile_loads_both_formats(tmp_path):
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"load": [1.0, 2.0, 3.0]}))
    assert read_profile_loads(one).tolist() == [1.0, 2.0, 3.0]
    many = tmp_path / "many.json"
    many.write_text(json.dumps({"layers": {"block0": {"load": [1, 5, 0]}, "block1": {"load": [4, 1, 2]}}}))
    assert read_profile_loads(many).tolist() == [5.0, 6.0, 2.0]
    assert read_profile_loads(many, reduce="max").tolist() == [4.0, 5.0, 2.0]
    wrapped = tmp_path / "report.json"  # as moe.profiling.write_report nests it
    wrapped.write_text(json.dumps({"format": "x", "summary": {"layers": {"b0": {"load": [2, 1]}}}}))
    assert read_profile_loads(wrapped).tolist() == [2.0, 1.0]
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({"load": [0.0, 0.0], "counts": [3, 1]}))
    assert read_profile_loads(counts).tolist() == [3.0, 1.0]


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ([1, 2], "JSON object"),
        ({"nothing": 1}, "'load' list or a non-empty 'layers'"),
        ({"load": []}, "non-empty list of numbers"),
        ({"load": [1, -2]}, "finite and >= 0"),
        ({"layers": {"a": {"load": [1, 2]}, "b": {"load": [1]}}}, "different expert counts"),
        ({"layers": {"a": {"counts": [1]}}}, "layer 'a' needs a 'load' list"),
    ],
)
def test_read_profile_loads_errors(tmp_path, doc, match):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        read_profile_loads(path)


def test_read_profile_loads_bad_json(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read profile"):
        read_profile_loads(path)


def test_accel_does_not_import_jax():
    root = Path(__file__).resolve().parents[2]
    code = "import sys, moe.accel; sys.exit(1 if 'jax' in sys.modules else 0)"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          timeout=60, check=False)
    assert done.returncode == 0

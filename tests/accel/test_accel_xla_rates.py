"""moe.accel.xla_rates on 2 forced CPU devices: rates that are rates of this machine, and a pod
built from them (subprocess, as test_accel_jax explains)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.accel

HAVE_JAX = importlib.util.find_spec("jax") is not None


def _worker() -> dict:
    from moe.accel.devices import calibrate_cpu, sgemm_peak
    from moe.accel.xla_rates import xla_cpu_mesh, xla_rates

    refused = []
    for bad in (dict(gemm=(2, 0, 8, 8), adam_elems=64, exchange_rows=8, width=4),
                dict(gemm=(2, 8, 8, 8), adam_elems=64, exchange_rows=8, width=4, seconds=0.0),
                dict(gemm=(2, 8, 8, 8), adam_elems=-1, exchange_rows=8, width=4)):
        try:
            xla_rates(**bad)
        except ValueError as e:
            refused.append(str(e))
    r = xla_rates((4, 128, 64, 96), 1 << 16, 256, 32, seconds=0.6)
    base = calibrate_cpu(seconds=0.5)
    pod, rates = xla_cpu_mesh(base, (4, 128, 64, 96), 1 << 16, 256, 32, seconds=0.6)
    dev = pod.device
    return {"refused": refused, "rates": dataclasses.asdict(r), "numpy_peak": sgemm_peak(0.3),
            "pod_n": pod.n_devices, "pod_flops": dev.peak_flops, "pod_bw": dev.hbm_bw,
            "pod_carries": [dev.router_elem_s, dev.dispatch_elem_s, dev.dispatch_expert_s, dev.a2a_bw, dev.all_reduce_bw],
            "its_rates": [rates.router_elem_s, rates.dispatch_elem_s, rates.dispatch_expert_s, rates.a2a_bw,
                          rates.all_reduce_bw],
            "pod_vs_rates": [dev.peak_flops / rates.flops, dev.hbm_bw / rates.bw],
            "base_router": base.router_elem_s, "base_bytes": base.hbm_bytes, "pod_bytes": dev.hbm_bytes}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not HAVE_JAX:
        pytest.skip("jax is not installed (pip install 'moe[accel]' or jax[cpu]) - XLA rates not tested")
    from accel.jaxcheck import run_worker

    out = run_worker(__file__, str(tmp_path_factory.mktemp("xla")), n_devices=2, timeout=240)
    return json.loads(out.strip().splitlines()[-1])


def test_bad_shapes_and_budgets_are_refused(results):
    assert len(results["refused"]) == 3
    assert "positive ints" in results["refused"][0] and "seconds > 0" in results["refused"][1]


def test_rates_are_this_machines(results):
    """Two devices share the machine: together they cannot beat OpenBLAS's best sgemm by 2x,
    nor run slower than a thousandth of it; copy-like rates are below 1 TB/s and positive; the
    gate and dispatch take between a nanosecond and a millisecond per element."""
    r, numpy_peak = results["rates"], results["numpy_peak"]
    assert 1e-3 * numpy_peak < 2 * r["flops"] < 2 * numpy_peak, (r["flops"], numpy_peak)
    for name in ("bw", "a2a_bw", "all_reduce_bw"):
        assert 0 < r[name] < 1e12, (name, r[name])
    assert 1e-9 < r["router_elem_s"] < 1e-3
    # the two dispatch parts come from one 2 x 2 solve: both >= 0, not both 0
    assert r["dispatch_elem_s"] >= 0 and r["dispatch_expert_s"] >= 0
    assert 1e-9 < r["dispatch_elem_s"] + r["dispatch_expert_s"] < 1e-3


def test_the_pod_carries_the_measured_rates_per_device(results):
    r = results
    assert r["pod_n"] == 2
    assert r["pod_carries"] == r["its_rates"]  # the rates it was built from, per device, unscaled
    assert r["pod_vs_rates"] == pytest.approx([1.0, 1.0])  # 1/2 of the 2-device total
    assert r["pod_bytes"] == pytest.approx(r["base_bytes"] / 2)  # memory from the numpy spec


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps(_worker()))

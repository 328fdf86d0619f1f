"""moe.accel.xla_rates on 2 forced CPU devices: rates that are rates of this machine, and a pod
built from them (subprocess, as test_accel_jax explains)."""

from __future__ import annotations

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
    flops, bw, link = xla_rates((4, 128, 64, 96), 1 << 16, 256, 32, seconds=0.3)
    base = calibrate_cpu(seconds=0.5)
    pod, exchange = xla_cpu_mesh(base, (4, 128, 64, 96), 1 << 16, 256, 32, seconds=0.3)
    return {"refused": refused, "flops": flops, "bw": bw, "link": link, "numpy_peak": sgemm_peak(0.3),
            "pod_n": pod.n_devices, "pod_flops": pod.device.peak_flops, "pod_bw": pod.device.hbm_bw,
            "pod_router": pod.device.router_elem_s, "base_router": base.router_elem_s, "exchange": exchange}


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
    nor run slower than a thousandth of it; copy-like rates are below 1 TB/s and positive."""
    r = results
    assert 1e-3 * r["numpy_peak"] < 2 * r["flops"] < 2 * r["numpy_peak"], (r["flops"], r["numpy_peak"])
    assert 0 < r["bw"] < 1e12 and 0 < r["link"] < 1e12


def test_the_pod_carries_the_measured_rates_per_device(results):
    r = results
    assert r["pod_n"] == 2
    # measured separately (run to run noise), so the same order of magnitude, not the same bits
    assert 0.2 < r["pod_flops"] / r["flops"] < 5 and 0.2 < r["pod_bw"] / r["bw"] < 5
    assert r["pod_router"] == pytest.approx(2 * r["base_router"])  # kept from the numpy spec, per device
    assert r["exchange"] > 0


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps(_worker()))

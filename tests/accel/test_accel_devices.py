"""Registry figures, pod totals, name errors and the measured CPU."""

import itertools
import math

import numpy as np
import pytest

from moe.accel import devices
from moe.accel.devices import (
    DeviceSpec,
    GiB,
    PodSpec,
    calibrate_cpu,
    get_device,
    get_pod,
    list_targets,
)

pytestmark = pytest.mark.accel


def test_tpu_v2_chip_board_pod_match_the_published_numbers():
    chip = get_device("tpu-v2")
    assert chip.peak_flops == 45e12
    assert chip.hbm_bytes == 16 * GiB
    assert chip.hbm_bw == 600e9
    board = get_pod("tpu-v2-board")
    assert board.n_devices == 4
    assert board.peak_flops == pytest.approx(180e12)
    assert board.hbm_bytes == 64 * GiB
    assert board.hbm_bw == pytest.approx(2400e9)
    pod = get_pod("tpu-v2-pod")
    assert pod.n_devices == 256 == 64 * board.n_devices
    assert pod.topology == "torus2d" and pod.dims == (16, 16)
    assert pod.peak_flops == pytest.approx(11.5e15, rel=0.01)
    assert pod.hbm_bytes == 4 * 2**40  # "4 TB" = 256 x 16 GiB


@pytest.mark.parametrize(
    ("name", "chips", "topology", "peak", "hbm_gib", "hbm_bw"),
    [
        ("tpu-v3-pod", 1024, "torus2d", 123e12, 32, 900e9),
        ("tpu-v4-pod", 4096, "torus3d", 275e12, 32, 1200e9),
        ("tpu-v4-slice", 64, "torus3d", 275e12, 32, 1200e9),
        ("tpu-v5e-pod", 256, "torus2d", 197e12, 16, 819e9),
        ("tpu-v5p-pod", 8960, "torus3d", 459e12, 95, 2765e9),
    ],
)
def test_tpu_pods(name, chips, topology, peak, hbm_gib, hbm_bw):
    pod = get_pod(name)
    assert pod.n_devices == chips == math.prod(pod.dims)
    assert pod.topology == topology
    assert pod.device.peak_flops == peak
    assert pod.device.hbm_bytes == hbm_gib * GiB
    assert pod.device.hbm_bw == hbm_bw
    assert pod.device.links_per_chip == (4 if topology == "torus2d" else 6)
    assert pod.peak_flops == pytest.approx(chips * peak)


def test_v4_slice_is_a_4x4x4_cube():
    assert get_pod("tpu-v4-slice").dims == (4, 4, 4)


@pytest.mark.parametrize(("name", "hbm"), [("h100-node", 80e9), ("h200-node", 141e9)])
def test_nvidia_nodes(name, hbm):
    pod = get_pod(name)
    assert pod.n_devices == 8 and pod.topology == "switch"
    assert pod.device.hbm_bytes == hbm
    # NVLink 4: 900 GB/s total bidirectional = 450 GB/s per direction
    assert pod.device.injection_bw == pytest.approx(450e9)


def test_v5e_pod_bisection_is_the_published_1_6_tb_s():
    assert get_pod("tpu-v5e-pod").bisection_bw == pytest.approx(1.6e12)


def _torus_links(dims):
    """Undirected links of a torus; a dimension of size 2 has one link, of size 1 none."""
    nodes = list(itertools.product(*[range(d) for d in dims]))
    links = set()
    for node in nodes:
        for axis, size in enumerate(dims):
            if size == 1:
                continue
            nb = list(node)
            nb[axis] = (node[axis] + 1) % size
            links.add(frozenset((node, tuple(nb))))
    return nodes, links


@pytest.mark.parametrize("dims", [(4, 4), (2, 4), (4, 2), (6, 2), (2, 2)])
def test_bisection_against_brute_force_min_cut(dims):
    nodes, links = _torus_links(dims)
    best = min(
        sum(1 for link in links if len(link & set(half)) == 1)
        for half in itertools.combinations(nodes, len(nodes) // 2)
    )
    dev = DeviceSpec("x", 1e12, GiB, 1e11, 1e9, 4)
    pod = PodSpec("t", dev, len(nodes), "torus2d", dims)
    assert pod.bisection_bw == pytest.approx(best * 1e9)


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="tpu-v4") as info:
        get_device("tpu-v9")
    assert "known devices" in str(info.value)
    with pytest.raises(ValueError, match="known targets"):
        get_pod("nope")
    with pytest.raises(ValueError, match="get_pod"):
        get_device("tpu-v2-pod")


def test_list_targets_all_resolve():
    names = list_targets()
    assert {"tpu-v2", "tpu-v2-board", "tpu-v2-pod", "tpu-v4-slice", "cpu", "h100-node"} <= set(names)
    for name in names:
        if name != "cpu":  # cpu calibrates; covered below
            assert get_pod(name).n_devices >= 1


def test_a_chip_name_is_a_one_device_pod():
    pod = get_pod("tpu-v4")
    assert pod.n_devices == 1 and pod.topology == "single" and pod.device is get_device("tpu-v4")


def test_pod_validation():
    dev = get_device("tpu-v4")
    with pytest.raises(ValueError, match="dims"):
        PodSpec("bad", dev, 10, "torus2d", (4, 4))
    with pytest.raises(ValueError, match="topology"):
        PodSpec("bad", dev, 16, "ring", (16,))
    with pytest.raises(ValueError, match="2 positive dims"):
        PodSpec("bad", dev, 16, "torus2d", (16,))
    with pytest.raises(ValueError, match="peak_flops"):
        DeviceSpec("bad", 0.0, GiB, 1e9, 1e9, 4)


def test_calibrate_cpu_returns_positive_finite_numbers_and_caches():
    spec = calibrate_cpu(0.2, refresh=True)
    for value in (spec.peak_flops, spec.hbm_bw, spec.hbm_bytes):
        assert np.isfinite(value) and value > 0
    assert spec.cache_bytes >= 0
    assert "measured" in spec.flops_kind
    assert calibrate_cpu(5.0) is spec  # cached: no second measurement
    assert get_device("cpu") is spec
    pod = get_pod("cpu")
    assert pod.n_devices == 1 and pod.device is spec
    with pytest.raises(ValueError, match="seconds"):
        calibrate_cpu(0.0, refresh=True)
    assert devices._CPU_CACHE["cpu"] is spec

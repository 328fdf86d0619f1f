"""All-reduce and all-to-all times against hand computations."""

import pytest

from moe.accel.devices import all_reduce_time, all_to_all_time, get_pod

pytestmark = pytest.mark.accel
B = 1e9  # bytes


def test_ring_all_reduce_on_a_switch():
    pod = get_pod("h100-node")
    # 2 (n-1)/n * B / bw with bw = 18 links x 25 GB/s
    assert all_reduce_time(B, pod, 8) == pytest.approx(2 * 7 / 8 * B / 450e9)
    assert all_reduce_time(B, pod, 2) == pytest.approx(2 * 1 / 2 * B / 450e9)


def test_one_full_torus_ring_is_bidirectional():
    pod = get_pod("tpu-v5e-pod")  # 16x16, 50 GB/s per link per direction
    assert all_reduce_time(B, pod, 16) == pytest.approx(2 * 15 / 16 * B / (2 * 50e9))


def test_a_segment_without_wraparound_gets_one_link():
    pod = get_pod("tpu-v5e-pod")
    assert all_reduce_time(B, pod, 8) == pytest.approx(2 * 7 / 8 * B / 50e9)


def test_two_dimensional_torus_splits_the_payload_over_both_dimensions():
    pod = get_pod("tpu-v5e-pod")
    # half the data goes dim0 then dim1, half dim1 then dim0; each dimension carries
    # 2*(15/16)*(B/2) + 2*(15/16)*(B/2)/16 over a bidirectional ring of 2 x 50 GB/s
    per_dim = 2 * 15 / 16 * (B / 2) * (1 + 1 / 16)
    assert all_reduce_time(B, pod, 256) == pytest.approx(per_dim / 100e9)
    # the Cloud TPU v5e page: 51.2 TB/s all-reduce bandwidth per pod = 200 GB/s per chip
    assert all_reduce_time(B, pod, 256) == pytest.approx(2 * B / 200e9, rel=0.01)


def test_strided_data_parallel_groups_on_a_cube():
    pod = get_pod("tpu-v4-slice")  # 4x4x4, 50 GB/s links
    # dp = 8 groups with stride 8: dim1 pairs 2 hops apart (shared by 2 groups: 2L/2),
    # full dim2 ring (2L). Loads: dim1 = B/2 + B/8, dim2 = 3B/4 + 3B/8.
    L = 50e9
    expected = max((B / 2 + B / 8) / L, (3 * B / 4 + 3 * B / 8) / (2 * L))
    assert all_reduce_time(B, pod, 8, stride=8) == pytest.approx(expected)


def test_all_to_all_bisection_bound_on_a_torus():
    pod = get_pod("tpu-v5e-pod")
    # 256 chips send B each: 256 B / 4 cross the cut each way over 32 links x 50 GB/s,
    # versus injection (255/256) B over 4 links x 50 GB/s
    bisect = 256 * B / 4 / (32 * 50e9)
    inject = 255 / 256 * B / (4 * 50e9)
    assert bisect > inject
    assert all_to_all_time(B, pod, 256) == pytest.approx(bisect)


def test_all_to_all_on_a_segment_without_wraparound():
    pod = get_pod("tpu-v5e-pod")
    # 8 chips in a line: the middle cut crosses one link; 8 B / 4 over 50 GB/s
    assert all_to_all_time(B, pod, 8) == pytest.approx(8 * B / 4 / 50e9)


def test_all_to_all_injection_bound_on_a_switch():
    pod = get_pod("h100-node")
    assert all_to_all_time(B, pod, 8) == pytest.approx(7 / 8 * B / 450e9)


def test_all_to_all_small_ring():
    pod = get_pod("tpu-v5e-pod")
    # 16 chips on one closed ring: bisection cuts 2 links; injection uses 2 links
    bisect = 16 * B / 4 / (2 * 50e9)
    assert all_to_all_time(B, pod, 16) == pytest.approx(max(bisect, 15 / 16 * B / 100e9))


def test_trivial_groups_cost_nothing_and_bad_groups_raise():
    pod = get_pod("tpu-v4-slice")
    assert all_reduce_time(B, pod, 1) == 0.0
    assert all_to_all_time(B, pod, 1) == 0.0
    assert all_reduce_time(0.0, pod, 64) == 0.0
    with pytest.raises(ValueError, match="exceeds"):
        all_reduce_time(B, pod, 128)
    with pytest.raises(ValueError, match="group_size"):
        all_to_all_time(B, pod, 0)
    with pytest.raises(ValueError, match="bytes"):
        all_reduce_time(-1.0, pod, 4)


def test_interleaved_pairs_far_apart_share_the_ring():
    pod = get_pod("tpu-v4-pod")  # 16x16x16
    L = 50e9
    # EP groups of 2048 fill 16x16x8; the DP pair of a chip sits 8 hops away along the
    # last ring, which it shares with 8 interleaved pairs (both directions): 2L / 8
    assert all_reduce_time(B, pod, 2, stride=2048) == pytest.approx(2 * (1 / 2) * B / (2 * L / 8))
    # as a compact pair (neighbours on an open segment): one link
    assert all_reduce_time(B, pod, 2) == pytest.approx(B / L)


def test_strided_all_to_all_on_the_v4_pod():
    pod = get_pod("tpu-v4-pod")
    L = 50e9
    # 2048 chips, one of each compact pair: rings 8 (hop 2), 16, 16; cutting a 16-ring
    # crosses 2048 / 16 rows x 2 links; 2048 B / 4 cross each way
    assert all_to_all_time(B, pod, 2048, stride=2) == pytest.approx(2048 * B / 4 / (128 * 2 * L))


def test_a_group_that_does_not_tile_the_torus_is_one_open_ring():
    pod = get_pod("tpu-v5e-pod")
    # 24 = 8 x 3 has no factorisation over 16 x 16: modelled pessimistically as one open ring
    assert all_reduce_time(B, pod, 24) == pytest.approx(2 * 23 / 24 * B / 50e9)

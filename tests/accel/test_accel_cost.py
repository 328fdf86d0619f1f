"""The cost model: FLOPs against a counted execution, memory trends, fit, drops, imbalance."""

import math

import numpy as np
import pytest
from scipy import stats

from moe.accel.cost import COMPONENTS, format_report, predict, predict_layer_step
from moe.accel.devices import (
    DeviceSpec,
    GiB,
    PodSpec,
    all_reduce_time,
    all_to_all_time,
    cpu_mesh,
    get_pod,
)
from moe.accel.shape import MoEShape

pytestmark = pytest.mark.accel
MATMULS = {"adapters", "heads", "gate matmul", "expert W1", "expert W2"}


def counted_matmul_flops(s: MoEShape, rng: np.random.Generator) -> int:
    """Run the forward of a tiny model, counting the multiply-adds of every real matmul."""
    count = 0

    def mm(a, b):
        nonlocal count
        count += a.shape[0] * a.shape[1] * b.shape[1]
        return a @ b

    d, h, E, k = s.d_model, s.d_hidden, s.n_experts, s.k
    task = np.arange(s.tokens) % s.n_tasks
    x_in = rng.standard_normal((s.tokens, int(s.d_in)))
    x = np.zeros((s.tokens, d))
    for t in range(s.n_tasks):  # one adapter per task, on that task's rows
        x[task == t] = mm(x_in[task == t], rng.standard_normal((int(s.d_in), d)))
    emb = rng.standard_normal((s.n_tasks, s.d_task_emb))[task]
    for _ in range(s.n_layers):
        g_in = np.concatenate([x, emb], axis=1)
        logits = sum(mm(g_in, rng.standard_normal((d + s.d_task_emb, E))) for _ in range(s.gate_matrices))
        top = np.argsort(-logits, axis=1)[:, :k]
        out = np.zeros_like(x)
        for e in range(E):  # every expert on the rows routed to it
            rows = np.nonzero((top == e).any(axis=1))[0]
            hid = np.maximum(mm(x[rows], rng.standard_normal((d, h))), 0)
            out[rows] += mm(hid, rng.standard_normal((h, d)))
        x = x + out
    for t in range(s.n_tasks):
        mm(x[task == t], rng.standard_normal((d, int(s.n_out))))
    return count


@pytest.mark.parametrize("gate", ["noisy_topk", "softmax_topk"])
def test_matmul_flops_equal_a_counted_execution(gate):
    s = MoEShape(d_model=3, d_hidden=5, n_experts=4, k=2, n_layers=2, tokens=6, capacity_factor=None,
                 d_in=2, n_out=3, n_tasks=2, d_task_emb=1, gate=gate)
    rep = predict(s, get_pod("tpu-v4"), 1, 1)
    model = sum(op.flops for op in rep.ops if op.name in MATMULS)
    # 2 FLOPs per multiply-add, forward + backward = 3 x forward
    assert model == pytest.approx(3 * 2 * counted_matmul_flops(s, np.random.default_rng(0)))


def test_model_flops_follow_6_n_d():
    s = MoEShape(d_model=64, d_hidden=128, n_experts=8, k=2, n_layers=2, tokens=512)
    rep = predict(s, get_pod("tpu-v4"), 1, 1)
    assert rep.model_flops == 6 * s.active_params * s.tokens
    assert rep.mfu == pytest.approx(rep.model_flops / (rep.step_time * 1 * 275e12))
    assert 0 < rep.mfu < 1


@pytest.mark.parametrize(("n_tasks", "tokens"), [(1, 64), (8, 64), (100, 64)])
def test_adapter_bytes_read_the_weights_of_the_tasks_present(n_tasks, tokens):
    s = MoEShape(d_model=16, d_hidden=32, n_experts=4, k=1, gate="top1", n_layers=1, tokens=tokens,
                 d_in=8, n_out=2, n_tasks=n_tasks)
    adapters = next(op for op in predict(s, get_pod("tpu-v4"), 1, 1).ops if op.name == "adapters")
    tasks_in_batch = min(n_tasks, tokens)  # at most one task per token
    act = 4 * (tokens * 8 + tokens * 16)  # input [t, 8] and output [t, 16], float32
    weights = 4 * tasks_in_batch * (8 * 16 + 16)
    assert adapters.nbytes == 3 * act + 3 * weights


def test_roofline_each_op_is_the_max_of_compute_and_memory():
    s = MoEShape(d_model=256, d_hidden=1024, n_experts=16, k=2, n_layers=2, tokens=4096)
    pod = get_pod("tpu-v4-slice")
    rep = predict(s, pod, 16, 4)
    for op in rep.ops:
        if op.bound in ("compute", "memory"):
            assert op.seconds == pytest.approx(max(op.flops / 275e12, op.nbytes / 1200e9))
    assert rep.step_time == pytest.approx(sum(op.seconds for op in rep.ops))
    assert set(rep.times) == set(COMPONENTS)


def test_all_to_all_counts_four_exchanges_per_layer():
    s = MoEShape(d_model=256, d_hidden=512, n_experts=16, k=2, n_layers=3, tokens=16 * 1024, capacity_factor=1.0)
    pod = get_pod("h100-node")
    rep = predict(s, pod, 8, 1)
    t = 2048
    C = math.ceil(t * 2 / 16)
    nbytes = 16 * C * 256 * 4  # the whole [E, C, d] float32 buffer
    assert rep.times["all_to_all"] == pytest.approx(4 * 3 * (7 / 8) * nbytes / 450e9)
    assert predict(s, pod, 1, 8).times["all_to_all"] == 0.0


def _measured_mesh(**rates) -> PodSpec:
    """An 8-device CPU-like mesh whose devices carry measured rates (as moe.accel.xla_rates
    gives them)."""
    base = DeviceSpec("cpu-like", 8e10, 16 * GiB, 4e10, 0.0, 0)
    pod = cpu_mesh(8, base)
    return PodSpec(pod.name, DeviceSpec(**{**pod.device.__dict__, **rates}), 8, "switch", (8,))


def test_measured_element_rates_replace_the_roofline_where_slower():
    """Router: gate rate x tokens x experts per layer; dispatch: per (assignment x d) plus per
    (assignment x expert). A rate below the roofline leaves the roofline."""
    s = MoEShape(d_model=128, d_hidden=256, n_experts=32, k=2, n_layers=2, tokens=8 * 512, capacity_factor=1.25)
    plain = predict(s, _measured_mesh(), 8, 1)
    slow = predict(s, _measured_mesh(router_elem_s=800e-9, dispatch_elem_s=80e-9, dispatch_expert_s=100e-9), 8, 1)
    t = 512
    ops = {op.name: op for op in slow.ops}
    assert ops["gate softmax+top-k"].seconds == pytest.approx(2 * 800e-9 * t * 32)
    assert ops["dispatch+combine copies"].seconds == pytest.approx(2 * (80e-9 * t * 2 * 128 + 100e-9 * t * 2 * 32))
    assert ops["gate softmax+top-k"].bound == ops["dispatch+combine copies"].bound == "measured"
    base = {op.name: op for op in plain.ops}
    assert ops["gate matmul"] == base["gate matmul"] and ops["expert W1"] == base["expert W1"]
    assert slow.times["router"] - plain.times["router"] == pytest.approx(
        ops["gate softmax+top-k"].seconds + ops["dispatch+combine copies"].seconds
        - base["gate softmax+top-k"].seconds - base["dispatch+combine copies"].seconds)
    fast = predict(s, _measured_mesh(router_elem_s=1e-18, dispatch_elem_s=1e-18), 8, 1)
    assert fast.times == plain.times


def test_measured_collective_rates_time_the_exchanges():
    """A switch with measured rates: the all-to-all moves the bytes leaving a device at a2a_bw,
    the all-reduce its ring bytes 2 (g-1)/g x payload at all_reduce_bw; without them the links."""
    pod = _measured_mesh(a2a_bw=0.5e9, all_reduce_bw=3e9)
    assert all_to_all_time(8e6, pod, 8) == pytest.approx(7 / 8 * 8e6 / 0.5e9)
    assert all_reduce_time(8e6, pod, 8) == pytest.approx(2 * 7 / 8 * 8e6 / 3e9)
    assert all_reduce_time(8e6, pod, 2, stride=4) == pytest.approx(2 * 1 / 2 * 8e6 / 3e9)
    links = _measured_mesh()
    assert all_to_all_time(8e6, links, 8) == pytest.approx(7 / 8 * 8e6 / links.device.injection_bw)
    assert all_reduce_time(8e6, links, 8) == pytest.approx(2 * 7 / 8 * 8e6 / links.device.injection_bw)
    s = MoEShape(d_model=128, d_hidden=256, n_experts=32, k=2, n_layers=1, tokens=8 * 512, capacity_factor=1.25)
    rep = predict(s, pod, 8, 1)
    C = s.capacity(512)
    assert rep.times["all_to_all"] == pytest.approx(4 * all_to_all_time(32 * C * 128 * 4, pod, 8))
    for bad in (dict(a2a_bw=-1.0), dict(all_reduce_bw=float("nan")), dict(dispatch_expert_s=-1e-9)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be finite and >= 0"):
            _measured_mesh(**bad)


def _mem(E, ep, pod="tpu-v4-slice"):
    s = MoEShape(d_model=512, d_hidden=2048, n_experts=E, k=2, n_layers=4, tokens=64 * 512)
    return predict(s, get_pod(pod), ep, 64 // ep)


def test_memory_grows_with_experts_and_shrinks_with_expert_parallelism():
    by_e = [_mem(E, 8).memory_total for E in (8, 16, 32, 64)]
    assert all(a < b for a, b in zip(by_e, by_e[1:], strict=False))
    by_ep = [_mem(64, ep) for ep in (1, 2, 4, 8, 16, 32, 64)]
    state = [r.memory["params"] + r.memory["grads"] + r.memory["optimizer_state"] for r in by_ep]
    assert all(a > b for a, b in zip(state, state[1:], strict=False))


def test_padded_rows_are_kept_for_the_backward():
    # capacity 1 -> 2 doubles C; each layer keeps the received expert rows [R, d], the hidden
    # pre/post activation [R, h] x 2 and the returned rows [E C, d]; R = E C when ep | E
    E, d, h, L, t = 8, 32, 64, 3, 1024
    base = dict(d_model=d, d_hidden=h, n_experts=E, k=2, n_layers=L, tokens=4 * t)
    pod = PodSpec("four", get_pod("h100-node").device, 4, "switch", (4,))
    lo = predict(MoEShape(**base, capacity_factor=1.0), pod, 4, 1)
    hi = predict(MoEShape(**base, capacity_factor=2.0), pod, 4, 1)
    dC = math.ceil(2.0 * t * 2 / E) - math.ceil(1.0 * t * 2 / E)
    dR = E * dC
    assert hi.memory["activations"] - lo.memory["activations"] == 4 * L * (dR * d + 2 * dR * h + dR * d)
    assert hi.memory["capacity_buffers"] - lo.memory["capacity_buffers"] == 4 * 2 * dR * d


def test_adam_state_is_two_float32_moments_and_sgd_has_none():
    s = MoEShape(d_model=64, d_hidden=128, n_experts=8, k=2, n_layers=2, tokens=256)
    adam = predict(s, get_pod("tpu-v4"), 1, 1)
    assert adam.memory["optimizer_state"] == 2 * 4 * s.total_params
    assert adam.memory["params"] == 4 * s.total_params
    from dataclasses import replace

    assert predict(replace(s, optimizer="sgd"), get_pod("tpu-v4"), 1, 1).memory["optimizer_state"] == 0


def test_adafactor_state_is_factored_per_matrix():
    s = MoEShape(d_model=4, d_hidden=6, n_experts=2, k=1, gate="top1", n_layers=1, tokens=8,
                 d_in=3, n_out=2, n_tasks=1, optimizer="adafactor")
    # matrices keep rows + cols, vectors their full size (Shazeer & Stern 2018)
    matrices = [(3, 4), (4, 2), (4, 2)] + [(4, 6), (6, 4)] * 2  # adapter, head, W_g, 2 x (W1, W2)
    vectors = [4, 2, 4, 4] + [6, 4] * 2  # adapter b, head b, LN gamma, beta, 2 x (b1, b2)
    expected = sum(r + c for r, c in matrices) + sum(vectors)
    rep = predict(s, get_pod("tpu-v4"), 1, 1)
    assert rep.memory["optimizer_state"] == 4 * expected


def test_a_layout_that_does_not_fit_reports_its_miss():
    s = MoEShape(d_model=2048, d_hidden=8192, n_experts=64, k=2, n_layers=8, tokens=64 * 1024)
    rep = predict(s, get_pod("tpu-v4-slice"), 1, 64)  # all experts replicated on every chip
    assert not rep.fits
    assert rep.miss_bytes == pytest.approx(rep.memory_total - 32 * GiB)
    assert rep.miss_bytes > 0
    text = format_report(rep)
    assert "NO" in text and f"over by {rep.miss_bytes / GiB:.3f} GiB" in text
    assert predict(s, get_pod("tpu-v4-slice"), 64, 1).fits


def test_drop_rate_matches_the_exact_binomial_overflow():
    E, t, k = 16, 512, 2
    s = MoEShape(d_model=32, d_hidden=64, n_experts=E, k=k, n_layers=1, tokens=t, capacity_factor=1.0)
    rep = predict(s, get_pod("tpu-v4"), 1, 1)
    C = math.ceil(t * k / E)
    x = np.arange(t * k + 1)
    exact = E * np.sum(np.maximum(x - C, 0) * stats.binom.pmf(x, t * k, 1 / E)) / (t * k)
    assert rep.drop_rate == pytest.approx(exact, abs=2e-3)
    assert 0.01 < rep.drop_rate < 0.2
    roomy = predict(MoEShape(d_model=32, d_hidden=64, n_experts=E, k=k, n_layers=1, tokens=t, capacity_factor=2.0),
                    get_pod("tpu-v4"), 1, 1)
    assert roomy.drop_rate < 1e-6


def test_capacity_padding_costs_expert_time():
    base = dict(d_model=512, d_hidden=2048, n_experts=64, k=2, n_layers=2, tokens=64 * 1024)
    pod = get_pod("tpu-v4-slice")
    t1 = predict(MoEShape(**base, capacity_factor=1.0), pod, 64, 1).times["experts"]
    t2 = predict(MoEShape(**base, capacity_factor=2.0), pod, 64, 1).times["experts"]
    assert 1.5 * t1 < t2 <= 2.0 * t1  # padded rows double; expert weight traffic does not


def test_dropless_busiest_device_sets_expert_time():
    E, ep = 16, 4
    s = MoEShape(d_model=256, d_hidden=1024, n_experts=E, k=2, n_layers=1, tokens=4 * 4096, capacity_factor=None)
    pod = PodSpec("four", get_pod("h100-node").device, 4, "switch", (4,))
    loads = np.array([8.0] + [1.0] * 15)
    placement = np.repeat(np.arange(ep), E // ep)  # expert 0 (heavy) shares device 0
    skewed = predict(s, pod, ep, 1, expert_loads=loads, placement=placement)
    share0 = (8 + 3) / 23
    assert skewed.imbalance == pytest.approx(share0 * ep)
    assert skewed.expert_rows == math.ceil(4096 * 2 * share0 * ep)
    uniform = predict(s, pod, ep, 1)
    assert uniform.expert_rows == 4096 * 2
    assert skewed.times["experts"] > 1.5 * uniform.times["experts"]
    assert skewed.times["all_to_all"] > uniform.times["all_to_all"]


def test_nesting_moves_the_expert_all_reduce_onto_neighbours():
    s = MoEShape(d_model=256, d_hidden=1024, n_experts=2048, k=2, n_layers=2, tokens=4096 * 64)
    pod = get_pod("tpu-v4-pod")
    ep_in = predict(s, pod, 2048, 2)
    dp_in = predict(s, pod, 2048, 2, ep_inner=False)
    expert_bytes = 4 * 2 * (2 * 256 * 1024 + 1024 + 256)  # one expert per device, 2 layers
    dense = next(op.seconds for op in ep_in.ops if op.name.startswith("dense grads"))
    L = 50e9
    assert ep_in.times["grad_all_reduce"] - dense == pytest.approx(expert_bytes / (2 * L / 8))
    assert dp_in.times["grad_all_reduce"] - dense == pytest.approx(expert_bytes / L)
    assert "DP groups compact" in format_report(dp_in)


def test_uneven_experts_per_device():
    s = MoEShape(d_model=64, d_hidden=128, n_experts=10, k=2, n_layers=1, tokens=4 * 256, capacity_factor=1.0)
    pod = PodSpec("four", get_pod("h100-node").device, 4, "switch", (4,))
    rep = predict(s, pod, 4, 1)
    assert rep.experts_per_device == 3
    assert rep.expert_rows == 3 * 4 * math.ceil(256 * 2 / 10)
    assert any("busiest holds 3" in note for note in rep.notes)


def test_micro_batches_trade_memory_for_time():
    s = MoEShape(d_model=512, d_hidden=2048, n_experts=64, k=2, n_layers=4, tokens=64 * 4096)
    pod = get_pod("tpu-v4-slice")
    full = predict(s, pod, 64, 1)
    quarter = predict(s, pod, 64, 1, tokens_per_device=1024)
    assert quarter.n_micro == 4 and full.n_micro == 1
    assert quarter.memory["activations"] < full.memory["activations"] / 3
    assert quarter.model_flops == full.model_flops


def test_bad_layouts_raise():
    s = MoEShape(d_model=64, d_hidden=128, n_experts=8, k=2, n_layers=1, tokens=1024)
    pod = get_pod("tpu-v4-slice")
    with pytest.raises(ValueError, match="must equal the 64 devices"):
        predict(s, pod, 4, 4)
    with pytest.raises(ValueError, match="ep must be <= n_experts"):
        predict(s, pod, 16, 4)
    with pytest.raises(ValueError, match="tokens_per_device"):
        predict(s, pod, 8, 8, tokens_per_device=17)
    with pytest.raises(ValueError, match="expert_loads"):
        predict(s, pod, 8, 8, expert_loads=np.ones(7))


def test_predict_layer_step_on_a_cpu_like_device():
    dev = DeviceSpec("cpu-like", 1e11, 16 * GiB, 1e10, 0.0, 0, cache_bytes=32 * 2**20)
    out = {}
    for E in (8, 64, 512):
        s = MoEShape(d_model=256, d_hidden=512, n_experts=E, k=2, n_layers=1, tokens=8192, capacity_factor=None)
        out[E] = predict_layer_step(s, dev)
    assert out[8]["rows"] == 8192 * 2
    assert out[8]["weights_fit_in_cache"] and not out[512]["weights_fit_in_cache"]
    # expert matmuls: 3 x 2 x N x d x h, twice
    assert out[8]["ops"]["expert W1"]["flops"] == 3 * 2 * 16384 * 256 * 512
    w512 = 512 * (2 * 256 * 512 + 512 + 256) * 4
    assert out[512]["expert_weight_bytes"] == w512
    w1 = out[512]["ops"]["expert W1"]["bytes"]
    assert w1 == 3 * 4 * (16384 * 256 + 16384 * 512) + 3 * 4 * 512 * (256 * 512 + 512)
    for E in out:
        assert out[E]["total_s"] == pytest.approx(out[E]["router_s"] + out[E]["dispatch_s"] + out[E]["experts_s"])
    assert out[512]["total_s"] > out[8]["total_s"]  # bigger router, weights out of cache


def test_format_report_lists_every_component():
    s = MoEShape(d_model=256, d_hidden=1024, n_experts=16, k=2, n_layers=2, tokens=4096, capacity_factor=None)
    text = format_report(predict(s, get_pod("tpu-v4-slice"), 16, 4))
    for word in (*COMPONENTS, "params", "activations", "capacity_buffers", "MFU", "fits: yes", "dropless"):
        assert word in text

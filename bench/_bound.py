"""The machine's floor for an MoE layer step: phases in data-flow order.

Accounting (the same as the cost model, moe.accel.cost): a phase's bytes are every byte it
must read plus every byte it must write, against the copy bandwidth counted the same way
(bytes read + written per second, moe.accel.devices.copy_bandwidth). FLOPs are against the
measured sgemm peak.

Overlap model: inside one phase, compute and memory traffic overlap fully (the roofline,
max(FLOPs / peak, bytes / bandwidth)); phases that depend on each other add.
- forward, router: the gate GEMM(s) x W_g (and x W_noise) must finish before any expert
  starts, because dropless dispatch must know every row of an expert before that expert's
  weights stream through once.
- forward, experts: W1 and W2 of every expert that got rows are read once; the rows are
  gathered in and combined out.
- backward: the router's two gradient GEMMs (dW_g = x^T dH, dx = dH W_g^T) need only
  dL/dgates, which combine backward gives before any expert's backward runs, so they may
  run alongside the experts' backward: one phase whose compute is both and whose traffic is
  the experts' weights read again plus their gradients written.
This is the most overlap the data flow allows without extra traffic. (With the router
GEMMs and the expert weight streaming as two phases that never overlap, the floor at
E = 4096 would be about a third higher; max() of the two, used before, is too low.)

The router's gradient is counted as dense [T, E]: so it is with any balance loss (our
default) and so ours and every torch peer compute it. Without a balance loss the softmax
top-k gradient has k non-zeros per row, and a sparse router backward could go below this
floor by up to the two gradient GEMMs (`router_backward_flops`).
"""

from __future__ import annotations

from dataclasses import dataclass

F32 = 4


@dataclass(frozen=True)
class Phase:
    name: str
    flops: float
    nbytes: float

    def seconds(self, sgemm: float, copy: float) -> float:
        return max(self.flops / sgemm, self.nbytes / copy)


def floor_seconds(phases: list[Phase], sgemm: float, copy: float) -> float:
    """Sum over phases of each phase's roofline time."""
    return sum(p.seconds(sgemm, copy) for p in phases)


def expert_bytes(active: int, d: int, h: int) -> float:
    """Weights of `active` FFN experts (W1, b1, W2, b2), float32."""
    return float(active * (2 * d * h + h + d) * F32)


def router_backward_flops(T: int, d: int, E: int, gate_matrices: int = 1) -> float:
    return gate_matrices * 2 * 2.0 * T * d * E


def moe_phases(T: int, d: int, h: int, E: int, n_rows: int, active: int, *,
               gate_matrices: int = 1, train: bool = True) -> list[Phase]:
    """Phases of one MoE layer step (module doc). n_rows: dispatched rows N (T k dropless);
    active: experts with at least one row; gate_matrices: 2 for a noisy gate while training."""
    gm = gate_matrices
    weights = expert_bytes(active, d, h)
    rows = n_rows * d * F32  # one [N, d] pass
    router = Phase("router forward", gm * 2.0 * T * d * E,
                   F32 * (T * d + gm * d * E + gm * T * E))  # read x, W; write logits
    experts = Phase("experts forward", 2 * 2.0 * n_rows * d * h,
                    weights + 2 * rows + T * d * F32)  # weights; rows gathered, outputs, y
    phases = [router, experts]
    if train:
        phases.append(Phase(
            "backward (experts + router gradient)",
            4 * 2.0 * n_rows * d * h + router_backward_flops(T, d, E, gm),
            2 * weights + 4 * rows + F32 * (2 * gm * T * E + 2 * gm * d * E + 2 * T * d),
        ))  # weights read, grads written; row gradients; dH read twice, W_g read, dW_g and dx written
    return phases


def ffn_phases(n_rows: int, d: int, h: int, active: int) -> list[Phase]:
    """The grouped FFN alone, forward + backward (bench/kernels.py)."""
    weights = expert_bytes(active, d, h)
    rows = n_rows * d * F32
    return [Phase("ffn forward", 2 * 2.0 * n_rows * d * h, weights + 2 * rows),
            Phase("ffn backward", 4 * 2.0 * n_rows * d * h, 2 * weights + 3 * rows)]

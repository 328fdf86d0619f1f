"""HierarchicalMoELayer (Shazeer et al. 2017, appendix B): gates over groups, then over experts.

y = sum_i sum_j G_primary(x)_i * G_i(x)_j * E_ij(x) over a groups of b experts (E = a*b).
The primary gate is a noisy top-k over the a groups; group i has its own noisy top-k gate
G_i over its b experts. Secondary gates run only on the (example, group) pairs the primary
chose, grouped by a counting sort over groups, so routing costs O((a + k_primary*b) * d)
per example instead of O(a*b*d). The k_primary*k_secondary assignments of each example then
go to one bank of a*b experts (flat expert id i*b + j) through the same dispatch as MoELayer.

Noise order (so an oracle can replay it): one call rng.standard_normal((B, a)) for the
primary, then one call rng.standard_normal((B*k_primary, b)) for the secondary gates, row
x*k_primary + r belonging to example x and its r-th chosen group (best first).

Balance (appendix B), over all a*b entries with the population variance:
  Importance_H[i, j] = sum_x G_primary(x)_i * G_i(x)_j
  Load_H[i, j]       = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|
where X^(i) are the examples the primary sent to group i and Load is Shazeer's smooth
estimator while training (hard counts in eval). When |X^(i)| = 0 the row Load_H[i, :] is 0
and carries no gradient (0/0 is defined as 0). In eval mode Load_H is the hard count of
examples per expert and, as in the flat noisy gate, only the importance term enters aux_loss.

Capacity priority is MoELayer's: assignment column c = r*k_secondary + s (r the group rank,
s the expert rank inside it), all examples' column 0 first, then column 1, ...
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe import bindings
from moe.bindings.plan import DispatchPlan, plan_dispatch
from moe.experts.local import LocalExperts
from moe.experts.protocol import ExpertGroup
from moe.layer import ExpertDispatch, check_expert_group, expert_entries, gate_input
from moe.nn import Joined
from moe.routing.balance import cv_squared
from moe.routing.capacity import validate_capacity_factor
from moe.routing.gates import GroupedTopK, GroupSums, sums_as
from moe.routing.types import Routing


@dataclass
class _Step:
    """What one forward keeps for its backward (pair rows are sorted by group)."""

    x_gate: np.ndarray  # [B, d_in]
    gi: np.ndarray  # [B, kp]  chosen groups
    gp: np.ndarray  # [B, kp]  primary gate values
    si: np.ndarray  # [B, kp, ks]  chosen experts inside each group
    gs: np.ndarray  # [B, kp, ks]  secondary gate values
    groups: DispatchPlan  # the pairs sorted by group; slot [B, kp] -> sorted row
    order: np.ndarray  # [P]  sorted row -> pair id x*kp + r
    sums_p: GroupSums  # the primary gate's sums over the batch (one group)
    sums_s: GroupSums  # the secondary gates' sums, one group per primary group [a, b]
    load_p: np.ndarray | None = None  # [a]
    load_s: np.ndarray | None = None  # [a, b]
    d_imp: np.ndarray | None = None  # [a, b]  d aux / d Importance_H
    d_load: np.ndarray | None = None  # [a, b]  d aux / d Load_H


def hierarchical_balance(
    gp: np.ndarray,
    gs: np.ndarray,
    group_index: np.ndarray,
    expert_index: np.ndarray,
    load_primary: np.ndarray,
    load_secondary: np.ndarray,
    group_sizes: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(Importance_H [a, b], Load_H [a, b]) from the two levels' gates and loads (see module doc).

    gp [B, kp] primary gates, gs [B, kp, ks] secondary gates, group_index [B, kp],
    expert_index [B, kp, ks] (inside the group), load_primary [a], load_secondary [a, b],
    group_sizes [a] = |X^(i)|.
    """
    a, b = load_secondary.shape
    flat = (group_index[:, :, None] * b + expert_index).ravel()  # [B*kp*ks]
    weights = (gp[:, :, None] * gs).ravel()  # [B*kp*ks]
    importance = np.bincount(flat, weights=weights, minlength=a * b).astype(gp.dtype)
    load = (load_primary * _safe_inverse(group_sizes, gp.dtype))[:, None] * load_secondary  # [a, b]
    return importance.reshape(a, b), load.astype(gp.dtype)


def _safe_inverse(n: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """1/n with 1/0 := 0 (an empty group contributes no load and no gradient)."""
    inv = np.zeros(n.shape, dtype=dtype)
    nz = n > 0
    inv[nz] = 1.0 / n[nz]
    return inv


class HierarchicalMoELayer:
    """A two-level sparsely-gated MoE layer with MoELayer's interface (see the module doc).

    n_groups = a, experts_per_group = b; n_experts = a*b and k = k_primary*k_secondary in the
    Routing record. params: "primary.w_gate"/"primary.w_noise" [d_in, a],
    "secondary.w_gate"/"secondary.w_noise" [a, d_in, b] (all zero at start, as Shazeer's),
    and "experts.*" when the experts are local. d_in = d_model + d_gate_extra.
    `secondary_gate_rows` counts rows through the secondary gate matmuls (forward), so a
    test can check the router never touches a*b logits per example.
    """

    def __init__(
        self,
        d_model: int,
        n_groups: int,
        experts_per_group: int,
        d_hidden: int,
        k_primary: int = 2,
        k_secondary: int = 2,
        capacity_factor: float | None = None,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        *,
        rng: np.random.Generator,
        d_gate_extra: int = 0,
        activation: str = "relu",
        dtype: np.dtype = np.float32,
        experts: ExpertGroup | None = None,
    ) -> None:
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        a, b = n_groups, experts_per_group
        if a < 1 or b < 1:
            raise ValueError(f"n_groups and experts_per_group must be >= 1, got {a} and {b}")
        if not 1 <= k_primary <= a:
            raise ValueError(f"k_primary must be in [1, n_groups={a}], got {k_primary}")
        if not 1 <= k_secondary <= b:
            raise ValueError(f"k_secondary must be in [1, experts_per_group={b}], got {k_secondary}")
        if d_model < 1 or d_hidden < 1 or d_gate_extra < 0:
            raise ValueError(
                f"need d_model >= 1, d_hidden >= 1, d_gate_extra >= 0, got {d_model}, {d_hidden}, {d_gate_extra}"
            )
        for name, w in (("w_importance", w_importance), ("w_load", w_load)):
            if not (np.isfinite(w) and w >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {w}")
        validate_capacity_factor(capacity_factor)
        self.d_model, self.d_hidden, self.d_gate_extra = d_model, d_hidden, d_gate_extra
        self.n_groups, self.experts_per_group = a, b
        self.k_primary, self.k_secondary = k_primary, k_secondary
        self.n_experts, self.k = a * b, k_primary * k_secondary
        self.capacity_factor = capacity_factor
        self.w_importance, self.w_load = float(w_importance), float(w_load)
        self.dtype = np.dtype(dtype)
        self.rng = rng
        d_in = d_model + d_gate_extra
        self.params: dict[str, np.ndarray] = {
            "primary.w_gate": np.zeros((d_in, a), dtype=self.dtype),
            "primary.w_noise": np.zeros((d_in, a), dtype=self.dtype),
            "secondary.w_gate": np.zeros((a, d_in, b), dtype=self.dtype),
            "secondary.w_noise": np.zeros((a, d_in, b), dtype=self.dtype),
        }
        self._gate_grads = {n: np.zeros_like(p) for n, p in self.params.items()}
        if experts is None:
            experts = LocalExperts(a * b, d_model, d_hidden, activation=activation, rng=rng, dtype=self.dtype)
        self.set_experts(experts)
        self.primary = GroupedTopK(k_primary, a)
        self.secondary = GroupedTopK(k_secondary, b)
        self.dispatch = ExpertDispatch(capacity_factor, self.dtype)
        self.grad_task_emb: np.ndarray | None = None
        self.secondary_gate_rows = 0
        self._touched_groups = np.zeros(0, dtype=np.int64)  # groups whose secondary grads are non-zero
        self._cache = None

    def set_experts(self, experts: ExpertGroup) -> None:
        """Use this expert group (local bank or remote shards) of a*b experts of width d_model."""
        check_expert_group(experts, self.n_experts, self.d_model)
        self.experts = experts
        for n in [n for n in self.params if n.startswith("experts.")]:
            del self.params[n]
        params, grads = expert_entries(experts)
        self.params.update(params)
        self.grads = Joined([("", self._gate_grads), ("experts.", grads)])

    @property
    def gate_param_names(self) -> list[str]:
        return [n for n in self.params if not n.startswith("experts.")]

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: np.ndarray,
        task_emb: np.ndarray | None = None,
        train: bool = True,
        rng: np.random.Generator | None = None,
        grad: bool | None = None,
    ) -> tuple[np.ndarray, Routing]:
        """x [B, d_model] (+ task_emb [B, d_gate_extra]) -> (y [B, d_model], Routing over a*b experts).

        grad: keep what backward needs (default: when training), as MoELayer.forward."""
        keep = train if grad is None else grad
        x_gate = gate_input(x, task_emb, self.d_model, self.d_gate_extra, self.dtype)  # [B, d_in]
        st = self._route(x_gate, train, rng if rng is not None else self.rng)
        importance, load, aux = self._balance(st, train)  # [a, b], [a, b], float
        B, b = x.shape[0], self.experts_per_group
        expert_index = (st.gi[:, :, None] * b + st.si).reshape(B, self.k).astype(np.int32)  # [B, k]
        gates = (st.gp[:, :, None] * st.gs).reshape(B, self.k)  # [B, k] before capacity
        y, plan, kept = self.dispatch.forward(x, expert_index, gates, self.experts, keep)  # [B, d], _, [B, k]
        self._cache = st if keep else None
        routing = Routing(
            expert_index=expert_index,
            gates=kept,
            importance=importance.ravel(),
            load=load.ravel(),
            counts=plan.counts,
            dropped=plan.dropped,
            aux_loss=float(aux),
        )
        return y, routing

    def _route(self, x_gate: np.ndarray, train: bool, rng: np.random.Generator) -> _Step:
        """Primary gate on every example, then each chosen group's gate on its pairs only."""
        B, a, b, kp = x_gate.shape[0], self.n_groups, self.experts_per_group, self.k_primary
        p = self.params
        eps_p = eps_s = None
        if train:
            eps_p = rng.standard_normal((B, a), dtype=self.dtype)  # [B, a]
            eps_s = rng.standard_normal((B * kp, b), dtype=self.dtype)  # [P, b] pair-major
        gi, gp, sums_p = self.primary.forward(
            x_gate, p["primary.w_gate"][None], p["primary.w_noise"][None], np.array([0, B]), eps_p
        )  # [B, kp] x2, sums over [1, a]
        groups = plan_dispatch(gi, a, -1)  # counting sort of the pairs by group
        pair_slot = groups.slot.ravel()  # [P]  sorted row of pair x*kp + r
        order = _inverse(pair_slot)  # [P]  sorted row -> pair id
        xs = bindings.gather_rows(x_gate, groups.src_row)  # [P, d_in]
        if train:
            eps_s = eps_s[order]  # [P, b]  the noise follows its pair
        # each chosen group's gate on its own contiguous slice of pair rows: O(P * d_in * b)
        si, gs, sums_s = self.secondary.forward(
            xs, p["secondary.w_gate"], p["secondary.w_noise"], groups.offsets, eps_s
        )  # [P, ks] x2, sums over [a, b]
        self.secondary_gate_rows += int(xs.shape[0])
        shape = (B, kp, self.k_secondary)
        return _Step(
            x_gate=x_gate, gi=gi, gp=gp, si=si[pair_slot].reshape(shape), gs=gs[pair_slot].reshape(shape),
            groups=groups, order=order, sums_p=sums_p, sums_s=sums_s,
        )

    def _balance(self, st: _Step, train: bool) -> tuple[np.ndarray, np.ndarray, float]:
        """Importance_H, Load_H [a, b] and the weighted loss; keeps their gradients in st."""
        a, b = self.n_groups, self.experts_per_group
        sizes = st.groups.counts  # [a]
        if train:
            st.load_p = sums_as(st.sums_p.load[0], self.dtype)  # [a]
            st.load_s = sums_as(st.sums_s.load, self.dtype)  # [a, b]; 0 for an empty group
        else:
            st.load_p = sizes.astype(self.dtype)  # [a]
            st.load_s = st.sums_s.counts.astype(self.dtype)  # [a, b]
        importance, load = hierarchical_balance(st.gp, st.gs, st.gi, st.si, st.load_p, st.load_s, sizes)
        if not train:
            load = st.load_s  # hard counts per expert exactly (Load_p = |X^(i)| cancels)
        aux = 0.0
        if self.w_importance > 0:
            cv2, g = cv_squared(importance.ravel())
            aux += self.w_importance * cv2
            st.d_imp = (self.w_importance * g).reshape(a, b)  # [a, b]
        if train and self.w_load > 0:
            cv2, g = cv_squared(load.ravel())
            aux += self.w_load * cv2
            st.d_load = (self.w_load * g).reshape(a, b)  # [a, b]
        return importance, load, aux

    # ------------------------------------------------------------------ backward
    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy [B, d_model] -> dx [B, d_model]; includes the aux-loss gradient, fills grads.

        The task-embedding gradient (when routing on one) is left in `grad_task_emb`.
        """
        if self._cache is None:
            raise ValueError("backward called before forward (or twice for one forward, or after a "
                             "forward with grad=False: train=False forwards need grad=True)")
        st = self._cache
        B = st.x_gate.shape[0]
        if dy.shape != (B, self.d_model) or dy.dtype != self.dtype:
            raise ValueError(
                f"dy must be {self.dtype} [{B}, {self.d_model}], got {dy.dtype} {list(dy.shape)}"
            )
        self._cache = None
        dx, d_gates = self.dispatch.backward(dy)  # [B, d], [B, k]
        d_comb = d_gates.reshape(st.gs.shape)  # [B, kp, ks]  dL/d(gp * gs)
        if st.d_imp is not None:
            d_comb = d_comb + st.d_imp[st.gi[:, :, None], st.si]  # importance sums gp * gs
        with np.errstate(under="ignore"):
            d_gp = (d_comb * st.gs).sum(axis=2)  # [B, kp]
            d_gs = (d_comb * st.gp[:, :, None]).reshape(-1, self.k_secondary)  # [P, ks] pair-major
        dp_p = dp_s = None
        if st.d_load is not None:  # Load_H = Load_p_i * Load_s_ij / |X^(i)|
            inv = _safe_inverse(st.groups.counts, self.dtype)  # [a]
            dp_p = ((st.d_load * st.load_s).sum(axis=1) * inv)[None]  # [1, a]  the same for every x
            dp_s = st.d_load * (st.load_p * inv)[:, None]  # [a, b]  the same for a group's rows
        g = self.grads
        gg, gn = g["secondary.w_gate"], g["secondary.w_noise"]
        # only groups used in the last or this step are written, so an idle group costs nothing
        gg[self._touched_groups] = 0
        gn[self._touched_groups] = 0
        self._touched_groups = np.flatnonzero(st.groups.counts)  # [a_act]
        dxs = self.secondary.backward(d_gs[st.order], d_load=dp_s, dw_gate=gg, dw_noise=gn)  # [P, d_in]
        ones = np.ones(st.groups.slot.shape, dtype=self.dtype)  # [B, kp]
        dx_gate = bindings.combine(dxs, st.groups.slot, ones)  # [B, d_in]  sum over the pairs
        dx_gate += self.primary.backward(
            d_gp, d_load=dp_p, dw_gate=g["primary.w_gate"][None], dw_noise=g["primary.w_noise"][None]
        )  # [B, d_in]
        dx += dx_gate[:, : self.d_model]
        self.grad_task_emb = dx_gate[:, self.d_model :] if self.d_gate_extra else None
        return dx


def _inverse(perm: np.ndarray) -> np.ndarray:
    """The inverse permutation: here sorted row -> pair id from pair id -> sorted row."""
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    return inv

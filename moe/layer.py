"""MoELayer: gate -> dispatch -> experts -> combine, with its exact backward.

y = sum_j G(x)_j * E_{i_j}(x) over the k experts chosen for x (gates zeroed where capacity
dropped the assignment). The layer does not know where its experts run: any ExpertGroup
(LocalExperts in this process, RemoteExperts on shard servers) will do.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from moe import bindings
from moe.bindings.plan import DispatchPlan, plan_dispatch
from moe.experts.local import LocalExperts
from moe.experts.protocol import ExpertGroup
from moe.nn import Joined
from moe.routing.balanced import balanced_capacity, balanced_topk
from moe.routing.capacity import expert_capacity, validate_capacity_factor
from moe.routing.gates import GATE_TYPES, make_gate, softmax, tiled_matmul
from moe.routing.types import Routing


def check_input(x: np.ndarray, width: int, dtype: np.dtype, name: str = "x") -> None:
    """Refuse what would silently go wrong: wrong rank, width, dtype, or non-finite values."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [batch, {width}], got shape {list(x.shape)}")
    if x.shape[1] != width:
        raise ValueError(f"{name} must have width {width}, got {x.shape[1]}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one example, got 0")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")


def check_expert_group(experts: ExpertGroup, n_experts: int, d_model: int) -> None:
    if experts.n_experts != n_experts or experts.d_model != d_model:
        raise ValueError(
            f"expert group has {experts.n_experts} experts of width {experts.d_model}, "
            f"layer expects {n_experts} of width {d_model}"
        )


def expert_entries(experts: ExpertGroup) -> tuple[dict[str, np.ndarray], Mapping[str, np.ndarray]]:
    """A layer's "experts.*" params, and the experts' own grads mapping (unprefixed; its dense
    arrays are built only when read): local experts expose their arrays, remote ones none."""
    if not hasattr(experts, "params"):
        return {}, {}
    return {f"experts.{n}": p for n, p in experts.params.items()}, experts.grads


def gate_input(
    x: np.ndarray,
    task_emb: np.ndarray | None,
    d_model: int,
    d_gate_extra: int,
    dtype: np.dtype,
    route_on_x: bool = True,
) -> np.ndarray:
    """Check x (and the task embedding when the gate routes on one); return the gate's input."""
    check_input(x, d_model, dtype)
    if d_gate_extra:
        if task_emb is None:
            raise ValueError(f"this layer routes on a task embedding of width {d_gate_extra}; got none")
        check_input(task_emb, d_gate_extra, dtype, "task_emb")
        if task_emb.shape[0] != x.shape[0]:
            raise ValueError(f"task_emb must have {x.shape[0]} rows like x, got {task_emb.shape[0]}")
        return np.concatenate([x, task_emb], axis=1) if route_on_x else task_emb  # [B, d_in]
    if task_emb is not None:
        raise ValueError("task_emb given, but the layer was built with d_gate_extra=0")
    return x


class ExpertDispatch:
    """The flat path after the gate: capacity, counting sort, gather, experts, combine.

    One object with forward/backward, shared by MoELayer and HierarchicalMoELayer.
    """

    def __init__(self, capacity_factor: float | None, dtype: np.dtype) -> None:
        validate_capacity_factor(capacity_factor)
        self.capacity_factor, self.dtype = capacity_factor, np.dtype(dtype)
        self._cache = None

    def forward(
        self, x: np.ndarray, expert_index: np.ndarray, gates: np.ndarray, experts: ExpertGroup,
        keep: bool = True,
    ) -> tuple[np.ndarray, DispatchPlan, np.ndarray]:
        """x [B, d], expert_index/gates [B, k] -> (y [B, d], plan, gates after capacity [B, k]).

        The experts are passed per call, so a layer may swap its expert group between steps.
        keep=False: no backward follows, so nothing is kept for one (here or in the experts).
        """
        B, k = expert_index.shape
        E = experts.n_experts
        plan = plan_dispatch(expert_index, E, expert_capacity(self.capacity_factor, B, k, E))
        kept = np.where(plan.keep, gates, 0).astype(self.dtype)  # [B, k]
        packed = bindings.gather_rows(x, plan.src_row)  # [N, d]
        out = experts.forward(packed, plan.offsets, keep=keep)  # [N, d]
        y = bindings.combine(out, plan.slot, kept)  # [B, d]
        self._cache = (plan, kept, out, experts) if keep else None
        return y, plan, kept

    def backward(self, dy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """dy [B, d] -> (dx [B, d] through the experts, d_gates [B, k]; 0 where dropped)."""
        if self._cache is None:
            raise ValueError("dispatch backward called before a forward that keeps what it needs")
        plan, kept, out, experts = self._cache
        self._cache = None
        d_out, d_gates = bindings.combine_backward(dy, out, plan.slot, kept)  # [N, d], [B, k]
        d_packed = experts.backward(d_out)  # [N, d]
        dx = bindings.combine(d_packed, plan.slot, plan.keep.astype(self.dtype))  # [B, d]
        return dx, d_gates


class MoELayer:
    """A sparsely-gated mixture-of-experts layer (Shazeer et al. 2017).

    gate: "noisy_topk" (default), "softmax_topk" or "top1". capacity_factor=None is
    dropless; otherwise each expert takes C = ceil(cf * B * k / E) rows and the rest are
    dropped. d_gate_extra > 0 lets forward take a task embedding that is concatenated to x
    for the gate only; route_on_x=False makes the gate see the task embedding alone.
    params/grads cover the gate and, when local, the experts.
    """

    def __init__(
        self,
        d_model: int,
        n_experts: int,
        d_hidden: int,
        k: int = 2,
        gate: str = "noisy_topk",
        capacity_factor: float | None = None,
        w_importance: float = 0.1,
        w_load: float = 0.1,
        *,
        rng: np.random.Generator,
        w_z: float = 0.0,
        d_gate_extra: int = 0,
        route_on_x: bool = True,
        activation: str = "relu",
        dtype: np.dtype = np.float32,
        experts: ExpertGroup | None = None,
    ) -> None:
        if not isinstance(rng, np.random.Generator):
            raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}")
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if not 1 <= k <= n_experts:
            raise ValueError(f"k must be in [1, n_experts={n_experts}], got {k}")
        if gate not in GATE_TYPES:
            raise ValueError(f"gate must be one of {GATE_TYPES}, got {gate!r}")
        if gate == "top1" and k != 1:
            raise ValueError(f"gate 'top1' routes to one expert, got k={k}")
        if d_model < 1 or d_hidden < 1 or d_gate_extra < 0:
            raise ValueError(
                f"need d_model >= 1, d_hidden >= 1, d_gate_extra >= 0, got {d_model}, {d_hidden}, {d_gate_extra}"
            )
        if not route_on_x and d_gate_extra < 1:
            raise ValueError(f"route_on_x=False needs a task embedding (d_gate_extra >= 1), got {d_gate_extra}")
        validate_capacity_factor(capacity_factor)
        self.d_model, self.n_experts, self.d_hidden, self.k = d_model, n_experts, d_hidden, k
        self.capacity_factor, self.d_gate_extra = capacity_factor, d_gate_extra
        self.route_on_x = route_on_x
        self._d_gate_x = d_model if route_on_x else 0  # columns of the gate input taken from x
        self.dtype = np.dtype(dtype)
        self.rng = rng
        self.gate_name = gate
        self.gate = make_gate(
            gate, self._d_gate_x + d_gate_extra, n_experts, k,
            w_importance=w_importance, w_load=w_load, w_z=w_z, rng=rng, dtype=self.dtype,
        )
        if experts is None:
            experts = LocalExperts(
                n_experts, d_model, d_hidden, activation=activation, rng=rng, dtype=self.dtype
            )
        else:
            check_expert_group(experts, n_experts, d_model)
        self.experts = experts
        self.dispatch = ExpertDispatch(capacity_factor, self.dtype)
        self._dropless = ExpertDispatch(None, self.dtype)  # for balanced routing (never drops)
        self._collect()
        self.grad_task_emb: np.ndarray | None = None
        self._cache = None

    def _collect(self) -> None:
        params, grads = expert_entries(self.experts)
        self.params: dict[str, np.ndarray] = {**{f"gate.{n}": p for n, p in self.gate.params.items()}, **params}
        self.grads: Mapping[str, np.ndarray] = Joined([("gate.", self.gate.grads), ("experts.", grads)])

    def set_experts(self, experts: ExpertGroup) -> None:
        """Swap in another expert group of the same shape (e.g. remote shards holding the same weights)."""
        check_expert_group(experts, self.n_experts, self.d_model)
        self.experts = experts
        self._collect()

    def grow_experts(self, m: int, *, rng: np.random.Generator) -> None:
        """Append m fresh experts. Old gate columns and experts are kept bit for bit; new gate
        columns start as a fresh gate of this type would (zero for noisy top-k)."""
        if m < 1:
            raise ValueError(f"grow_experts needs m >= 1, got {m}")
        if not isinstance(self.experts, LocalExperts):
            raise ValueError("only local experts can be grown in place")
        old, E = self.gate, self.n_experts
        self.gate = make_gate(
            self.gate_name, old.d_in, E + m, self.k, w_importance=old.w_importance,
            w_load=old.w_load, w_z=old.w_z, rng=rng, dtype=self.dtype,
        )
        self.gate.noise_scale = old.noise_scale  # the run's noise schedule carries on
        for n, p in old.params.items():
            self.gate.params[n][:, :E] = p
        self.experts = self.experts.grown(m, rng=rng)
        self.n_experts = E + m
        self._collect()

    def keep_experts(self, n: int) -> None:
        """Keep only the first n experts and their gate columns (undoes grow_experts)."""
        if not self.k <= n <= self.n_experts:
            raise ValueError(f"keep_experts needs k={self.k} <= n <= {self.n_experts}, got {n}")
        if not isinstance(self.experts, LocalExperts):
            raise ValueError("only local experts can be shrunk in place")
        old = self.gate
        self.gate = make_gate(
            self.gate_name, old.d_in, n, self.k, w_importance=old.w_importance,
            w_load=old.w_load, w_z=old.w_z, rng=np.random.default_rng(0), dtype=self.dtype,
        )  # every weight is overwritten below
        self.gate.noise_scale = old.noise_scale
        for name, p in old.params.items():
            self.gate.params[name][...] = p[:, :n]
        self.experts = self.experts.first(n)
        self.n_experts = n
        self._collect()

    @property
    def gate_param_names(self) -> list[str]:
        return [n for n in self.params if n.startswith("gate.")]

    def forward(
        self,
        x: np.ndarray,
        task_emb: np.ndarray | None = None,
        train: bool = True,
        rng: np.random.Generator | None = None,
        grad: bool | None = None,
        routing: str = "topk",
        balance_factor: float = 1.25,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, Routing]:
        """x [B, d_model] (+ task_emb [B, d_gate_extra]) -> (y [B, d_model], Routing).

        grad: keep what backward needs (default: when training). An inference forward
        (train=False) keeps nothing, so it costs the weights plus this batch's activations.
        allowed (bool [B, E], optional): the experts each row may be routed to (experts grown
        for one task are closed to the others); None: every expert.

        routing="balanced" seats each example on k experts with at most
        ceil(balance_factor * B * k / E) examples per expert (moe.routing.balanced) instead of
        the gate's top-k; the layer's capacity factor does not apply then (nothing is dropped).
        With grad (training) the gate runs on those seats (`_seats`), so backward is the gate's
        own; without, no gate state is kept."""
        keep = train if grad is None else grad
        x_gate = gate_input(
            x, task_emb, self.d_model, self.d_gate_extra, self.dtype, self.route_on_x
        )  # [B, d_in]
        if routing == "balanced":
            if allowed is not None:  # its seats would put rows on experts closed to them
                raise ValueError("balanced routing does not support experts closed to some tasks (grown by add-task)")
            if not keep:
                return self._forward_balanced(x, x_gate, train, balance_factor)
            allowed = self._seats(x_gate, balance_factor)  # train through the balanced seats
        elif routing != "topk":
            raise ValueError(f"routing must be 'topk' or 'balanced', got {routing!r}")
        g = self.gate.forward(x_gate, train=train, rng=rng if rng is not None else self.rng, allowed=allowed,
                              keep=keep)
        y, plan, gates = self.dispatch.forward(x, g.expert_index, g.gates, self.experts, keep)  # [B, d], _, [B, k]
        self._cache = x.shape[0] if keep else None
        routing = Routing(
            expert_index=g.expert_index,
            gates=gates,
            importance=g.importance,
            load=g.load,
            counts=plan.counts,
            dropped=plan.dropped,
            aux_loss=g.aux_loss,
        )
        return y, routing

    def _seats(self, x_gate: np.ndarray, factor: float) -> np.ndarray:
        """bool [B, E]: each row's k balanced seats (moe.routing.balanced on the clean logits).
        Trained through as `allowed`: the gate's top-k among exactly these k experts is them,
        its gates are the softmax over their logits, and backward is the top-k gate's own, so
        the model learns to work on the experts a balanced assignment gives it (BASE layers
        train on their assignment the same way)."""
        B, E, k = x_gate.shape[0], self.n_experts, self.k
        clean = tiled_matmul(x_gate, self.gate.params["w_gate"])  # [B, E]
        index = balanced_topk(clean, k, balanced_capacity(factor, B, k, E))  # [B, k]
        seats = np.zeros((B, E), dtype=bool)
        np.put_along_axis(seats, index.astype(np.int64), True, axis=1)
        return seats

    def _forward_balanced(self, x: np.ndarray, x_gate: np.ndarray, train: bool, factor: float):
        """The balanced seats without any gate state (by the clean logits: no noise)."""
        B, E, k = x.shape[0], self.n_experts, self.k
        clean = tiled_matmul(x_gate, self.gate.params["w_gate"])  # [B, E], as the top-k gate computes it
        index = balanced_topk(clean, k, balanced_capacity(factor, B, k, E))  # [B, k]
        chosen = np.take_along_axis(clean, index, axis=1)  # [B, k]
        gates = softmax(chosen.copy()) if k > 1 else np.take_along_axis(softmax(clean.copy()), index, axis=1)
        y, plan, _ = self._dropless.forward(x, index, gates, self.experts, keep=False)  # [B, d]
        self._cache = None  # no backward through an inference routing
        importance = np.bincount(index.ravel(), weights=gates.ravel(), minlength=E).astype(self.dtype)
        return y, Routing(expert_index=index, gates=gates, importance=importance,
                          load=plan.counts.astype(self.dtype), counts=plan.counts, dropped=0, aux_loss=0.0)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """dy [B, d_model] -> dx [B, d_model]; includes the aux-loss gradient, fills grads.

        The task-embedding gradient (when routing on one) is left in `grad_task_emb`.
        """
        if self._cache is None:
            raise ValueError("backward called before forward (or twice for one forward, or after a "
                             "forward with grad=False: train=False forwards need grad=True)")
        B = self._cache
        if dy.shape != (B, self.d_model) or dy.dtype != self.dtype:
            raise ValueError(
                f"dy must be {self.dtype} [{B}, {self.d_model}], got {dy.dtype} {list(dy.shape)}"
            )
        self._cache = None
        dx, d_gates = self.dispatch.backward(dy)  # [B, d], [B, k]
        dx_gate = self.gate.backward(d_gates)  # [B, d + d_t]; dropped gates get 0 via d_gates
        if self.route_on_x:
            dx += dx_gate[:, : self._d_gate_x]
        self.grad_task_emb = dx_gate[:, self._d_gate_x :] if self.d_gate_extra else None
        return dx

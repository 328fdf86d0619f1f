"""The size of a multitask MoE model and its training step, as the cost model sees it.

MoEShape is a plain record of widths and counts: nothing here allocates arrays. The
parameter inventory (`param_groups`) is the single place that says which tensors the model
holds, so parameter counts, optimizer state and gradient traffic all derive from one list.

Model assumed (the `moe` design): per-task input adapters Linear(d_in -> d_model); L pre-norm
residual MoE blocks, each LayerNorm -> gate Linear(d_model + d_task_emb -> E) without bias
(Shazeer 2017's W_g; "noisy_topk" adds W_noise of the same size) -> top-k dispatch -> E FFN
experts (W1 [d, h], b1 [h], W2 [h, d], b2 [d]) -> weighted combine; per-task heads
Linear(d_model -> n_out). A task embedding table [n_tasks, d_task_emb] feeds the gate.
No final LayerNorm is modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GATES = ("noisy_topk", "softmax_topk", "top1")
OPTIMIZERS = ("adam", "sgd", "adafactor")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


@dataclass(frozen=True)
class ParamGroup:
    """`copies` tensors of shape `shape`; `expert` says whether they are sharded over EP."""

    name: str
    shape: tuple[float, ...]
    copies: int
    expert: bool

    @property
    def numel(self) -> float:
        return float(math.prod(self.shape)) * self.copies

    @property
    def adafactor_state(self) -> float:
        """Adafactor's factored second moment: rows + cols per matrix, full size for vectors
        (Shazeer & Stern 2018, "Adafactor", Alg. 4; no first moment, beta1 = 0)."""
        if len(self.shape) == 2:
            return float(self.shape[0] + self.shape[1]) * self.copies
        return self.numel


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MoEShape.{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"MoEShape.{name} must be >= {minimum}, got {value}")


def _check_width(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"MoEShape.{name} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"MoEShape.{name} must be a finite number > 0, got {value}")


@dataclass(frozen=True)
class MoEShape:
    """Widths and counts of the model plus the global batch of one training step.

    capacity_factor None means dropless routing; buffers are then sized as for 1.0 and the
    cost model sizes the busiest expert device by its real load (see `effective_capacity_factor`).
    d_in and n_out are means over tasks, so they may be fractional.
    """

    d_model: int
    d_hidden: int
    n_experts: int
    k: int
    n_layers: int
    tokens: int
    capacity_factor: float | None = 1.25
    d_in: float = 64.0
    n_out: float = 10.0
    n_tasks: int = 1
    d_task_emb: int = 0
    gate: str = "noisy_topk"
    bytes_per_param: int = 4
    optimizer: str = "adam"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("d_model", "d_hidden", "n_experts", "k", "n_layers", "tokens", "n_tasks"):
            _check_int(name, getattr(self, name), 1)
        _check_int("d_task_emb", self.d_task_emb, 0)
        _check_width("d_in", self.d_in)
        _check_width("n_out", self.n_out)
        if self.k > self.n_experts:
            raise ValueError(f"MoEShape.k must be <= n_experts ({self.n_experts}), got {self.k}")
        if self.gate not in GATES:
            raise ValueError(f"MoEShape.gate must be one of {GATES}, got {self.gate!r}")
        if self.gate == "top1" and self.k != 1:
            raise ValueError(f"MoEShape.gate 'top1' needs k == 1, got k = {self.k}")
        if self.capacity_factor is not None:
            _check_width("capacity_factor", self.capacity_factor)
        if self.bytes_per_param not in (2, 4):
            raise ValueError(f"MoEShape.bytes_per_param must be 2 or 4, got {self.bytes_per_param!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"MoEShape.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"MoEShape.dtype must be one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def dropless(self) -> bool:
        return self.capacity_factor is None

    @property
    def effective_capacity_factor(self) -> float:
        """Dropless routing is treated as capacity factor 1.0 for buffer sizing."""
        return 1.0 if self.capacity_factor is None else float(self.capacity_factor)

    @property
    def act_bytes(self) -> int:
        """Bytes per activation element (the compute dtype)."""
        return DTYPE_BYTES[self.dtype]

    @property
    def gate_in(self) -> int:
        return self.d_model + self.d_task_emb

    @property
    def gate_matrices(self) -> int:
        """noisy top-k keeps W_g and W_noise; the other gates only W_g."""
        return 2 if self.gate == "noisy_topk" else 1

    @property
    def expert_params_each(self) -> int:
        """One FFN expert: W1 [d, h] + b1 [h] + W2 [h, d] + b2 [d]."""
        d, h = self.d_model, self.d_hidden
        return 2 * d * h + h + d

    def capacity(self, tokens: int) -> int:
        """GShard capacity per expert for a group of `tokens`: ceil(cf * tokens * k / E)."""
        return math.ceil(self.effective_capacity_factor * tokens * self.k / self.n_experts)

    def param_groups(self) -> list[ParamGroup]:
        """Every parameter tensor of the model, grouped by kind."""
        d, h, E, L, T = self.d_model, self.d_hidden, self.n_experts, self.n_layers, self.n_tasks
        groups = [
            ParamGroup("adapter.W", (self.d_in, d), T, False),
            ParamGroup("adapter.b", (d,), T, False),
            ParamGroup("block.ln.gamma_beta", (d,), 2 * L, False),
            ParamGroup("block.gate.W", (self.gate_in, E), self.gate_matrices * L, False),
            ParamGroup("expert.W1", (d, h), L * E, True),
            ParamGroup("expert.b1", (h,), L * E, True),
            ParamGroup("expert.W2", (h, d), L * E, True),
            ParamGroup("expert.b2", (d,), L * E, True),
            ParamGroup("head.W", (d, self.n_out), T, False),
            ParamGroup("head.b", (self.n_out,), T, False),
        ]
        if self.d_task_emb > 0:
            groups.append(ParamGroup("task_emb", (T, self.d_task_emb), 1, False))
        return groups

    @property
    def dense_params(self) -> int:
        """Parameters replicated on every device (everything but the experts)."""
        return round(sum(g.numel for g in self.param_groups() if not g.expert))

    @property
    def expert_params(self) -> int:
        """Parameters of all experts of all layers (sharded over EP)."""
        return round(sum(g.numel for g in self.param_groups() if g.expert))

    @property
    def total_params(self) -> int:
        return self.dense_params + self.expert_params

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through: one adapter, per layer the LayerNorm, the
        gate matrices and k experts, one head. The task-embedding lookup does no FLOPs and is
        left out (the usual convention for embeddings, Kaplan et al. 2020)."""
        d = self.d_model
        adapter = self.d_in * d + d
        head = d * self.n_out + self.n_out
        per_layer = 2 * d + self.gate_matrices * self.gate_in * self.n_experts
        per_layer += self.k * self.expert_params_each
        return round(adapter + head + self.n_layers * per_layer)

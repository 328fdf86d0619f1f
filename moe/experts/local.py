"""LocalExperts: the in-process ExpertGroup, an FFN bank plus its own optimizer state."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe.experts import state
from moe.experts.ffn import FFNExperts
from moe.optim import Adam, AdamConfig


class LocalExperts:
    """Experts that live in this process. Implements the ExpertGroup protocol.

    The optimizer is lazy Adam by default: only experts that received rows are updated
    (see moe.optim); `lazy=False` gives dense Adam for comparison.
    """

    def __init__(
        self,
        n_experts: int,
        d_model: int,
        d_hidden: int,
        *,
        activation: str = "relu",
        rng: np.random.Generator,
        dtype: np.dtype = np.float32,
        adam: AdamConfig | None = None,
        lazy: bool = True,
    ) -> None:
        self.bank = FFNExperts(
            n_experts, d_model, d_hidden, activation=activation, rng=rng, dtype=dtype
        )
        self.n_experts, self.d_model, self.d_hidden = n_experts, d_model, d_hidden
        self.params, self.grads = self.bank.params, self.bank.grads
        self.lazy, self.activation, self.dtype = lazy, activation, np.dtype(dtype)
        self.optimizer = Adam(self.params, adam or AdamConfig(), lazy_rows=lazy)

    def grown(self, m: int, *, rng: np.random.Generator) -> LocalExperts:
        """A copy with m fresh experts appended; weights and optimizer state of the old ones kept."""
        E = self.n_experts
        new = LocalExperts(
            E + m, self.d_model, self.d_hidden, activation=self.activation, rng=rng,
            dtype=self.dtype, adam=self.optimizer.config, lazy=self.lazy,
        )
        for n, p in self.params.items():
            new.params[n][:E] = p
            new.optimizer.m[n][:E] = self.optimizer.m[n]
            new.optimizer.v[n][:E] = self.optimizer.v[n]
        if self.lazy:
            new.optimizer.t[:E] = self.optimizer.t
        else:
            new.optimizer.t[...] = self.optimizer.t
        return new

    def first(self, n: int) -> LocalExperts:
        """A copy holding only the first n experts, with their weights and optimizer state."""
        new = LocalExperts(
            n, self.d_model, self.d_hidden, activation=self.activation, rng=np.random.default_rng(0),
            dtype=self.dtype, adam=self.optimizer.config, lazy=self.lazy,
        )  # every weight is overwritten below
        for name, p in self.params.items():
            new.params[name][...] = p[:n]
            new.optimizer.m[name][...] = self.optimizer.m[name][:n]
            new.optimizer.v[name][...] = self.optimizer.v[name][:n]
        new.optimizer.t[...] = self.optimizer.t[:n] if self.lazy else self.optimizer.t
        return new

    def forward(self, packed: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return self.bank.forward(packed, offsets)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return self.bank.backward(grad_out)

    def expert_sq_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float64 squared grad norm of each expert that received rows), ids ascending.

        Summing these in id order gives the same bits wherever the experts live.
        """
        t = self.bank.touched
        sq = np.zeros(t.shape[0], dtype=np.float64)
        for n in state.PARAM_NAMES:
            g = self.grads[n][t].reshape(t.shape[0], -1)  # [n_touched, size]
            # float64 accumulation without a float64 copy; numpy's own loop, so the bits do
            # not depend on BLAS threads (shards and coordinator must agree)
            sq += np.einsum("ij,ij->i", g, g, dtype=np.float64)
        return t, sq

    def grad_sq_norm(self) -> float:
        return float(np.sum(self.expert_sq_norms()[1]))

    def apply_update(self, lr: float, grad_scale: float = 1.0) -> None:
        if self.lazy:
            self.optimizer.step(self.grads, lr, grad_scale, rows=self.bank.touched)
        else:
            self.optimizer.step(self.grads, lr, grad_scale)

    def save_part(self, folder: Path, layer: int) -> dict[str, dict]:
        """Write this group's experts (params + Adam state) into a checkpoint being assembled."""
        ids = np.arange(self.n_experts)
        fname = f"experts-l{layer}.safetensors"
        rows = state.export_rows(self.params, self.optimizer, ids, ids)
        return {fname: state.write_part(Path(folder) / fname, rows, layer)}

    def load_part(self, folder: Path, entries: dict[str, dict], layer: int) -> None:
        """Load every expert of this layer from whatever part files hold them (any sharding)."""
        ids = np.arange(self.n_experts)
        state.import_rows(self.params, self.optimizer, ids, state.read_rows(Path(folder), entries, layer, ids))

    def state_dict(self) -> dict[str, np.ndarray]:
        return {**self.params, **self.optimizer.state_dict("adam.")}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        for n, p in self.params.items():
            if n not in state:
                raise ValueError(f"expert state is missing {n!r}")
            if state[n].shape != p.shape or state[n].dtype != p.dtype:
                raise ValueError(
                    f"expert param {n!r}: expected {p.dtype}{list(p.shape)}, "
                    f"got {state[n].dtype}{list(state[n].shape)}"
                )
            p[...] = state[n]
        self.optimizer.load_state_dict(state, "adam.")

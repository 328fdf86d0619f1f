"""LocalExperts: the in-process ExpertGroup, an FFN bank plus its own optimizer state."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe import bindings
from moe.experts import state
from moe.experts.ffn import FFNExperts
from moe.optim import Adam, AdamConfig


class LocalExperts:
    """Experts that live in this process. Implements the ExpertGroup protocol.

    The optimizer is lazy Adam by default: only experts that received rows are updated, and
    an expert's moments are allocated on its first update (see moe.optim); `lazy=False`
    gives dense Adam for comparison. Built, the group holds its weights and nothing else.
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
        sd = self.optimizer.state_dict()
        if self.lazy:  # the new experts have no state yet
            sd["t"] = np.concatenate([sd["t"], np.zeros(m, dtype=np.int64)])
        else:
            for n, p in new.params.items():
                for k in "mv":
                    sd[f"{k}.{n}"] = np.concatenate([sd[f"{k}.{n}"], np.zeros((m,) + p.shape[1:], p.dtype)])
        new.optimizer.load_state_dict(sd)
        return new

    def first(self, n: int) -> LocalExperts:
        """A copy holding only the first n experts, with their weights and optimizer state."""
        new = LocalExperts(
            n, self.d_model, self.d_hidden, activation=self.activation, rng=np.random.default_rng(0),
            dtype=self.dtype, adam=self.optimizer.config, lazy=self.lazy,
        )  # every weight is overwritten below
        for name, p in self.params.items():
            new.params[name][...] = p[:n]
        sd = self.optimizer.state_dict()
        if self.lazy:  # moments are held for the rows with t > 0, in row order: keep those below n
            have = int(np.count_nonzero(sd["t"][:n]))
            sd = {k: (v[:n] if k == "t" else v[:have]) for k, v in sd.items()}
        else:
            sd = {k: (v if k == "t" else v[:n]) for k, v in sd.items()}
        new.optimizer.load_state_dict(sd)
        return new

    def forward(self, packed: np.ndarray, offsets: np.ndarray, keep: bool = True) -> np.ndarray:
        return self.bank.forward(packed, offsets, keep)

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        return self.bank.backward(grad_out)

    def expert_sq_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, float64 squared grad norm of each expert that received rows), ids ascending.

        Summing these in id order gives the same bits wherever the experts live.
        """
        b = self.bank
        sq = np.zeros(b.touched.shape[0], dtype=np.float64)
        explicit = np.searchsorted(b.touched, b.explicit)  # their places in touched
        for n in state.PARAM_NAMES:
            g = b.grad_rows[n].reshape(b.explicit.shape[0], b.params[n][0].size)  # [A_x, size]
            # float64 accumulation without a float64 copy, in a fixed order: the bits do not
            # depend on threads (shards and coordinator must agree)
            sq[explicit] += bindings.row_sq_norms(np.ascontiguousarray(g), np.empty(g.shape[0]))
            if b.implicit.size:  # from the factors, without building the gradients
                sq[np.searchsorted(b.touched, b.implicit)] += b.low_rank[n].sq_norms()
        return b.touched, sq

    def grad_sq_norm(self) -> float:
        return float(np.sum(self.expert_sq_norms()[1]))

    def apply_update(self, lr: float, grad_scale: float = 1.0) -> None:
        b = self.bank
        if self.lazy:  # two disjoint sets of rows: each expert takes exactly one update
            if b.explicit.size:
                self.optimizer.step(b.grad_rows, lr, grad_scale, rows=b.explicit, packed=True)
            if b.implicit.size:
                self.optimizer.step(b.low_rank, lr, grad_scale, rows=b.implicit, packed=True)
        else:  # dense Adam reads every expert's gradient (comparison mode: builds them densely)
            self.optimizer.step(dict(self.grads), lr, grad_scale)

    def memory(self) -> dict[str, int]:
        """Bytes held, by kind (DeepSpeed ZeRO's three budgets), and experts with Adam state."""
        return {
            "weights_bytes": int(sum(p.nbytes for p in self.params.values())),
            "grad_bytes": self.bank.grad_bytes(),
            "adam_bytes": self.optimizer.state_bytes(),
            "experts_with_adam": int(self.optimizer.state_rows().size),
        }

    def save_part(self, folder: Path, layer: int) -> dict[str, dict]:
        """Write this group's experts (weights file + Adam file) into a checkpoint being assembled."""
        rows = state.export_rows(self.params, self.optimizer, np.arange(self.n_experts))
        return state.write_part(Path(folder), state.part_stem(layer), rows, layer)

    def load_part(self, folder: Path, entries: dict[str, dict], layer: int) -> None:
        """Load every expert of this layer from whatever part files hold them (any sharding).

        The Adam state is loaded when `entries` list Adam files for this layer (a resume);
        an inference load passes only the weight files and the optimizer stays empty."""
        ids = np.arange(self.n_experts)
        state.load_weights(Path(folder), entries, layer, ids, self.params)
        if any(e.get("kind") == state.ADAM and e.get("layer") == layer for e in entries.values()):
            state.load_adam(Path(folder), entries, layer, ids, self.optimizer)

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
        self.optimizer.load_state_dict(state, "adam.")
        for n, p in self.params.items():
            p[...] = state[n]

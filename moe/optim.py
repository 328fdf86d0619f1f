"""Optimizers over named parameter dicts, and the learning-rate schedule.

Adam has two modes for stacked expert weights (leading axis = expert):
- dense: every row is updated every step, with one shared step count (textbook Adam);
- lazy ("touched rows"): only the experts that received rows this step are updated, and
  each expert keeps its own step count, so its bias correction counts only the steps it
  took part in. An idle expert's weights and moments are not touched at all, which is what
  lets a step over 65,536 experts cost in proportion to the experts used. The two differ
  whenever an expert sits out a step: dense Adam keeps decaying the idle expert's moments
  and still moves its weights with the stale first moment; lazy Adam freezes both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moe.bindings import compiled_adam_rows


def clip_scale(sq_norm: float, max_norm: float | None) -> float:
    """The factor that brings a gradient of squared global norm `sq_norm` to `max_norm`."""
    if max_norm is None or max_norm <= 0:
        return 1.0
    norm = math.sqrt(sq_norm)
    if not math.isfinite(norm):
        raise FloatingPointError(f"gradient norm is {norm}: the step would corrupt the weights")
    return 1.0 if norm <= max_norm else max_norm / norm


def lr_at(step: int, *, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_ratio * lr` at `total` steps."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def noise_scale_at(step: int, *, final: float, total: int) -> float:
    """Gate noise std scale: 1 at step 0, falling linearly to `final` at the last step."""
    if final == 1.0:
        return 1.0
    return 1.0 + (final - 1.0) * min(step / max(total - 1, 1), 1.0)


@dataclass(frozen=True)
class AdamConfig:
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"adam {name} must be in [0, 1), got {b}")
        if not self.eps > 0:
            raise ValueError(f"adam eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"adam weight_decay must be >= 0, got {self.weight_decay}")


class Adam:
    """Adam (decoupled weight decay) over a dict of named arrays, updated in place."""

    def __init__(self, params: dict[str, np.ndarray], config: AdamConfig, *, lazy_rows: bool = False):
        self.params, self.config, self.lazy_rows = params, config, lazy_rows
        self.m = {n: np.zeros_like(p) for n, p in params.items()}
        self.v = {n: np.zeros_like(p) for n, p in params.items()}
        n_rows = {p.shape[0] for p in params.values()} if lazy_rows else set()
        if len(n_rows) > 1:
            raise ValueError(f"lazy rows need one leading axis for all params, got sizes {n_rows}")
        self.t = np.zeros(n_rows.pop() if lazy_rows else 1, dtype=np.int64)  # step count(s)

    def step(
        self,
        grads: dict[str, np.ndarray],
        lr: float,
        scale: float = 1.0,
        rows: np.ndarray | None = None,
    ) -> None:
        """Apply one update with gradients `grads * scale`; `rows` selects experts (lazy mode)."""
        c = self.config
        if rows is None:
            if self.lazy_rows:
                raise ValueError("lazy-row Adam needs the rows to update")
            self.t += 1
            t = float(self.t[0])
            for n, p in self.params.items():
                self._update(p, self.m[n], self.v[n], grads[n], lr, scale, t, c)
            return
        if not self.lazy_rows:
            raise ValueError("dense Adam updates every row; rows= is only for lazy mode")
        if rows.size == 0:
            return
        self.t[rows] += 1
        kernel = compiled_adam_rows()
        if kernel is not None:  # one fused pass per row instead of gather, update, scatter
            for n, p in self.params.items():
                if p.flags.c_contiguous and p.dtype in (np.float32, np.float64):
                    kernel(p, self.m[n], self.v[n], grads[n], rows, self.t, lr, scale,
                           c.beta1, c.beta2, c.eps, c.weight_decay)
                else:
                    self._update_rows(n, p, grads[n], rows, lr, scale)
            return
        for n, p in self.params.items():
            self._update_rows(n, p, grads[n], rows, lr, scale)

    def _update_rows(self, n: str, p: np.ndarray, g: np.ndarray, rows: np.ndarray, lr: float, scale: float) -> None:
        """The numpy path of a lazy update: gather the rows, update them, scatter them back."""
        c = self.config
        t = self.t[rows].astype(np.float64)  # [r]
        pr, mr, vr = p[rows], self.m[n][rows], self.v[n][rows]  # [r, ...]
        tt = t.reshape((-1,) + (1,) * (p.ndim - 1))
        self._update(pr, mr, vr, g[rows], lr, scale, tt, c)
        p[rows], self.m[n][rows], self.v[n][rows] = pr, mr, vr

    @staticmethod
    def _update(p, m, v, g, lr, scale, t, c: AdamConfig) -> None:
        dt = p.dtype.type
        with np.errstate(under="ignore"):
            g = g * dt(scale) if scale != 1.0 else g
            m *= dt(c.beta1)
            m += dt(1 - c.beta1) * g
            v *= dt(c.beta2)
            v += dt(1 - c.beta2) * (g * g)
            bc1 = (1 - c.beta1**t).astype(p.dtype) if isinstance(t, np.ndarray) else dt(1 - c.beta1**t)
            bc2 = (1 - c.beta2**t).astype(p.dtype) if isinstance(t, np.ndarray) else dt(1 - c.beta2**t)
            upd = (m / bc1) / (np.sqrt(v / bc2) + dt(c.eps))
            if c.weight_decay:
                upd += dt(c.weight_decay) * p
            p -= dt(lr) * upd

    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        out = {f"{prefix}t": self.t.copy()}
        for n in self.params:
            out[f"{prefix}m.{n}"] = self.m[n]
            out[f"{prefix}v.{n}"] = self.v[n]
        return out

    def load_state_dict(self, state: dict[str, np.ndarray], prefix: str = "") -> None:
        expect = self.state_dict(prefix)
        missing = sorted(set(expect) - set(state))
        if missing:
            raise ValueError(f"optimizer state is missing {missing[:5]}")
        for key, ref in expect.items():
            arr = state[key]
            if arr.shape != ref.shape or arr.dtype != ref.dtype:
                raise ValueError(
                    f"optimizer state {key!r}: expected {ref.dtype}{list(ref.shape)}, "
                    f"got {arr.dtype}{list(arr.shape)}"
                )
        self.t[...] = state[f"{prefix}t"]
        for n in self.params:
            self.m[n][...] = state[f"{prefix}m.{n}"]
            self.v[n][...] = state[f"{prefix}v.{n}"]


class SGD:
    """Plain SGD with optional momentum, same interface as dense Adam."""

    def __init__(self, params: dict[str, np.ndarray], momentum: float = 0.0):
        self.params, self.momentum = params, momentum
        self.buf = {n: np.zeros_like(p) for n, p in params.items()}

    def step(self, grads: dict[str, np.ndarray], lr: float, scale: float = 1.0, rows=None) -> None:
        for n, p in self.params.items():
            g = grads[n] if rows is None else grads[n][rows]
            b = self.buf[n] if rows is None else self.buf[n][rows]
            b *= p.dtype.type(self.momentum)
            b += p.dtype.type(scale) * g
            if rows is None:
                p -= p.dtype.type(lr) * b
            else:
                p[rows] -= p.dtype.type(lr) * b
                self.buf[n][rows] = b

    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {f"{prefix}buf.{n}": b for n, b in self.buf.items()}

    def load_state_dict(self, state: dict[str, np.ndarray], prefix: str = "") -> None:
        for n in self.buf:
            self.buf[n][...] = state[f"{prefix}buf.{n}"]

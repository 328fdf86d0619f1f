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

from moe import bindings
from moe.bindings import compiled_adam_lowrank, compiled_adam_rows


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


@dataclass(frozen=True)
class LowRank:
    """Packed gradients of stacked rows, each a sum of a few outer products.

    Row i's gradient is sum_{r < counts[i]} outer(u[starts[i] + r], v[starts[i] + r]),
    reshaped to `row_shape` (u None: ones, i.e. the sum of the v rows). An expert's weight
    gradient over its n rows is X^T D: when n is small this holds n * (a + b) numbers
    instead of a * b, and lazy Adam rebuilds each line of it in cache right before using
    it (moe.bindings._optim.adam_lowrank), so the gradient never goes through memory.
    """

    u: np.ndarray | None  # [N, a]
    v: np.ndarray  # [N, b]
    starts: np.ndarray  # int64 [n]
    counts: np.ndarray  # int64 [n], >= 1
    row_shape: tuple[int, ...]  # of size a * b

    def __post_init__(self) -> None:
        u, v, s, c = self.u, self.v, self.starts, self.counts
        N, a = v.shape[0], 1 if u is None else u.shape[1]
        if v.ndim != 2 or (u is not None and (u.ndim != 2 or u.shape[0] != N or u.dtype != v.dtype)):
            raise ValueError(f"LowRank: u [N, a] and v [N, b] must share N and dtype, got "
                             f"{None if u is None else list(u.shape)} and {list(v.shape)}")
        if a * v.shape[1] != int(np.prod(self.row_shape)):
            raise ValueError(f"LowRank: outer products of [{a}] and [{v.shape[1]}] do not give rows of {list(self.row_shape)}")
        if s.ndim != 1 or c.shape != s.shape or (s.size and (c.min() < 1 or s.min() < 0 or (s + c).max() > N)):
            raise ValueError(f"LowRank: each row needs 1 <= count and start + count <= N = {N}")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.starts.shape[0],) + tuple(self.row_shape)

    @property
    def dtype(self) -> np.dtype:
        return self.v.dtype

    def materialize(self) -> np.ndarray:
        """The gradients as an array [n, *row_shape], with the bits the fused update uses."""
        out = np.empty(self.shape, dtype=self.v.dtype)
        return bindings.lowrank_rows(self.u, self.v, self.starts, self.counts, out)

    def sq_norms(self) -> np.ndarray:
        """float64 [n]: each row's squared Frobenius norm without building it, from the Gram
        identity |sum_r u_r v_r^T|^2 = sum_{r,s} (u_r . u_s)(v_r . v_s) (one kernel call; the
        bits do not depend on threads, so shards and coordinator agree)."""
        out = np.empty(self.starts.shape[0], dtype=np.float64)
        return bindings.lowrank_sq_norms(self.u, self.v, self.starts, self.counts, out)


def _fits_kernel(p: np.ndarray, m: np.ndarray, v: np.ndarray) -> bool:
    """Whether the fused kernel can update p in place (C-contiguous float32/float64, 1-D or more)."""
    return p.ndim >= 1 and p.dtype in (np.float32, np.float64) and all(a.flags.c_contiguous for a in (p, m, v))


class Adam:
    """Adam (decoupled weight decay) over a dict of named arrays, updated in place.

    Dense mode keeps `m`, `v` (arrays like the params) and one step count `t` [1]. Lazy-row
    mode keeps `t` [n_rows] and allocates a row's moments on its first update, so untouched
    rows (experts, task tables) cost nothing: `state_rows()` are the rows that have moments
    (those with t > 0), `state_dict` holds the moments of those rows only.

    Lazy moments live in blocks of places that are never moved or resized: a row gets the
    next free place on its first update, and when the last block is full a new one is added
    with room for a quarter of the places used so far (zero pages from calloc: what is not
    yet written is reserved, not resident). Growing a single array instead would copy or
    remap all the moments whenever a step touches a row for the first time. The first block
    has room for every row when that reserves at most FIRST_BLOCK_BYTES per array, so a task
    table ends in one block and a step makes one kernel call per parameter, not one per
    block (15 blocks, and 2.2 ms of a 10 ms step, for a head table of 6,667 rows otherwise).
    """

    FIRST_BLOCK_BYTES = 64 << 20

    def __init__(self, params: dict[str, np.ndarray], config: AdamConfig, *, lazy_rows: bool = False):
        self.params, self.config, self.lazy_rows = params, config, lazy_rows
        if not lazy_rows:
            self.m = {n: np.zeros_like(p) for n, p in params.items()}
            self.v = {n: np.zeros_like(p) for n, p in params.items()}
            self.t = np.zeros(1, dtype=np.int64)  # one step count
            return
        n_rows = {p.shape[0] for p in params.values()}
        if len(n_rows) > 1:
            raise ValueError(f"lazy rows need one leading axis for all params, got sizes {n_rows}")
        self.t = np.zeros(n_rows.pop() if n_rows else 0, dtype=np.int64)  # each row's step count
        self._slot = np.full(self.t.shape[0], -1, dtype=np.int64)  # row -> place in the stores
        self._used = 0  # places handed out
        self._blocks: list[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]] = []  # (first place, m, v)

    # ------------------------------------------------------------------ lazy-row storage
    def state_rows(self) -> np.ndarray:
        """Rows that have moments (were ever updated), ascending; all rows in dense mode."""
        if not self.lazy_rows:
            return np.arange(next(iter(self.params.values())).shape[0] if self.params else 0)
        return np.flatnonzero(self._slot >= 0)

    def state_bytes(self) -> int:
        """Bytes of moments held: every row in dense mode, the rows with a place in lazy mode
        (a block's free places are reserved address space, never written, so not resident)."""
        if not self.lazy_rows:
            return int(sum(a.nbytes for s in (self.m, self.v) for a in s.values()))
        row = sum(p[:1].nbytes for p in self.params.values())  # one row of every param
        return 2 * self._used * row

    def _capacity(self) -> int:
        return self._blocks[-1][0] + next(iter(self._blocks[-1][1].values())).shape[0] if self._blocks else 0

    def _places(self, rows: np.ndarray) -> np.ndarray:
        """Places of `rows` in the moment blocks, giving new rows zeroed moments first."""
        slot = self._slot[rows]  # [r]
        new = rows[slot < 0]
        if new.size:
            n0 = self._used
            need = n0 + new.size - self._capacity()
            if need > 0:
                size = max(need, n0 // 4, 16)
                if not self._blocks:
                    row = max(p[:1].nbytes for p in self.params.values())
                    size = max(size, min(self.t.shape[0], self.FIRST_BLOCK_BYTES // max(row, 1)))
                self._blocks.append((self._capacity(), *(
                    {n: np.zeros((size,) + p.shape[1:], dtype=p.dtype) for n, p in self.params.items()}
                    for _ in "mv")))
            self._slot[new] = np.arange(n0, n0 + new.size)
            self._used = n0 + new.size
            slot = self._slot[rows]
        return slot

    def _by_block(self, places: np.ndarray):
        """(m block, v block, which of places fall in it, their places in the block) per block used."""
        if len(self._blocks) == 1:  # a task table's moments live in one block (see the class)
            first, m, v = self._blocks[0]
            yield m, v, np.arange(places.size), places - first
            return
        starts = np.array([b[0] for b in self._blocks], dtype=np.int64)
        which = np.searchsorted(starts, places, side="right") - 1  # [r]
        for i in np.unique(which):
            sel = np.flatnonzero(which == i)
            first, m, v = self._blocks[i]
            yield m, v, sel, places[sel] - first

    def moments(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(m, v) of one param as full arrays like the param (zeros where a row has none): a copy
        in lazy mode, for callers that hold dense state anyway (the JAX backend)."""
        if not self.lazy_rows:
            return self.m[name], self.v[name]
        rows = self.state_rows()
        full_m, full_v = np.zeros_like(self.params[name]), np.zeros_like(self.params[name])
        for m, v, sel, at in self._by_block(self._slot[rows]):
            full_m[rows[sel]], full_v[rows[sel]] = m[name][at], v[name][at]
        return full_m, full_v

    # ------------------------------------------------------------------ update
    def step(
        self,
        grads: dict[str, np.ndarray],
        lr: float,
        scale: float = 1.0,
        rows: np.ndarray | None = None,
        *,
        packed: bool = False,
    ) -> None:
        """Apply one update with gradients `grads * scale`; `rows` (distinct) selects the rows
        to update in lazy mode. packed=True: grads[n][i] is the gradient of row rows[i]
        (only the touched rows exist; an array or a LowRank); otherwise grads are full arrays
        indexed by row."""
        c = self.config
        if rows is None:
            if self.lazy_rows:
                raise ValueError("lazy-row Adam needs the rows to update")
            if packed:
                raise ValueError("packed gradients need rows= (lazy mode)")
            self.t += 1
            t = float(self.t[0])
            kernel = compiled_adam_rows()
            for n, p in self.params.items():
                if kernel is not None and _fits_kernel(p, self.m[n], self.v[n]):
                    # the fused pass over every row (the same float operations as _update)
                    R = p.shape[0] if p.ndim > 1 else 1
                    every = np.arange(R)
                    kernel(p.reshape(R, -1), self.m[n].reshape(R, -1), self.v[n].reshape(R, -1),
                           np.reshape(grads[n], (R, -1)), every, every, every, np.full(R, self.t[0]),
                           lr, scale, c.beta1, c.beta2, c.eps, c.weight_decay)
                else:
                    self._update(p, self.m[n], self.v[n], grads[n], lr, scale, t, c)
            return
        if not self.lazy_rows:
            raise ValueError("dense Adam updates every row; rows= is only for lazy mode")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return
        self._check_rows(rows, grads, packed)
        places = self._places(rows)  # [r]
        self.t[rows] += 1
        t = self.t[rows]  # [r]
        g_rows = np.arange(rows.size) if packed else rows  # [r]
        kernel, lowrank = compiled_adam_rows(), compiled_adam_lowrank()
        for mb, vb, sel, at in self._by_block(places):
            r, gr, tr = (rows, g_rows, t) if sel.size == rows.size else (rows[sel], g_rows[sel], t[sel])
            for n, p in self.params.items():
                m, v, g = mb[n], vb[n], grads[n]
                fused = kernel is not None and _fits_kernel(p, m, v)
                if isinstance(g, LowRank) and fused:  # the gradient rebuilt line by line, in cache
                    lowrank(p, m, v, g.u, g.v, r, at, g.starts[gr], g.counts[gr], tr, lr, scale,
                            c.beta1, c.beta2, c.eps, c.weight_decay)
                    continue
                if isinstance(g, LowRank):
                    g, gr = LowRank(g.u, g.v, g.starts[gr], g.counts[gr], g.row_shape).materialize(), np.arange(r.size)
                if fused:  # one fused pass per row instead of gather, update, scatter
                    kernel(p, m, v, g, r, at, gr, tr, lr, scale, c.beta1, c.beta2, c.eps, c.weight_decay)
                else:
                    self._update_rows(p, m, v, g, r, at, gr, tr, lr, scale)

    def _check_rows(self, rows: np.ndarray, grads: dict[str, np.ndarray], packed: bool) -> None:
        n = self.t.shape[0]
        if rows.ndim != 1 or rows.min() < 0 or rows.max() >= n:
            raise ValueError(f"rows must be a 1-D array of row ids in [0, {n}), got {rows.tolist()[:8]}")
        if np.any(np.diff(rows) <= 0) and np.unique(rows).size != rows.size:
            raise ValueError("rows must be distinct")
        for name, p in self.params.items():
            want = (rows.size,) + p.shape[1:] if packed else p.shape
            g = grads[name]
            if isinstance(g, LowRank) and not packed:
                raise ValueError(f"gradient {name!r}: a LowRank gradient is packed (pass packed=True)")
            if g.shape != want or g.dtype != p.dtype:
                raise ValueError(f"gradient {name!r}: expected {p.dtype}{list(want)}, got {g.dtype}{list(g.shape)}")

    def _update_rows(self, p, m, v, g, rows, places, g_rows, t, lr: float, scale: float) -> None:
        """The numpy path of a lazy update: gather the rows, update them, scatter them back."""
        tt = t.astype(np.float64).reshape((-1,) + (1,) * (p.ndim - 1))  # [r, 1, ...]
        pr, mr, vr = p[rows], m[places], v[places]  # [r, ...]
        self._update(pr, mr, vr, g[g_rows], lr, scale, tt, self.config)
        p[rows], m[places], v[places] = pr, mr, vr

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

    # ------------------------------------------------------------------ state
    def state_dict(self, prefix: str = "") -> dict[str, np.ndarray]:
        """{t, m.<name>, v.<name>}. Lazy mode: t [n_rows] and the moments of the rows with
        t > 0 only, in ascending row order (rows never updated have none: absent, not zero)."""
        out = {f"{prefix}t": self.t.copy()}
        if not self.lazy_rows:
            for n in self.params:
                out[f"{prefix}m.{n}"] = self.m[n]
                out[f"{prefix}v.{n}"] = self.v[n]
            return out
        places = self._slot[self.state_rows()]  # [s] ascending rows
        for n, p in self.params.items():
            out[f"{prefix}m.{n}"] = np.empty((places.size,) + p.shape[1:], dtype=p.dtype)
            out[f"{prefix}v.{n}"] = np.empty((places.size,) + p.shape[1:], dtype=p.dtype)
        for m, v, sel, at in self._by_block(places):
            for n in self.params:
                out[f"{prefix}m.{n}"][sel], out[f"{prefix}v.{n}"][sel] = m[n][at], v[n][at]
        return out

    def load_state_dict(self, state: dict[str, np.ndarray], prefix: str = "") -> None:
        """Replace the whole state by one shaped like state_dict's (checked first)."""
        key_t = f"{prefix}t"
        missing = sorted({key_t, *(f"{prefix}{k}.{n}" for n in self.params for k in "mv")} - set(state))
        if missing:
            raise ValueError(f"optimizer state is missing {missing[:5]}")
        t = state[key_t]
        if t.shape != self.t.shape or t.dtype != self.t.dtype:
            raise ValueError(f"optimizer state {key_t!r}: expected {self.t.dtype}{list(self.t.shape)}, "
                             f"got {t.dtype}{list(t.shape)}")
        if self.lazy_rows and (t < 0).any():
            raise ValueError(f"optimizer state {key_t!r}: step counts must be >= 0")
        n_state = int(np.count_nonzero(t)) if self.lazy_rows else None
        for n, p in self.params.items():
            want = (n_state,) + p.shape[1:] if self.lazy_rows else p.shape
            for k in "mv":
                arr = state[f"{prefix}{k}.{n}"]
                if arr.shape != want or arr.dtype != p.dtype:
                    key = f"{prefix}{k}.{n}"
                    raise ValueError(
                        f"optimizer state {key!r}: expected {p.dtype}{list(want)}, "
                        f"got {arr.dtype}{list(arr.shape)}"
                    )
        self.t[...] = t
        if not self.lazy_rows:
            for n in self.params:
                self.m[n][...] = state[f"{prefix}m.{n}"]
                self.v[n][...] = state[f"{prefix}v.{n}"]
            return
        rows = np.flatnonzero(t)
        self._slot[:] = -1
        self._slot[rows] = np.arange(rows.size)
        self._used = rows.size
        # one block sized exactly, in fresh arrays: the old blocks are released
        self._blocks = [(0, *({n: np.array(state[f"{prefix}{k}.{n}"], order="C") for n in self.params}
                              for k in "mv"))] if rows.size else []

"""What a shard computes: its experts of every MoE layer, and the checks that keep them finite.

`ExpertHost` holds one `LocalExperts` per layer over the hosted global ids (local index i is
global id ids[i]; ids ascend, so local order is global order) and runs forward, backward,
update, save and load for the server. The math is the in-process math, fed the same rows in
the same per-expert order, so results are bit-identical to in-process training.

Numbers are checked before they are used (docs/PROTOCOL.md §15.1): forward rows, backward
gradients, `lr` and `scale` must be finite, and an update is applied only when `FiniteBound`
proves that no weight or Adam moment can become non-finite; otherwise it is refused and
changes nothing.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe import bindings
from moe.checkpoint import CheckpointError, fsync_dir
from moe.experts import state
from moe.experts.local import LocalExperts
from moe.optim import Adam, AdamConfig

PART_FILE = re.compile(r"experts-l(\d+)(-s\d+)?(\.adam)?\.safetensors")
FLOAT_LIMIT = 1e38  # below float32's largest finite value (3.4e38), so rounding cannot cross it


class HostError(Exception):
    """An op that cannot be executed; `code` is the wire error code of the reply."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


def _all_finite(a: np.ndarray) -> bool:
    """One pass, no temporary: a float64 sum of float32 values is finite iff every value is."""
    if a.size == 0:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.add.reduce(a, axis=None, dtype=np.float64)))


def _row_max_abs(a: np.ndarray) -> np.ndarray:
    """max |a[i]| per leading index, float64 [n] (no full-size temporary)."""
    flat = a.reshape(a.shape[0], -1)
    if flat.shape[1] == 0:
        return np.zeros(a.shape[0], dtype=np.float64)
    return np.maximum(flat.max(axis=1), -flat.min(axis=1)).astype(np.float64)


class FiniteBound:
    """Per-expert upper bounds on |weights|, |m| and v, so an update can be proven finite first.

    Lazy Adam on expert e with gradient g scaled by s, learning rate lr:
        m' = b1 m + (1-b1) g s          |m'| <= max(M, G s)          G = max|g| <= ||g||_2
        v' = b2 v + (1-b2) (g s)^2        v' <= max(V, (G s)^2)
        p' = p - lr ((m'/bc1) / (sqrt(v'/bc2) + eps) + wd p),   bc1 >= 1-b1 for t >= 1
          |p'| <= P + lr (max(M, G s) / ((1-b1) eps) + wd P)
    Every intermediate must stay below FLOAT_LIMIT. The bound is loose for the weights (it
    grows by about lr * M * 1e9 per update) but it is exact again after every load, and it
    only refuses updates whose lr, scale or moments are absurdly large (lr = 1e308 is refused;
    lr = 1e-3 with gradients of norm 1e20 is not). Bounds are kept as float64 [n_experts].
    """

    SLACK = 1.0 + 1e-6  # covers float32 rounding of each bounded quantity

    def __init__(self, n: int) -> None:
        self.p = np.zeros(n, dtype=np.float64)
        self.m = np.zeros(n, dtype=np.float64)
        self.v = np.zeros(n, dtype=np.float64)

    def reset(self, rows: dict[str, np.ndarray], local: np.ndarray) -> None:
        """Exact bounds for local experts `local` from their weights and Adam moments, given as
        LocalExperts.state_dict gives them: "adam.t" [n] and moments only for the rows with
        t > 0 (lazy Adam: an expert never updated has none, so its bounds are 0)."""
        self.p[local] = 0.0
        for n in state.PARAM_NAMES:
            self.p[local] = np.maximum(self.p[local], _row_max_abs(rows[n]))
        with_state = local[np.flatnonzero(rows["adam.t"] > 0)]  # [s], the order of the moment rows
        for bound, prefix in ((self.m, "adam.m."), (self.v, "adam.v.")):
            bound[local] = 0.0
            for n in state.PARAM_NAMES:
                if with_state.size:
                    bound[with_state] = np.maximum(bound[with_state], _row_max_abs(rows[prefix + n]))

    def propose(self, local: np.ndarray, gmax: np.ndarray, lr: float, scale: float,
                c: AdamConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The new bounds after the update, or None when the update cannot be proven finite."""
        if not (0 <= lr <= FLOAT_LIMIT and abs(scale) <= FLOAT_LIMIT):
            return None
        k = self.SLACK
        gs = gmax * abs(scale) * k  # [n]
        if np.any(gs > 1e18):  # (g s)^2 must stay finite in float32
            return None
        m1 = np.maximum(self.m[local], gs) * k
        v1 = np.maximum(self.v[local], gs * gs) * k
        mhat = m1 / (1.0 - c.beta1)
        step = mhat / c.eps + c.weight_decay * self.p[local]
        p1 = (self.p[local] + lr * step * k) * k
        worst = max(float(np.max(mhat, initial=0.0)), float(np.max(v1 / (1.0 - c.beta2), initial=0.0)),
                    float(np.max(step, initial=0.0)), float(np.max(p1, initial=0.0)))
        return (p1, m1, v1) if worst <= FLOAT_LIMIT else None

    def commit(self, local: np.ndarray, new: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self.p[local], self.m[local], self.v[local] = new


@dataclass(frozen=True)
class Stash:
    """What a `train = true` forward keeps for its backward."""

    experts: tuple[int, ...]
    offsets: tuple[int, ...]
    perm: np.ndarray | None  # local row -> request row, when the request is not in id order
    step: int


class ExpertHost:
    """This shard's experts for every layer, and the per-layer state between ops.

    Per layer: the stash of the last `train = true` forward (a backward must name the same
    step, experts and offsets, and frees it; `train = false` forwards keep nothing), the
    gradients of the last backward since the last update (`update` applies them once, then
    they are gone), and the step of the last applied update.
    """

    def __init__(self, experts: tuple[int, ...], n_layers: int, d_model: int, d_hidden: int, *,
                 activation: str = "relu", rng: np.random.Generator) -> None:
        if not experts:
            raise ValueError("a shard must host at least one expert, got none")
        self.ids = np.asarray(sorted(experts), dtype=np.int64)  # [n]
        if np.unique(self.ids).size != self.ids.size:
            raise ValueError(f"hosted experts must be distinct, got {list(experts)[:16]}")
        self.d_model = d_model
        n = self.ids.size
        self.banks = [LocalExperts(n, d_model, d_hidden, activation=activation, rng=rng)
                      for _ in range(n_layers)]
        self.stash: list[Stash | None] = [None] * n_layers
        self.pending: list[tuple[np.ndarray, np.ndarray] | None] = [None] * n_layers  # (local ids, max|g|)
        self.last_update = [-1] * n_layers  # step of the last applied update, per layer
        self.rows = [np.zeros(n, dtype=np.int64) for _ in range(n_layers)]
        self.bounds = [FiniteBound(n) for _ in range(n_layers)]
        everyone = np.arange(n)
        for bank, bound in zip(self.banks, self.bounds, strict=True):
            bound.reset(bank.state_dict(), everyone)  # no expert has Adam moments yet

    # -- helpers
    def _bank(self, layer: int) -> LocalExperts:
        if not 0 <= layer < len(self.banks):
            raise HostError(f"layer must be in [0, {len(self.banks)}), got {layer}")
        return self.banks[layer]

    def _local(self, experts: tuple[int, ...]) -> np.ndarray:
        g = np.asarray(experts, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.ids, g), 0, self.ids.size - 1)
        bad = g[self.ids[pos] != g] if g.size else g
        if bad.size:
            raise HostError(f"experts {bad[:8].tolist()} are not hosted by this shard", "not_found")
        return pos  # [n_req]

    def _plan(self, experts: tuple[int, ...], offsets: tuple[int, ...]):
        """Local offsets [n+1] and, when the request is not in ascending id order, a row permutation."""
        li = self._local(experts)
        o = np.asarray(offsets, dtype=np.int64)
        counts = np.zeros(self.ids.size, dtype=np.int64)
        counts[li] = np.diff(o)
        local_offsets = np.concatenate([[0], np.cumsum(counts)])  # [n+1]
        perm = None
        if li.size > 1 and np.any(np.diff(li) < 0):
            order = np.argsort(li, kind="stable")
            perm = np.concatenate([np.arange(o[i], o[i + 1]) for i in order])  # [N] local row -> request row
        return li, local_offsets, perm

    def _check_rows(self, x: np.ndarray, what: str) -> None:
        if x.dtype != np.float32:
            raise HostError(f"{what} must be float32 ('<f4'): this shard computes in float32, got {x.dtype}")
        if x.shape[1] != self.d_model:
            raise HostError(f"{what} must be float32 [N, {self.d_model}], got {x.dtype} {list(x.shape)}")
        if not _all_finite(x):
            raise HostError(f"{what} must be finite, got NaN or Inf")

    # -- ops
    def forward(self, layer: int, experts: tuple, offsets: tuple, x: np.ndarray, step: int = 0,
                train: bool = True) -> np.ndarray:
        bank = self._bank(layer)
        self._check_rows(x, "forward rows")
        li, local_offsets, perm = self._plan(experts, offsets)
        xl = x if perm is None else x[perm]  # [N, d] in local expert order
        if train:
            self.stash[layer] = None  # replaced below only when this forward succeeds
            yl = bank.forward(xl, local_offsets)  # [N, d]
        else:  # keeps nothing: the pending training stash stays as it was
            p = bank.params
            yl, _, _ = bindings.ffn_forward(xl, local_offsets, p["w1"], p["b1"], p["w2"], p["b2"],
                                            bank.activation, False)  # [N, d]
        if not _all_finite(yl):
            raise HostError("forward outputs are not finite (rows too large for these experts)")
        if train:
            self.stash[layer] = Stash(tuple(experts), tuple(offsets), perm, step)
        self.rows[layer][li] += np.diff(np.asarray(offsets, dtype=np.int64))
        if perm is None:
            return yl
        y = np.empty_like(yl)
        y[perm] = yl
        return y

    def backward(self, layer: int, experts: tuple, offsets: tuple, dy: np.ndarray, step: int = 0):
        bank = self._bank(layer)
        st = self.stash[layer]
        if st is None:
            raise HostError(f"backward for layer {layer} without a train = true forward to match")
        if st.experts != tuple(experts) or st.offsets != tuple(offsets) or st.step != step:
            raise HostError(f"backward (step {step}) experts/offsets differ from the last forward of layer "
                            f"{layer} (step {st.step})")
        self._check_rows(dy, "backward gradients")
        self.stash[layer] = None
        self.pending[layer] = None  # the gradients of this backward replace any earlier ones
        if dy.shape[0] == 0:  # no rows: no expert gets a gradient, the next update applies nothing
            return np.zeros_like(dy), np.zeros(len(experts), dtype=np.float64)
        perm = st.perm
        dxl = bank.backward(dy if perm is None else dy[perm])  # [N, d]
        dx = dxl
        if perm is not None:
            dx = np.empty_like(dxl)
            dx[perm] = dxl
        touched, sq = bank.expert_sq_norms()  # local ids ascending, float64
        if not (_all_finite(sq) and _all_finite(dx)):
            raise HostError("backward gradients of the expert weights are not finite")
        self.pending[layer] = (touched, np.sqrt(sq))
        sq_local = np.zeros(self.ids.size, dtype=np.float64)
        sq_local[touched] = sq
        return dx, sq_local[self._local(experts)]  # [N, d], [n_req] in request order

    def update(self, layer: int, step: int, lr: float, scale: float) -> int:
        """Apply the pending gradients once; returns how many experts were updated."""
        bank = self._bank(layer)
        if step <= self.last_update[layer]:
            raise HostError(f"update for step {step} of layer {layer}, but step "
                            f"{self.last_update[layer]} was already applied")
        pending = self.pending[layer]
        if pending is None:  # no backward since the last update: nothing to apply
            self.last_update[layer] = step
            return 0
        touched, gmax = pending
        new = self.bounds[layer].propose(touched, gmax, lr, scale, bank.optimizer.config)
        if new is None:
            raise HostError(f"update refused (nothing changed): with lr={lr!r} and scale={scale!r} the "
                            f"expert weights of layer {layer} could become non-finite")
        bank.apply_update(lr, scale)
        self.bounds[layer].commit(touched, new)
        self.pending[layer] = None
        self.last_update[layer] = step
        return int(touched.size)

    def save(self, layer: int, folder: Path, index: int) -> dict[str, Any]:
        """Write this shard's weights file and Adam file of `layer` into folder (each fsynced,
        then renamed into place); the reply meta names both."""
        bank = self._bank(layer)
        if not folder.is_dir():
            raise HostError(f"save folder {str(folder)!r} does not exist", "not_found")
        stem = state.part_stem(layer, index)
        rows = state.export_rows(bank.params, bank.optimizer, self.ids)
        tmp = folder / f".{stem}.tmp-{os.getpid()}"
        tmp.mkdir(exist_ok=True)
        try:
            entries = state.write_part(tmp, stem, rows, layer)  # written and fsynced
            for name in entries:
                os.replace(tmp / name, folder / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(folder)
        (name, w), (adam_name, a) = sorted(entries.items(), key=lambda kv: kv[1]["kind"])
        return {"file": name, "sha256": w["sha256"], "bytes": w["bytes"], "n_experts": w["n_experts"],
                "adam_file": adam_name, "adam_sha256": a["sha256"], "adam_bytes": a["bytes"],
                "adam_n_experts": a["n_experts"]}

    def load(self, layer: int, folder: Path, files: tuple, hashes: tuple) -> None:
        """Restore every hosted expert of `layer` from the named weight and Adam part files (any
        sharding wrote them, rows carry global ids; experts absent from every Adam file get no
        moments); everything is read and checked before anything changes."""
        bank = self._bank(layer)
        if len(files) != len(hashes):
            raise HostError(f"load needs one sha256 per file, got {len(files)} files and {len(hashes)} hashes")
        where = f"load layer {layer} from {str(folder)!r}"
        entries = {}
        for f, h in zip(files, hashes, strict=True):
            m = PART_FILE.fullmatch(f) if isinstance(f, str) else None
            if m is None or int(m.group(1)) != layer or not isinstance(h, str):
                raise HostError(f"load files must be expert parts 'experts-l{layer}[-sN][.adam].safetensors', got {f!r}")
            try:
                size = os.stat(folder / f).st_size  # the sha256 is what protects the bytes
            except OSError:
                raise HostError(f"{where}: {f} is missing", "not_found") from None
            entries[f] = {"kind": state.ADAM if m.group(3) else state.WEIGHTS, "layer": layer, "sha256": h,
                          "bytes": size}
        weights = {n: np.empty_like(p) for n, p in bank.params.items()}
        fresh = Adam(weights, bank.optimizer.config, lazy_rows=True)
        try:
            state.load_weights(folder, entries, layer, self.ids, weights)
            state.load_adam(folder, entries, layer, self.ids, fresh)
        except (CheckpointError, OSError) as e:
            raise HostError(f"{where}: {e}", "not_found") from None
        rows = {**weights, **fresh.state_dict("adam.")}  # moments only of the experts with t > 0
        for key, got in rows.items():
            if got.dtype.kind == "f" and not _all_finite(got):
                raise HostError(f"{where}: {key!r} holds NaN or Inf")
        bank.load_state_dict(rows)
        self.bounds[layer].reset(rows, np.arange(self.ids.size))
        self.stash[layer] = self.pending[layer] = None
        self.last_update[layer] = -1

    def drop_stashes(self) -> None:
        """A rollback: forget every forward stash and every pending gradient."""
        self.stash = [None] * len(self.banks)
        self.pending = [None] * len(self.banks)

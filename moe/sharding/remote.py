"""RemoteExperts: the ExpertGroup of one MoE layer whose experts live on shard servers.

The connections (admission, deadlines, retries, heartbeats) are `moe.sharding.links`; this
module splits each step's packed rows by shard, gathers the replies back into packed order,
and carries checkpoints through the shards' part files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from moe.checkpoint import MANIFEST, CheckpointError
from moe.experts import state
from moe.sharding.links import ShardError, ShardLinks
from moe.sharding.wire import Message


def contiguous_placement(n_experts: int, n_shards: int) -> np.ndarray:
    """Expert e -> shard floor(e * S / E): S contiguous, near-equal ranges. int32[E]."""
    if not 1 <= n_shards <= n_experts:
        raise ValueError(f"need 1 <= shards <= n_experts={n_experts}, got {n_shards} shards")
    return (np.arange(n_experts, dtype=np.int64) * n_shards // n_experts).astype(np.int32)


def load_placement_file(path: str, n_experts: int, n_shards: int) -> np.ndarray:
    """A placement JSON written by the profiler (moe.profiling.placement), checked against S."""
    from moe.profiling.placement import load_placement

    a = load_placement(path, n_experts)
    bins = int(a.max()) + 1
    if bins != n_shards:
        raise ValueError(f"placement file {path} places experts on {bins} shards, the run has {n_shards}")
    return a.astype(np.int32)


# ----------------------------------------------------------------------------- the group


class RemoteExperts:
    """ExpertGroup for one MoE layer whose experts live on shard servers.

    `placement[e]` is the shard of expert e. Each shard gets, in ascending id order, the rows of
    its experts (every shard gets a request each step, possibly empty, so its state stays in
    lock-step). The reply rows go back to their places in the packed order.
    """

    def __init__(self, links: ShardLinks, layer: int, n_experts: int, d_model: int, placement: np.ndarray) -> None:
        placement = np.asarray(placement)
        if placement.shape != (n_experts,) or placement.dtype.kind not in "iu":
            raise ValueError(f"placement must be int [{n_experts}], got {placement.dtype} {list(placement.shape)}")
        if placement.size and (placement.min() < 0 or placement.max() >= links.n_shards):
            raise ValueError(f"placement must name shards in [0, {links.n_shards}), got "
                             f"[{placement.min()}, {placement.max()}]")
        self.links, self.layer, self.n_experts, self.d_model = links, layer, n_experts, d_model
        self.placement = placement.astype(np.int64)
        self.shard_experts = [np.flatnonzero(self.placement == s) for s in range(links.n_shards)]  # ascending
        self.step = 0
        self._fwd: tuple | None = None
        self._sq: tuple[np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ data path
    def _split(self, offsets: np.ndarray):
        """Per shard: (experts with rows, their offsets, row selector) in ascending id order."""
        plan = {}
        for s, ids in enumerate(self.shard_experts):
            counts = offsets[ids + 1] - offsets[ids]  # [n_s]
            nz = counts > 0
            ex, lo, n = ids[nz], offsets[ids[nz]], counts[nz]
            offs = np.concatenate([[0], np.cumsum(n)]).astype(np.int64)
            if ex.size == 0:
                sel: Any = slice(0, 0)
            elif np.all(lo[1:] == lo[:-1] + n[:-1]):
                sel = slice(int(lo[0]), int(lo[0] + offs[-1]))  # contiguous rows: send a view
            else:
                sel = np.concatenate([np.arange(a, a + c) for a, c in zip(lo, n, strict=True)])
            plan[s] = (ex.tolist(), offs.tolist(), sel)
        return plan

    def forward(self, packed: np.ndarray, offsets: np.ndarray, keep: bool = True) -> np.ndarray:
        """packed [N, d] grouped by expert -> out [N, d], computed on the shards.

        keep=False (no backward follows) sends `train = false`: the shards keep nothing, and
        a pending training stash stays as it was (docs/PROTOCOL.md §5)."""
        offsets = np.asarray(offsets, dtype=np.int64)
        if offsets.shape != (self.n_experts + 1,):
            raise ValueError(f"offsets must be [{self.n_experts + 1}], got {list(offsets.shape)}")
        if packed.ndim != 2 or packed.shape != (int(offsets[-1]), self.d_model) or packed.dtype != np.float32:
            raise ValueError(f"packed must be float32 [{int(offsets[-1])}, {self.d_model}], "
                             f"got {packed.dtype} {list(packed.shape)}")
        plan = self._split(offsets)
        meta = {} if keep else {"train": False}
        req = {s: (ex, offs, [np.ascontiguousarray(packed[sel])], meta) for s, (ex, offs, sel) in plan.items()}
        replies = self.links.call("forward", req, layer=self.layer, step=self.step)
        out = np.empty_like(packed)  # [N, d]
        for s, (_, offs, sel) in plan.items():
            out[sel] = self._rows(replies[s], s, offs[-1])  # [n_s, d]
        self._fwd = (plan, packed.shape[0]) if keep else None
        self._sq = None
        return out

    def backward(self, grad_out: np.ndarray) -> np.ndarray:
        """grad_out [N, d] -> grad of the packed rows [N, d]; weight grads stay on the shards."""
        if self._fwd is None:
            raise ValueError("experts backward called before forward")
        plan, n = self._fwd
        if grad_out.shape != (n, self.d_model) or grad_out.dtype != np.float32:
            raise ValueError(f"grad_out must be float32 [{n}, {self.d_model}], got {grad_out.dtype} {list(grad_out.shape)}")
        self._fwd = None
        req = {s: (ex, offs, [np.ascontiguousarray(grad_out[sel])], {}) for s, (ex, offs, sel) in plan.items()}
        replies = self.links.call("backward", req, layer=self.layer, step=self.step)
        dx = np.empty_like(grad_out)  # [N, d]
        ids, sq = [], []
        for s, (ex, offs, sel) in plan.items():
            msg = replies[s]
            dx[sel] = self._rows(msg, s, offs[-1])
            if len(msg.arrays) != 2:
                raise ShardError(f"shard {s} sent no squared gradient norms with its backward reply",
                                 shard=s, code="bad_request")
            ids.append(np.asarray(ex, dtype=np.int64))
            sq.append(msg.arrays[1])
        ids_all, sq_all = np.concatenate(ids), np.concatenate(sq).astype(np.float64)
        order = np.argsort(ids_all, kind="stable")
        self._sq = (ids_all[order], sq_all[order])
        return dx

    def _rows(self, msg: Message, s: int, n: int) -> np.ndarray:
        y = msg.arrays[0]
        if y.shape != (n, self.d_model) or y.dtype != np.float32:
            raise ShardError(f"shard {s} replied float32 [{n}, {self.d_model}] expected, got {y.dtype} "
                             f"{list(y.shape)}", shard=s, code="bad_request")
        return y

    def expert_sq_norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids ascending, float64 squared grad norm of each expert that got rows), as LocalExperts."""
        if self._sq is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return self._sq

    def grad_sq_norm(self) -> float:
        # Sum over ascending global ids: the same array, so the same bits, as LocalExperts.
        return float(np.sum(self.expert_sq_norms()[1]))

    def apply_update(self, lr: float, grad_scale: float = 1.0) -> None:
        meta = {"lr": float(lr), "scale": float(grad_scale)}
        self.links.call("update", {s: ((), (0,), (), meta) for s in self._active()}, layer=self.layer,
                        step=self.step + 1)
        self.step += 1

    def _active(self) -> list[int]:
        return [s for s, ids in enumerate(self.shard_experts) if ids.size]

    # ------------------------------------------------------------------ checkpoints
    def save_part(self, folder: Path, layer: int) -> dict[str, dict]:
        """Each shard writes experts-l{layer}-s{shard}.safetensors and its .adam.safetensors
        into folder (shared file system)."""
        meta = {"dir": str(Path(folder).resolve()), "tag": f"l{layer}"}
        replies = self.links.call("save", {s: ((), (0,), (), meta) for s in self._active()}, layer=layer,
                                  step=self.step)
        entries = {}
        for _, msg in sorted(replies.items(), key=lambda kv: kv[0]):
            m = msg.header.meta
            for pre, kind in (("", state.WEIGHTS), ("adam_", state.ADAM)):
                entries[str(m[f"{pre}file"])] = {"sha256": m[f"{pre}sha256"], "bytes": int(m[f"{pre}bytes"]),
                                                 "kind": kind, "layer": int(layer),
                                                 "n_experts": int(m[f"{pre}n_experts"])}
        return entries

    def load_part(self, folder: Path, entries: dict[str, dict], layer: int) -> None:
        """Each shard reads its experts' rows from whichever part files hold them (any sharding)."""
        parts = sorted((f, e) for f, e in entries.items()
                       if e.get("kind") in (state.WEIGHTS, state.ADAM) and e.get("layer") == layer)
        lim = self.links.limits.max_meta_items
        if len(parts) > lim:
            raise ValueError(f"layer {layer} is split over {len(parts)} part files; a load names at most {lim}")
        step = _manifest_step(Path(folder))
        meta = {"dir": str(Path(folder).resolve()), "tag": f"l{layer}", "files": [f for f, _ in parts],
                "sha256": [str(e["sha256"]) for _, e in parts]}
        try:
            self.links.call("load", {s: ((), (0,), (), meta) for s in self._active()}, layer=layer,
                            step=self.step if step is None else step)
        except ShardError as e:  # a missing, tampered or incompatible part: the checkpoint's fault
            raise CheckpointError(f"checkpoint {str(folder)!r} layer {layer}: {e}") from None
        if step is not None:
            self.step = step
        self._fwd, self._sq = None, None

    def state_dict(self) -> dict[str, np.ndarray]:
        """All experts' params and Adam state, as LocalExperts.state_dict (via temporary parts)."""
        with tempfile.TemporaryDirectory(prefix="moe-state-") as tmp:
            return state.read_rows(Path(tmp), self.save_part(Path(tmp), self.layer), self.layer,
                                   np.arange(self.n_experts))

    def load_state_dict(self, tensors: dict[str, np.ndarray]) -> None:
        """Load a LocalExperts.state_dict (lazy Adam) into the shards (via temporary parts)."""
        ids = np.arange(self.n_experts, dtype=np.int64)
        t = np.asarray(tensors["adam.t"], dtype=np.int64)
        rows = {"ids": ids, **{n: tensors[n] for n in state.PARAM_NAMES}, "adam.ids": ids[t > 0],
                "adam.t": t[t > 0], **{k: v for k, v in tensors.items() if k.startswith(("adam.m.", "adam.v."))}}
        with tempfile.TemporaryDirectory(prefix="moe-state-") as tmp:
            entries = state.write_part(Path(tmp), state.part_stem(self.layer), rows, self.layer)
            self.load_part(Path(tmp), entries, self.layer)

    def stats(self, reset: bool = False) -> np.ndarray:
        """Rows each expert processed in forward since the last reset, int64[E]."""
        replies = self.links.call("stats", {s: ((), (0,), (), {"reset": reset}) for s in self._active()},
                                  layer=self.layer)
        rows = np.zeros(self.n_experts, dtype=np.int64)
        for msg in replies.values():
            rows[np.asarray(msg.arrays[0], dtype=np.int64)] = msg.arrays[1]
        return rows


def _manifest_step(folder: Path) -> int | None:
    """The step of the checkpoint in folder, when it is one (a staging folder has no manifest)."""
    try:
        step = json.loads((folder / MANIFEST).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and step >= 0 else None

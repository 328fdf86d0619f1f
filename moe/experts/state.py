"""Expert state on disk: one safetensors file per (layer, holder), rows indexed by global expert id.

Each file holds `ids` int64[n] (global expert ids, ascending), the parameter rows
(`w1` [n, d, h], `b1`, `w2`, `b2`) and the Adam state for the same rows (`adam.m.<p>`,
`adam.v.<p>`, `adam.t` int64[n]). Whoever holds experts (this process, or a shard server)
writes its own file; any holder can load any subset of ids from any set of files, which
is what makes loading into a different number of shards work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load

from moe.checkpoint import CheckpointError, sha256_bytes, write_tensors
from moe.optim import Adam

PARAM_NAMES = ("w1", "b1", "w2", "b2")


def export_rows(params: dict[str, np.ndarray], optimizer: Adam, ids: np.ndarray, global_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Rows `ids` (local indices) of params and Adam state, labelled with their global ids."""
    out = {"ids": np.asarray(global_ids, dtype=np.int64)}
    for n in PARAM_NAMES:
        out[n] = params[n][ids]
        out[f"adam.m.{n}"] = optimizer.m[n][ids]
        out[f"adam.v.{n}"] = optimizer.v[n][ids]
    t = optimizer.t[ids] if optimizer.lazy_rows else np.full(len(ids), optimizer.t[0])
    out["adam.t"] = t.astype(np.int64)
    return out


def write_part(path: Path, tensors: dict[str, np.ndarray], layer: int) -> dict:
    entry = write_tensors(path, tensors)
    entry.update(kind="experts", layer=int(layer), n_experts=int(tensors["ids"].shape[0]))
    return entry


def read_rows(folder: Path, entries: dict[str, dict], layer: int, wanted: np.ndarray) -> dict[str, np.ndarray]:
    """Gather the rows of global ids `wanted` (in that order) for one layer from the part files."""
    wanted = np.asarray(wanted, dtype=np.int64)
    found: dict[str, np.ndarray] | None = None
    have = np.zeros(wanted.shape[0], dtype=bool)
    for fname, entry in sorted(entries.items()):
        if entry.get("kind") != "experts" or entry.get("layer") != layer:
            continue
        data = (Path(folder) / fname).read_bytes()
        if sha256_bytes(data) != entry.get("sha256"):
            raise CheckpointError(f"{fname} does not match its sha256 (tampered or corrupt)")
        part = st_load(data)
        ids_in = part["ids"]  # ascending
        if ids_in.size == 0:
            continue
        pos = np.clip(np.searchsorted(ids_in, wanted), 0, ids_in.size - 1)
        hit = ids_in[pos] == wanted
        if not hit.any():
            continue
        if found is None:
            found = {k: np.zeros((wanted.shape[0],) + v.shape[1:], dtype=v.dtype) for k, v in part.items()}
        for k, v in part.items():
            found[k][hit] = v[pos[hit]]
        have |= hit
    if found is None or not have.all():
        missing = wanted[~have][:5].tolist()
        raise CheckpointError(f"layer {layer}: no expert file holds experts {missing}")
    return found


def import_rows(params: dict[str, np.ndarray], optimizer: Adam, ids: np.ndarray, rows: dict[str, np.ndarray]) -> None:
    """Write gathered rows into local indices `ids`, checking shapes and dtypes."""
    for n in PARAM_NAMES:
        for key, dst in ((n, params[n]), (f"adam.m.{n}", optimizer.m[n]), (f"adam.v.{n}", optimizer.v[n])):
            src = rows[key]
            if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
                raise CheckpointError(
                    f"expert {key!r}: expected {dst.dtype}{list(dst.shape[1:])} rows, got {src.dtype}{list(src.shape[1:])}"
                )
            dst[ids] = src
    if optimizer.lazy_rows:
        optimizer.t[ids] = rows["adam.t"]
    else:
        optimizer.t[0] = int(rows["adam.t"].max(initial=0))

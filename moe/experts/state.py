"""Expert state on disk: two safetensors files per (layer, holder), rows indexed by global expert id.

`<stem>.safetensors` (manifest kind "experts") holds `ids` int64[n] (the holder's global
expert ids, ascending) and the weight rows `w1` [n, d, h], `b1`, `w2`, `b2`.
`<stem>.adam.safetensors` (kind "experts-adam") holds the Adam state of the experts that
have one: `ids` int64[s] (ascending, a subset of the holder's), `adam.t` int64[s] (each
expert's own step count, >= 1) and `adam.m.<p>`, `adam.v.<p>` [s, ...]. An expert that was
never updated is absent from it, not zero-filled. Keeping the moments apart lets an
inference load read (and verify, whole) only the weights file.

Whoever holds experts (this process, or a shard server) writes its own pair; any holder can
load any subset of ids from any set of files, which is what makes loading into a different
number of shards work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe.checkpoint import CheckpointError
from moe.experts import partfile
from moe.optim import Adam, AdamConfig

PARAM_NAMES = ("w1", "b1", "w2", "b2")
WEIGHTS, ADAM = "experts", "experts-adam"  # manifest kinds


def part_stem(layer: int, shard: int | None = None) -> str:
    return f"experts-l{layer}" if shard is None else f"experts-l{layer}-s{shard}"


def export_rows(params: dict[str, np.ndarray], optimizer: Adam, global_ids: np.ndarray) -> dict[str, np.ndarray]:
    """All of a holder's rows (local index i = global id global_ids[i]) in the file layout:
    weights of every row under their names, and under "adam.*" the state of the rows that
    have one, plus "adam.ids". The weights are the holder's own arrays (no copy)."""
    global_ids = np.asarray(global_ids, dtype=np.int64)
    out = {"ids": global_ids, **{n: params[n] for n in PARAM_NAMES}}
    sd = optimizer.state_dict()
    if optimizer.lazy_rows:
        have = np.flatnonzero(sd["t"])
        t = sd["t"][have]
    else:  # dense Adam: every row took every step
        have = np.arange(global_ids.size) if sd["t"][0] > 0 else np.zeros(0, dtype=np.int64)
        t = np.full(have.size, sd["t"][0], dtype=np.int64)
    out["adam.ids"], out["adam.t"] = global_ids[have], t
    for n in PARAM_NAMES:
        for k in "mv":
            out[f"adam.{k}.{n}"] = sd[f"{k}.{n}"] if optimizer.lazy_rows else sd[f"{k}.{n}"][have]
    return out


def write_part(folder: Path, stem: str, rows: dict[str, np.ndarray], layer: int) -> dict[str, dict]:
    """Write the weights and Adam files of `rows` (as export_rows gives) into folder under
    `stem`; return their manifest entries."""
    weights = {"ids": rows["ids"], **{n: rows[n] for n in PARAM_NAMES}}
    adam = {"ids": rows["adam.ids"], "adam.t": rows["adam.t"],
            **{f"adam.{k}.{n}": rows[f"adam.{k}.{n}"] for n in PARAM_NAMES for k in "mv"}}
    entries = {}
    for fname, tensors, kind, n in ((f"{stem}.safetensors", weights, WEIGHTS, rows["ids"].size),
                                    (f"{stem}.adam.safetensors", adam, ADAM, rows["adam.ids"].size)):
        entry = partfile.write(Path(folder) / fname, tensors)
        entry.update(kind=kind, layer=int(layer), n_experts=int(n))
        entries[fname] = entry
    return entries


def _parts(entries: dict[str, dict], layer: int, kind: str) -> list[tuple[str, dict]]:
    return sorted((f, e) for f, e in entries.items() if e.get("kind") == kind and e.get("layer") == layer)


def _locate(ids_in: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in the file, positions in wanted) of the wanted ids that the file holds."""
    order = np.argsort(wanted, kind="stable")
    w = wanted[order]
    pos = np.clip(np.searchsorted(ids_in, w), 0, max(ids_in.size - 1, 0))
    hit = ids_in[pos] == w if ids_in.size else np.zeros(w.size, dtype=bool)
    return pos[hit], order[hit]


def _ids(reader: partfile.PartReader) -> np.ndarray:
    ids = reader.read("ids")
    if ids.ndim != 1 or ids.dtype != np.int64 or np.any(np.diff(ids) <= 0):
        raise CheckpointError(f"{reader.name}: ids must be ascending distinct int64")
    return ids


def load_weights(folder: Path, entries: dict[str, dict], layer: int, wanted: np.ndarray,
                 params: dict[str, np.ndarray]) -> None:
    """params[n][i] = the row of global id wanted[i], from whichever weight files hold it.

    Every file read is verified whole against its sha256 first; rows go straight into
    params, a chunk at a time, so loading costs the weights and no second copy."""
    wanted = np.asarray(wanted, dtype=np.int64)
    have = np.zeros(wanted.size, dtype=bool)
    for fname, entry in _parts(entries, layer, WEIGHTS):
        with partfile.PartReader(Path(folder) / fname, entry) as f:
            src, dst = _locate(_ids(f), wanted)
            for n in PARAM_NAMES:
                f.read_rows_into(n, src, params[n], dst)
            have[dst] = True
    if not have.all():
        raise CheckpointError(f"layer {layer}: no expert file holds experts {wanted[~have][:5].tolist()}")


def load_adam(folder: Path, entries: dict[str, dict], layer: int, wanted: np.ndarray, optimizer: Adam) -> None:
    """Replace optimizer's state by that of global ids `wanted` (rows of its params) from the
    Adam files; experts absent from every file have no state (t = 0, no moments)."""
    wanted = np.asarray(wanted, dtype=np.int64)
    t = np.zeros(wanted.size, dtype=np.int64)
    found: list[tuple[partfile.PartReader, np.ndarray, np.ndarray]] = []
    readers: list[partfile.PartReader] = []
    try:
        for fname, entry in _parts(entries, layer, ADAM):
            readers.append(partfile.PartReader(Path(folder) / fname, entry))
        for f in readers:
            src, dst = _locate(_ids(f), wanted)
            step = f.read("adam.t")
            if step.shape != (f.shape("ids")[0],) or (step < 1).any():
                raise CheckpointError(f"{f.name}: adam.t must hold a step count >= 1 per id")
            t[dst] = step[src]
            found.append((f, src, dst))
        rows = np.flatnonzero(t)  # local rows with state, ascending
        place = np.full(wanted.size, -1, dtype=np.int64)
        place[rows] = np.arange(rows.size)
        sd = {"t": t if optimizer.lazy_rows else np.array([t.max(initial=0)], dtype=np.int64)}
        for n, p in optimizer.params.items():
            for k in "mv":
                dst_arr = np.zeros((rows.size if optimizer.lazy_rows else p.shape[0],) + p.shape[1:], dtype=p.dtype)
                for f, src, dst in found:
                    f.read_rows_into(f"adam.{k}.{n}", src, dst_arr, place[dst] if optimizer.lazy_rows else dst)
                sd[f"{k}.{n}"] = dst_arr
        for f in readers:
            f.close()
    except BaseException:
        for f in readers:
            f.abort()
        raise
    try:
        optimizer.load_state_dict(sd)
    except ValueError as e:
        raise CheckpointError(f"layer {layer}: {e}") from None


def read_rows(folder: Path, entries: dict[str, dict], layer: int, wanted: np.ndarray) -> dict[str, np.ndarray]:
    """Everything about global ids `wanted`, as LocalExperts.state_dict gives it (lazy Adam):
    weights [n, ...], "adam.t" [n] (0: no state) and "adam.m/v.<p>" for the rows with t > 0."""
    wanted = np.asarray(wanted, dtype=np.int64)
    first = _parts(entries, layer, WEIGHTS)
    if not first:
        raise CheckpointError(f"layer {layer}: the checkpoint lists no expert files")
    with partfile.PartReader(Path(folder) / first[0][0], first[0][1]) as f:
        shapes = {n: (f.shape(n)[1:], f.dtype(n)) for n in PARAM_NAMES}
    params = {n: np.empty((wanted.size,) + s, dtype=dt) for n, (s, dt) in shapes.items()}
    load_weights(folder, entries, layer, wanted, params)
    optimizer = Adam(params, AdamConfig(), lazy_rows=True)
    load_adam(folder, entries, layer, wanted, optimizer)
    return {**params, **optimizer.state_dict("adam.")}

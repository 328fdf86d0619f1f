"""Atomic checkpoints: safetensors files plus a JSON manifest that names their sha256.

Layout of one checkpoint (see docs/FORMAT.md):

    <root>/step-00000100/
        params.safetensors     model parameters (not the experts)
        optim.safetensors      optimizer state and data-order arrays (unread by inference loads)
        experts-l<L>*.safetensors, experts-l<L>*.adam.safetensors
                               expert weights and their Adam state (moe.experts.state)
        manifest.json          written last: format, step, config, RNG states, data cursor,
                               task registry, {file: {sha256, bytes}}, and the sha256 of
                               all of that (`digest`)

Writing goes to a hidden temporary folder: each file is written and fsynced, the manifest
last, then the folder is renamed into place and the parent folder fsynced. A folder without
a manifest is not a checkpoint; temporary folders left by a killed writer are removed by the
next save or resume. Loading verifies the manifest's digest and every file's hash, and
refuses anything edited, tampered with or truncated.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from moe.processes import pid_alive

FORMAT = "moe.checkpoint/3"  # 2: expert Adam state in its own files, touched experts only; 3: and the digest
OPTIM_FILE = "optim.safetensors"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_DIR = re.compile(r"^\.step-\d{8}\.tmp-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, tampered with or incompatible."""


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tensors(path: Path, tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Write one safetensors file durably; return its manifest entry."""
    data = st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()})
    _fsync_write(path, data)
    return {"sha256": sha256_bytes(data), "bytes": len(data)}


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), the `digest` key left out."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return sha256_bytes(text.encode())


def remove_stale(root: str | Path) -> list[Path]:
    """Remove the `.step-*.tmp-PID` folders of writers that are gone (or of this process,
    which is not writing while it calls this). Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    for p in root.iterdir():
        m = _TMP_DIR.match(p.name)
        if m and p.is_dir() and (int(m.group(1)) == os.getpid() or not pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def save_checkpoint(
    root: str | Path,
    step: int,
    files: dict[str, dict[str, np.ndarray]],
    manifest: dict[str, Any],
    *,
    keep_last: int | None = None,
    writers: list[Callable[[Path], dict[str, dict[str, Any]]]] = (),
) -> Path:
    """Write `files` ({"params": tensors, ...}) and the manifest atomically.

    Each of `writers` is called with the temporary folder and writes further files into it
    (expert parts, possibly by other processes), returning their manifest entries. This is
    the first phase; the manifest, written after all of them, is the commit.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        entries = {f"{name}.safetensors": write_tensors(tmp / f"{name}.safetensors", t) for name, t in files.items()}
        for write in writers:
            entries.update(write(tmp))
        full = {"format": FORMAT, "step": int(step), **manifest, "files": entries}
        full["digest"] = manifest_digest(full)
        _fsync_write(tmp / MANIFEST, json.dumps(full, indent=1, sort_keys=True).encode())
        fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. after a rollback) replaces it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root (those with a manifest), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, or a run/checkpoints folder meaning its newest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if (p / MANIFEST).is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        found = list_checkpoints(candidate)
        if found:
            return found[-1]
    raise CheckpointError(f"{str(p)!r} holds no complete checkpoint (no {MANIFEST} found)")


def read_manifest(path: str | Path) -> dict[str, Any]:
    p = resolve(path)
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {str(p)!r}: manifest is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"checkpoint {str(p)!r}: expected format {FORMAT!r}, got {got!r}")
    try:
        want = manifest_digest(manifest)
    except ValueError:  # NaN or Inf: json.loads accepts them, no writer of ours writes them
        want = None
    if manifest.get("digest") != want:
        raise CheckpointError(f"checkpoint {str(p)!r}: manifest.json was edited (its digest does not match "
                              f"its contents)")
    require(manifest, {"step": int, "files": dict}, p)
    return manifest


def require(manifest: dict[str, Any], keys: dict[str, type], where: str | Path) -> None:
    """Each key present with the given JSON type, or one clear CheckpointError (never a KeyError)."""
    for key, kind in keys.items():
        value = manifest.get(key)
        if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            got = "nothing" if value is None else type(value).__name__
            raise CheckpointError(f"checkpoint {str(where)!r}: manifest key {key!r} must be a "
                                  f"{kind.__name__}, got {got}")


def load_checkpoint(
    path: str | Path, *, load_experts: bool = False, optimizer: bool = True
) -> tuple[dict[str, Any], dict[str, dict[str, np.ndarray]], Path]:
    """Read and verify a checkpoint: (manifest, {name: tensors}, folder).

    Expert part files are verified and read by their holders (`load_part`), not here,
    unless load_experts is set. optimizer=False (an inference load) leaves the optimizer
    file unread."""
    p = resolve(path)
    manifest = read_manifest(p)
    out: dict[str, dict[str, np.ndarray]] = {}
    for fname, entry in manifest["files"].items():
        if str(entry.get("kind", "")).startswith("experts") and not load_experts:
            continue  # read (and verified) by whoever holds those experts
        if fname == OPTIM_FILE and not optimizer:
            continue
        fpath = p / fname
        if not fpath.is_file():
            raise CheckpointError(f"checkpoint {str(p)!r}: file {fname!r} is missing")
        data = fpath.read_bytes()
        if len(data) != entry.get("bytes"):
            raise CheckpointError(
                f"checkpoint {str(p)!r}: {fname} has {len(data)} bytes, manifest says {entry.get('bytes')} (truncated?)"
            )
        if sha256_bytes(data) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint {str(p)!r}: {fname} does not match its sha256 (tampered or corrupt)")
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError) as e:
            raise CheckpointError(f"checkpoint {str(p)!r}: {fname} is not a valid safetensors file ({e})") from None
        out[fname.removesuffix(".safetensors")] = tensors
    return manifest, out, p


def assign(target: dict[str, np.ndarray], source: dict[str, np.ndarray], what: str) -> None:
    """Copy arrays into existing ones of the same names, shapes and dtypes, or say what differs."""
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    if missing or extra:
        raise CheckpointError(f"{what}: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, dst in target.items():
        src = source[name]
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise CheckpointError(
                f"{what} {name!r}: expected {dst.dtype}{list(dst.shape)}, got {src.dtype}{list(src.shape)}"
            )
        dst[...] = src

"""Shared by the JAX test workers (they run in a subprocess with XLA's forced host devices):
the tasks, random batches, the error norm and the comparison of a JaxMoE against the numpy
model on one batch.

Norm: err = max|jax - numpy| / max(max|numpy|, 1e-30), i.e. max abs error relative to the
numpy array's max abs."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
# Cheaper XLA CPU codegen: the test programs are tiny, compile time dominates.
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def run_worker(script: str, out_dir: str, n_devices: int = 8, timeout: float = 300, fast: bool = True) -> str:
    """Run `script --worker out_dir` with n_devices forced host devices; its stdout.
    fast=False: XLA's default optimisation (what users run), for claims about compiled bits."""
    flags = f"--xla_force_host_platform_device_count={n_devices}" + (f" {FAST_XLA}" if fast else "")
    env = {**os.environ, "XLA_FLAGS": flags,
           "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, script, "--worker", out_dir], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"JAX worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def specs():
    from moe.tasks.spec import TaskSpec

    return [TaskSpec("cls", "multiclass", 5, 3), TaskSpec("reg", "regression", 7, 2, loss_weight=0.5),
            TaskSpec("lab", "multilabel", 4, 3), TaskSpec("bin", "binary", 6, 1)]


def learnable_tasks(rng, sizes=(256, 64, 64)):
    """TaskData for "cls" (argmax of the first 3 inputs) and "reg" (0.8 x the first 2)."""
    from moe.tasks.spec import TaskData

    data = []
    for s in specs()[:2]:
        def split(n, s=s):
            x = rng.standard_normal((n, s.n_inputs), dtype=np.float32)
            if s.kind == "multiclass":
                y = np.argmax(x[:, : s.n_outputs], axis=1).astype(np.int32)
            else:
                y = (x[:, : s.n_outputs] * 0.8).astype(np.float32)
            return x, y
        (xtr, ytr), (xva, yva), (xte, yte) = (split(n) for n in sizes)
        zeros, ones = np.zeros(s.n_inputs, np.float32), np.ones(s.n_inputs, np.float32)
        extra = ({"y_mean": np.zeros(2, np.float32), "y_std": np.ones(2, np.float32)}
                 if s.kind == "regression" else {"classes": np.arange(s.n_outputs)})
        data.append(TaskData(s, xtr, ytr, xva, yva, xte, yte, zeros, ones, **extra))
    return data


def many_tasks(rng, n: int, n_train: int = 64):
    """n small tasks over two domains (widths 5 and 7) and private inputs, two head shapes."""
    from moe.tasks.spec import TaskData, TaskSpec

    data = []
    for i in range(n):
        width, classes = (5, 3) if i % 2 else (7, 2)
        domain = None if i % 3 == 2 else f"dom{width}"
        s = TaskSpec(f"t{i}", "multiclass", width, classes, domain=domain)
        x = [rng.standard_normal((m, width), dtype=np.float32) for m in (n_train, 16, 16)]
        y = [np.argmax(xi[:, :classes] + 0.1 * i, axis=1).astype(np.int32) for xi in x]
        data.append(TaskData(s, x[0], y[0], x[1], y[1], x[2], y[2], np.zeros(width, np.float32),
                             np.ones(width, np.float32), classes=np.arange(classes)))
    return data


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))) if b.size else 0.0, 1e-30))


def make_chunks(rng, sizes):
    from moe.model import Chunk

    out = []
    for s, n in zip(specs(), sizes, strict=True):
        if not n:
            continue
        x = rng.standard_normal((n, s.n_inputs), dtype=np.float32)
        if s.kind == "multiclass":
            y = rng.integers(0, s.n_outputs, n).astype(np.int32)
        elif s.kind == "regression":
            y = rng.standard_normal((n, s.n_outputs), dtype=np.float32)
        else:
            y = (rng.random((n, s.n_outputs)) < 0.5).astype(np.float32)
        out.append(Chunk(s.name, x, y))
    return out


def random_model(name: str, mc, head_hidden=None):
    """A model whose gates matter (noisy top-k starts them at zero) and a generator for the batch."""
    from moe.model import MultiTaskMoE
    from moe.tasks.spec import TaskRegistry

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    model = MultiTaskMoE(mc, TaskRegistry(specs()), rng=rng, head_hidden=head_hidden)
    for n, p in model.params.items():
        if ".gate." in n:
            p[...] = rng.standard_normal(p.shape, dtype=np.float32) * np.float32(0.5)
    return model, rng


def compare(model, mc, chunks, jm, train: bool) -> dict:
    """Numpy forward + backward against jm.loss_and_grads on the same batch and noise."""
    from moe.train import task_loss

    B = sum(ch.x.shape[0] for ch in chunks)
    noise = np.random.default_rng(7)
    twin = np.random.default_rng()
    twin.bit_generator.state = noise.bit_generator.state  # the same draws for JAX
    eps = [twin.standard_normal((B, mc.n_experts), dtype=np.float32)
           if (train and g == "noisy_topk") else None for g in mc.gates]
    ref = model.forward(chunks, train=train, rng=noise, grad=True)  # eval-mode gradients too
    loss, d_outs = task_loss(model, chunks, ref.outputs)
    model.backward(d_outs)
    got, grads = jm.loss_and_grads(chunks, train=train, eps=eps)
    res = {
        "outputs": max(rel(a, b) for a, b in zip(got.outputs, ref.outputs, strict=True)),
        "loss": rel(got.loss, loss + ref.aux_loss),
        "aux": rel(got.aux_loss, ref.aux_loss),
        "aux_value": ref.aux_loss,
        "dropped": int(sum(r.dropped for r in ref.routings)),
        "grad_names_match": sorted(grads) == sorted(model.grads),
        "grads": {n: rel(grads[n], model.grads[n]) for n in model.grads},
        "grad_max": {n: float(np.max(np.abs(model.grads[n]))) for n in model.grads},
    }
    for i, (r, jr) in enumerate(zip(ref.routings, got.routings, strict=True)):
        res[f"l{i}.index_equal"] = bool(np.array_equal(r.expert_index, jr["expert_index"]))
        res[f"l{i}.keep_equal"] = bool(np.array_equal(r.gates != 0, jr["keep"]))
        res[f"l{i}.counts_equal"] = bool(np.array_equal(r.counts, jr["counts"].astype(np.int32)))
        res[f"l{i}.gates"] = rel(jr["gates"], r.gates)
        res[f"l{i}.importance"] = rel(jr["importance"], r.importance)
        res[f"l{i}.load"] = rel(jr["load"], r.load)
    return res

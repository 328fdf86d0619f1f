"""The JAX backend's Adam step (moe.accel.jax_train.adam_step): the same bits as the update
written as one expression, and a compiled program that copies no parameter-sized array
(subprocess with 2 forced host devices, as test_accel_jax explains).

Why the second: written as one expression, XLA recomputed the new moments inside the
weight's kernel from the old ones and so copied every donated moment before overwriting it
(Adam at 1 x 8 took 32 ms where its traffic is 13 ms; bench/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.accel

HAVE_JAX = importlib.util.find_spec("jax") is not None
E, D, H = 8, 32, 64


def _worker() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe.accel.jax_train import adam_step
    from moe.optim import AdamConfig

    cfg = AdamConfig(weight_decay=0.01)
    rng = np.random.default_rng(0)

    def arr(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * scale)

    names = {"block0.moe.experts.w1": (E, D, H), "dense.w": (D, 16)}
    state = {"params": {n: arr(*s) for n, s in names.items()},
             "m": {n: arr(*s, scale=0.1) for n, s in names.items()},
             "v": {n: jnp.abs(arr(*s, scale=0.1)) for n, s in names.items()},
             "t": jnp.int32(4), "t_rows": {"block0": jnp.asarray(np.arange(E, dtype=np.int32))}}
    grads = {n: arr(*s) for n, s in names.items()}
    touched = {"block0": jnp.asarray(np.arange(E) % 3 != 1)}
    lr = jnp.float32(1e-2)

    def one_expression(state):
        """The update as it was written before: p, m, v from the old moments in one go."""
        sq = sum(jnp.sum(jnp.square(g)) for g in grads.values())
        norm = jnp.sqrt(sq)
        scale = jnp.where(norm > 1.0, 1.0 / norm, 1.0)
        out = {}
        for n, p in state["params"].items():
            g, m, v = grads[n] * scale, state["m"][n], state["v"][n]
            if n.startswith("block0"):
                t_rows = state["t_rows"]["block0"] + touched["block0"].astype(jnp.int32)
                t = jnp.maximum(t_rows, 1).reshape(-1, 1, 1).astype(jnp.float32)
                hit = touched["block0"].reshape(-1, 1, 1)
            else:
                t, hit = (state["t"] + 1).astype(jnp.float32), True
            mm = cfg.beta1 * m + (1 - cfg.beta1) * g
            vv = cfg.beta2 * v + (1 - cfg.beta2) * (g * g)
            upd = (mm / (1 - cfg.beta1 ** t)) / (jnp.sqrt(vv / (1 - cfg.beta2 ** t)) + cfg.eps) + cfg.weight_decay * p
            out[n] = [jnp.where(hit, p - lr * upd, p), jnp.where(hit, mm, m), jnp.where(hit, vv, v)]
        return out

    want = jax.jit(one_expression)(state)
    got, _ = jax.jit(lambda s: adam_step(s, grads, touched, lr, 1.0, cfg))(state)
    equal = {n: [bool(np.array_equal(np.asarray(got[k][n]), np.asarray(want[n][i])))
                 for i, k in enumerate(("params", "m", "v"))] for n in names}
    changed = {n: bool(not np.array_equal(np.asarray(got["params"][n]), np.asarray(state["params"][n])))
               for n in names}

    step = jax.jit(lambda s: adam_step(s, grads, touched, lr, 1.0, cfg), donate_argnums=(0,))
    hlo = step.lower(state).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    copies = re.findall(r"= (f32\[[0-9,]*\])\{[^}]*\} copy\(", entry[:entry.index("\n}")])
    return {"equal": equal, "changed": changed, "copies": copies,
            "param_types": [f"f32[{','.join(map(str, s))}]" for s in names.values()]}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not HAVE_JAX:
        pytest.skip("jax is not installed (pip install 'moe[accel]' or jax[cpu]) - the JAX Adam step not tested")
    from accel.jaxcheck import run_worker

    # XLA's default optimisation, as users compile: the bits of a formula are the compiler's
    # (at -O0 the loop emitters moe selects, moe.accel.xla_flags, evaluate pow differently
    # in the two forms: 19 of 16,384 weights differ)
    out = run_worker(__file__, str(tmp_path_factory.mktemp("adam")), n_devices=2, timeout=240, fast=False)
    return json.loads(out.strip().splitlines()[-1])


def test_the_update_has_the_bits_of_the_one_expression_form(results):
    assert results["changed"] == {"block0.moe.experts.w1": True, "dense.w": True}
    assert all(all(v) for v in results["equal"].values()), results["equal"]


def test_the_compiled_step_copies_no_parameter_sized_array(results):
    big = set(results["param_types"])
    assert not [c for c in results["copies"] if c in big], results["copies"]


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    print(json.dumps(_worker()))

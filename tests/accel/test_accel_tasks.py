"""Per-task work only on its own rows (issue 12): the JAX program of a model with 400 tasks has
the operations of the program of a model with 200 (same encoder widths and head shapes,
tables larger than a device's rows, so the same static block shapes), its scratch memory
grows at most by the size of the added table rows, and it still equals the numpy model.

Why these checks and not a timing: compile time and memory follow the program's size and
XLA's buffer assignment, which `Compiled.as_text()` and `Compiled.memory_analysis()` report
exactly; a layout that runs every task on every row (`where` per task) grows the program
with the number of tasks, and one that expands to every group (XLA:CPU's ragged_dot) grows
the scratch with tasks x batch. The timings are in bench/jax_tasks.py.

A subprocess does the JAX work on 2 simulated CPU devices (see test_accel_jax for why);
norms as tests/accel/jaxcheck.py.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

pytestmark = pytest.mark.accel

HAVE_JAX = importlib.util.find_spec("jax") is not None
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
COUNTS = (200, 400)


# ============================================================================ worker (subprocess)
def _worker(out_dir: str) -> dict:
    import jax
    import numpy as np
    from accel.jaxcheck import compare, many_tasks

    from moe.accel.jax_backend import JaxMoE, make_mesh
    from moe.accel.jax_model import pack_batch
    from moe.config import ModelConfig
    from moe.model import Chunk, MultiTaskMoE
    from moe.tasks.spec import TaskRegistry

    mc = ModelConfig(d_model=16, n_experts=8, d_hidden=16, k=2, d_task_emb=4, capacity_factor=None)
    mesh = make_mesh(2)
    out: dict = {}
    for n in COUNTS:
        data = many_tasks(np.random.default_rng(0), n, n_train=16)
        model = MultiTaskMoE(mc, TaskRegistry([d.spec for d in data]), rng=np.random.default_rng(1))
        for name, p in model.params.items():  # gates that matter (noisy top-k starts them at zero)
            if ".gate." in name:
                p[...] = np.random.default_rng(2).standard_normal(p.shape, dtype=np.float32) * np.float32(0.5)
        jm = JaxMoE(model, mesh)
        # the same 8 tasks in both models: two encoder widths, two domains, private encoders
        chunks = [Chunk(d.name, d.x_train[:8], d.y_train[:8]) for d in data[:8]]
        tid, x, y = pack_batch(jm.spec, chunks)
        compiled = jm._grad.lower(jm.params, *jm.place(tid, x, y), jm._eps(64, True, None, jax.random.key(0))).compile()
        mem = compiled.memory_analysis()
        res = {"instructions": sum(1 for line in compiled.as_text().splitlines() if " = " in line),
               "temp_bytes": int(mem.temp_size_in_bytes),
               "param_bytes": int(sum(p.nbytes for p in model.params.values()))}
        if n == max(COUNTS):
            res["numpy"] = compare(model, mc, chunks, jm, train=True)
            _, grads = jm.loss_and_grads(chunks, train=True, key=jax.random.key(1))
            used = {model.tasks.id(ch.task) for ch in chunks}
            absent = np.array([t for t in range(n) if t not in used])
            heads = {}
            for t in absent:
                key, row = model.head_row[t]
                heads.setdefault(key, []).append(row)
            res["absent_rows_zero"] = bool(
                np.all(grads["task.emb.e"][absent] == 0)
                and all(np.all(grads[f"head.{k}.{w}"][rows] == 0) for k, rows in heads.items() for w in ("w", "b")))
            res["absent_heads"] = sum(len(r) for r in heads.values())
        out[str(n)] = res
    out["blocks"] = _blocks_case()
    return out


def _blocks_case() -> dict:
    """table_linear against gathering every row's own weights (the definition), forward and
    gradients, on row distributions that stress the block bound: one table row for the whole
    batch, every row its own, one big run and singletons, random, a one-row table."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from accel.jaxcheck import rel

    from moe.accel.jax_model import block_shape, table_linear

    rng = np.random.default_rng(9)
    B, i, o = 48, 5, 3
    cases = {"one_row": (7, np.full(B, 4)), "all_distinct": (B, rng.permutation(B)),
             "run_and_singletons": (3, np.array([1] * (B - 2) + [0, 2])), "random": (200, rng.integers(0, 200, B)),
             "one_row_table": (1, np.zeros(B, int)), "few_rows_interleaved": (5, np.arange(B) % 5)}
    res = {}
    for name, (R, rows) in cases.items():
        rows = jnp.asarray(rows, jnp.int32)
        x = jnp.asarray(rng.standard_normal((B, i), dtype=np.float32))
        w = jnp.asarray(rng.standard_normal((R, i, o), dtype=np.float32))
        b = jnp.asarray(rng.standard_normal((R, o), dtype=np.float32))
        dy = jnp.asarray(rng.standard_normal((B, o), dtype=np.float32))

        def ref(x, w, b, rows=rows):
            return jnp.einsum("bi,bio->bo", x, w[rows]) + b[rows]

        got = jax.jit(lambda x, w, b, rows=rows: table_linear(x, w, b, rows))(x, w, b)
        g_got = jax.grad(lambda x, w, b, rows=rows, dy=dy: jnp.sum(table_linear(x, w, b, rows) * dy), (0, 1, 2))(x, w, b)
        g_ref = jax.grad(lambda x, w, b, dy=dy: jnp.sum(ref(x, w, b) * dy), (0, 1, 2))(x, w, b)
        blk, nb = block_shape(B, R)
        need = int(np.sum(-(-np.bincount(np.asarray(rows), minlength=R) // blk)))  # blocks this batch fills
        res[name] = {"out": rel(got, ref(x, w, b)), "grads": max(rel(a, c) for a, c in zip(g_got, g_ref, strict=True)),
                     "blocks_needed": need, "blocks": nb, "padded_rows": nb * blk}
    return res


# ============================================================================ tests (pytest process)
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not HAVE_JAX:
        pytest.skip("jax is not installed (pip install 'moe[accel]' or jax[cpu]) - JAX backend not tested")
    from accel.jaxcheck import run_worker

    out = run_worker(__file__, str(tmp_path_factory.mktemp("tasksrun")), n_devices=2, timeout=280)
    return json.loads(out.strip().splitlines()[-1])


def test_program_does_not_grow_with_tasks(results):
    few, many = (results[str(n)] for n in COUNTS)
    # the same operations on larger tables: XLA's fusion and copy choices may move a few
    # instructions with the sizes; a per-task layout adds instructions for every task
    # (about a thousand each here)
    assert abs(many["instructions"] - few["instructions"]) <= 0.01 * few["instructions"], (few, many)


def test_scratch_grows_at_most_by_the_added_rows(results):
    few, many = (results[str(n)] for n in COUNTS)
    assert many["param_bytes"] > 1.5 * few["param_bytes"]  # the tables really grew
    assert many["temp_bytes"] - few["temp_bytes"] <= many["param_bytes"] - few["param_bytes"], (few, many)


def test_many_tasks_match_numpy(results):
    r = results[str(max(COUNTS))]["numpy"]
    assert r["outputs"] <= FWD_TOL and r["loss"] <= FWD_TOL and r["aux"] <= FWD_TOL, r
    assert r["l0.index_equal"] and r["l0.counts_equal"]
    assert r["grad_names_match"]
    bad = {n: e for n, e in r["grads"].items() if e > GRAD_TOL}
    assert not bad, bad
    assert r["grad_max"]["enc.5.w"] > 0 and r["grad_max"]["enc.7.w"] > 0 and r["grad_max"]["head.o3.w"] > 0


@pytest.mark.parametrize("case", ["one_row", "all_distinct", "run_and_singletons", "random", "one_row_table",
                                  "few_rows_interleaved"])
def test_blocks_equal_every_row_through_its_own_weights(results, case):
    r = results["blocks"][case]
    assert r["out"] <= FWD_TOL and r["grads"] <= FWD_TOL, r
    assert r["blocks_needed"] <= r["blocks"]  # the static bound holds
    assert r["padded_rows"] <= 2 * 48, r  # and costs at most 2 x the rows


def test_tasks_absent_from_the_batch_get_exact_zero_gradients(results):
    r = results[str(max(COUNTS))]
    assert r["absent_heads"] == max(COUNTS) - 8
    assert r["absent_rows_zero"]


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker(sys.argv[sys.argv.index("--worker") + 1])))

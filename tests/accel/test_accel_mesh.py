"""The JAX backend on a 2-D data x expert mesh (8 simulated CPU devices): an executable
plan's placement and per-device capacity, noise that does not depend on the layout,
micro-batches, lazy row-Adam for the experts and the per-task / per-domain tables.

A subprocess does the JAX work, as in test_accel_jax (see its docstring for why); norms are
those of tests/accel/jaxcheck.py (max abs error relative to the numpy array's max abs).
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

pytestmark = pytest.mark.accel

HAVE_JAX = importlib.util.find_spec("jax") is not None
FWD_TOL, GRAD_TOL = 1e-5, 1e-4


# ============================================================================ worker (subprocess)
def _worker(out_dir: str) -> dict:
    import dataclasses
    import math

    import jax
    import numpy as np
    from accel.jaxcheck import compare, learnable_tasks, make_chunks, many_tasks, random_model, rel

    from moe.accel.jax_backend import JaxMoE, make_mesh
    from moe.accel.jax_model import draw_noise
    from moe.accel.jax_train import JaxTrainer
    from moe.accel.layout import Layout
    from moe.bindings.reference import capacity_keep
    from moe.config import Config, ModelConfig, TrainConfig

    assert jax.device_count() == 8
    out: dict = {}
    base = ModelConfig(d_model=16, n_experts=16, d_hidden=24, k=2, n_layers=2,
                       gate="noisy_topk,softmax_topk", capacity_factor=None, w_z=0.01, d_task_emb=4)
    # A balanced placement that is not contiguous: each EP rank gets 4 scattered experts.
    placement = tuple(int(r) for r in np.random.default_rng(5).permutation(np.repeat(np.arange(4), 4)))

    # 1. DP 2 x EP 4, placement, dropless: the numpy model's forward and gradients.
    lay = Layout(ep=4, dp=2, tokens_per_device=8, capacity_factor=None, placement=placement)
    model, rng = random_model("placement", base)
    jm = JaxMoE(model, layout=lay)
    out["mesh_shape"] = dict(jm.mesh.shape)
    out["placement"] = compare(model, base, make_chunks(rng, [20, 20, 8, 16]), jm, True)
    # the slots on EP rank r hold exactly the experts the placement gives r
    E_l = 16 // 4
    out["slots_match_placement"] = all(placement[e] == j // E_l for j, e in enumerate(jm.order))

    # 2. Per-device capacity (GShard): each device keeps its own ceil(cf * b * k / E) rows per expert.
    lay_c = dataclasses.replace(lay, capacity_factor=1.0)
    model, rng = random_model("device_capacity", base)
    jm = JaxMoE(model, layout=lay_c)
    chunks = make_chunks(rng, [20, 20, 8, 16])
    got = jm.forward(chunks, train=False)
    b = 64 // 8
    cap = math.ceil(1.0 * b * 2 / 16)
    keep_ok, counts_ok, dropped = True, True, 0
    for r in got.routings:
        idx, keep = r["expert_index"], r["keep"]
        want = np.concatenate([capacity_keep(idx[i * b:(i + 1) * b], 16, cap) for i in range(8)])
        keep_ok &= bool(np.array_equal(keep, want))
        counts_ok &= bool(np.array_equal(r["counts"], np.bincount(idx[keep], minlength=16)))
        dropped += int((~keep).sum())
    out["device_capacity"] = {"keep_ok": keep_ok, "counts_ok": counts_ok, "dropped": dropped, "cap": cap}

    # 3. The gate noise is the same on every layout (it does not depend on how rows are split).
    spec = jm.spec
    draws = []
    for dp in (1, 2, 8):
        mesh = make_mesh(dp=dp)
        f = jax.jit(lambda key, mesh=mesh: draw_noise(spec, mesh, key, 64))
        draws.append(np.asarray(f(jax.random.key(3))[0]))
    out["noise_same"] = all(np.array_equal(draws[0], d) for d in draws[1:])
    out["noise_std"] = float(draws[0].std())

    # 4. Two micro-batches of 64 rows == one batch of the same 128 rows (no batch-level terms;
    #    no clipping, so Adam's first moment shows the gradient's scale, not only its direction).
    plain = dataclasses.replace(base, n_layers=1, gate="softmax_topk", w_importance=0.0, w_load=0.0, w_z=0.0)
    data = learnable_tasks(np.random.default_rng(1), sizes=(128, 16, 16))
    cfg = Config(model=plain, train=TrainConfig(steps=5, batch_size=64, lr=1e-2, warmup=0, clip_norm=0.0,
                                                baseline=False, progress=False))
    chunks = make_chunks(np.random.default_rng(2), [64, 64, 0, 0])
    from moe.accel.jax_model import pack_batch

    after = []
    for n_micro, t in ((2, 8), (1, 16)):
        tr = JaxTrainer(cfg, data, out_dir, save_checkpoints=False, echo=lambda m: None,
                        layout=Layout(ep=4, dp=2, tokens_per_device=t, n_micro=n_micro))
        tid, x, y = pack_batch(tr.jm.spec, chunks)  # [128, ...]
        arrays = [a.reshape((n_micro, 128 // n_micro) + a.shape[1:]) for a in (tid, x, y)]
        placed = [jax.device_put(a, tr.rows) for a in arrays]
        tr.state, _ = tr.compiled_step(tr.state, *placed, jax.random.key(0), np.float32(1e-2))
        after.append({k: tr.jm.get_params(tr.state[k]) for k in ("params", "m")})
    out["micro_err"] = max(rel(after[0][k][n], after[1][k][n]) for k in ("params", "m") for n in after[0][k])
    out["micro_moved"] = max(float(np.max(np.abs(after[0]["params"][n] - tr.model.params[n]))) for n in tr.model.params)

    # 5. Lazy row-Adam: an expert that receives no rows in a step, and a task (its head and
    #    embedding rows) or a domain (its encoder row) absent from the step's batch, keep their
    #    weights, moments and step counts, also when they have moments from an earlier step
    #    (dense Adam would move them).
    tasks = many_tasks(np.random.default_rng(4), 9)
    cfg5 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=8, sampling="uniform"))
    tr = JaxTrainer(cfg5, tasks, out_dir, save_checkpoints=False, echo=lambda m: None,
                    layout=Layout(ep=8, dp=1, tokens_per_device=1))

    def snap():
        t = {g: np.asarray(v) for g, v in tr.state["t_rows"].items()}
        t["block0"] = tr.jm.experts_from_slots(t["block0"])
        return t, {k: tr.jm.get_params(tr.state[k]) for k in ("params", "m", "v")}

    snaps = [snap()]
    for _ in range(3):
        tr.train_step()
        snaps.append(snap())
    lazy = {}
    for group in ("block0", "task.emb", "head.o2", "head.o3", "enc.5", "enc.7"):
        frozen_ok, moved_ok, stale_idle = True, True, 0
        for (t0, s0), (t1, s1) in zip(snaps, snaps[1:], strict=False):
            idle = t1[group] == t0[group]  # [R] rows the step did not use
            stale_idle += int(np.sum(idle & (t0[group] > 0)))
            for k in ("params", "m", "v"):
                for n in s1[k]:
                    mine = n.startswith(f"{group}.moe.experts.") if group.startswith("block") else n.startswith(f"{group}.")
                    if mine:
                        same = np.all(s1[k][n] == s0[k][n], axis=tuple(range(1, s1[k][n].ndim)))  # [R]
                        frozen_ok &= bool(np.all(same[idle]))
                        if k == "m":
                            moved_ok &= bool(np.all(~same[~idle]))
        lazy[group] = {"t": snaps[-1][0][group].tolist(), "frozen_ok": frozen_ok, "moved_ok": moved_ok,
                       "stale_idle": stale_idle}
    out["lazy"] = lazy
    out["dense_t"] = int(np.asarray(tr.state["t"]))
    return out


# ============================================================================ tests (pytest process)
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    if not HAVE_JAX:
        pytest.skip("jax is not installed (pip install 'moe[accel]' or jax[cpu]) - JAX backend not tested")
    from accel.jaxcheck import run_worker

    out = run_worker(__file__, str(tmp_path_factory.mktemp("meshrun")), timeout=280)
    return json.loads(out.strip().splitlines()[-1])


def test_plan_mesh_and_placement_match_numpy(results):
    assert results["mesh_shape"] == {"data": 2, "expert": 4}
    assert results["slots_match_placement"]
    r = results["placement"]
    assert r["outputs"] <= FWD_TOL and r["loss"] <= FWD_TOL and r["aux"] <= FWD_TOL, r
    for lay in ("l0", "l1"):  # expert ids (not slots) come back, in the numpy model's order
        assert r[f"{lay}.index_equal"] and r[f"{lay}.counts_equal"], lay
        for what in ("gates", "importance", "load"):
            assert r[f"{lay}.{what}"] <= FWD_TOL, (lay, what)
    assert r["grad_names_match"]
    bad = {n: e for n, e in r["grads"].items() if e > GRAD_TOL}
    assert not bad, bad
    assert r["grad_max"]["block0.moe.experts.w1"] > 0 and r["grad_max"]["block1.moe.gate.w_gate"] > 0


def test_per_device_capacity_is_gshards(results):
    r = results["device_capacity"]
    assert r["cap"] == 1 and r["dropped"] > 0  # the capacity really binds
    assert r["keep_ok"] and r["counts_ok"]


def test_gate_noise_does_not_depend_on_the_layout(results):
    assert results["noise_same"]
    assert 0.8 < results["noise_std"] < 1.2  # standard normal, not zeros


def test_micro_batches_average_to_the_whole_batch(results):
    assert results["micro_moved"] > 1e-4  # the step did something
    assert results["micro_err"] <= FWD_TOL, results["micro_err"]


@pytest.mark.parametrize("group", ["block0", "task.emb", "head.o2", "head.o3", "enc.5", "enc.7"])
def test_lazy_adam_freezes_rows_the_batch_did_not_use(results, group):
    r = results["lazy"][group]
    assert results["dense_t"] == 3
    assert min(r["t"]) < 3 and max(r["t"]) >= 2  # some rows sat out steps, some took several
    assert r["stale_idle"] > 0  # an idle row had moments from before: dense Adam would move it
    assert r["frozen_ok"] and r["moved_ok"]


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker(sys.argv[sys.argv.index("--worker") + 1])))

"""Executable plans: the file `moe plan --out` writes and `moe train --plan` refuses or runs.
No JAX here (moe.accel.layout is pure Python)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from moe.accel.devices import DeviceSpec, cpu_mesh
from moe.accel.layout import Layout, read_plan, write_plan
from moe.accel.plan_cli import executable_layout
from moe.accel.planner import plan
from moe.accel.shape import MoEShape
from moe.cli import main
from moe.profiling.placement import lpt_placement

pytestmark = pytest.mark.accel
MODEL = {"n_experts": 16, "k": 2, "n_layers": 1, "d_model": 16, "d_hidden": 24}


def layout(**kw) -> Layout:
    base = dict(ep=4, dp=2, tokens_per_device=8, n_micro=2, capacity_factor=1.25, target="cpu:8", model=MODEL)
    return Layout(**{**base, **kw})


def test_sizes_and_round_trip(tmp_path):
    lay = layout(placement=tuple(np.repeat(np.arange(4), 4)[::-1].tolist()))
    assert (lay.n_devices, lay.micro_batch, lay.batch) == (8, 64, 128)
    path = write_plan(tmp_path / "plan.json", lay)
    assert read_plan(path) == lay
    assert json.loads(path.read_text())["format"] == "moe.plan/1"
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, no leftovers


def test_expert_order_puts_each_expert_on_its_rank():
    placement = tuple(np.random.default_rng(0).permutation(np.repeat(np.arange(4), 4)).tolist())
    order = layout(placement=placement).expert_order(16)
    assert sorted(order.tolist()) == list(range(16))  # a permutation
    assert [placement[e] for e in order] == [j // 4 for j in range(16)]  # slot j lives on rank j // 4
    assert layout().expert_order(16).tolist() == list(range(16))  # contiguous: identity


@pytest.mark.parametrize("kw, match", [
    ({"ep": 0}, "ep must be an integer >= 1, got 0"),
    ({"tokens_per_device": 2.5}, "tokens_per_device must be an integer >= 1, got 2.5"),
    ({"n_micro": True}, "n_micro must be an integer >= 1, got True"),
    ({"capacity_factor": -1.0}, "capacity_factor must be a number > 0 or null"),
])
def test_bad_fields(kw, match):
    with pytest.raises(ValueError, match=match):
        layout(**kw)


@pytest.mark.parametrize("doc, match", [
    ([1, 2], "is not a moe plan"),
    ({"format": "other"}, "expected format 'moe.plan/1', got 'other'"),
    ({"format": "moe.plan/1", "ep": 1, "dp": 1, "tokens_per_device": 4, "shards": 3}, r"unknown key\(s\) \['shards'\]"),
    ({"format": "moe.plan/1", "ep": 1}, r"is missing \['dp', 'tokens_per_device'\]"),
    ({"format": "moe.plan/1", "ep": 1, "dp": 1, "tokens_per_device": 4, "placement": [0, "a"]},
     "placement must be a list of integers"),
    ({"format": "moe.plan/1", "ep": 1, "dp": 1, "tokens_per_device": 4, "model": {"n_experts": 4}},
     "model must hold integer n_experts, k"),
    ({"format": "moe.plan/1", "ep": -2, "dp": 1, "tokens_per_device": 4}, "ep must be an integer >= 1, got -2"),
])
def test_bad_files_say_what_is_wrong(tmp_path, doc, match):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match) as e:
        read_plan(path)
    assert "plan.json" in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_plan(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{ep: 4")
    with pytest.raises(ValueError, match="cannot read plan"):
        read_plan(tmp_path / "bad.json")


def test_model_and_device_mismatches_are_one_line():
    lay = layout()
    with pytest.raises(ValueError, match=r"made for another model: n_experts 16 \(config: 32\), d_model 16 \(config: 64\)"):
        lay.check_model({**MODEL, "n_experts": 32, "d_model": 64})
    with pytest.raises(ValueError, match="puts 18 experts on EP 4; the JAX backend needs EP to divide"):
        dataclasses.replace(lay, model=None).check_model({**MODEL, "n_experts": 18})
    with pytest.raises(ValueError, match="placement must give each of the 4 EP ranks 4 of the 16 experts"):
        layout(placement=(0,) * 16).check_model(MODEL)
    with pytest.raises(ValueError, match=r"lays out EP 4 x DP 2 = 8 devices \(cpu:8\), but this run has 4: 4 x cpu"):
        lay.check_devices(4, "4 x cpu")
    lay.check_model(MODEL)
    lay.check_devices(8, "8 x cpu")


def test_plan_out_writes_the_planners_best(tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["plan", "--target", "tpu-v4-slice", "--tokens", "65536", "--capacity-factors", "1.25", "--out", str(out),
            "--json", "model.n_experts=64", "model.d_model=32", "model.d_hidden=64", "data.n_family=2", "data.n_skills=0", "data.n_digit_sets=0"]
    assert main(args) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    lay = read_plan(out)
    assert (lay.ep, lay.dp, lay.tokens_per_device, lay.capacity_factor) == (
        best["ep"], best["dp"], best["tokens_per_device"], best["capacity_factor"])
    assert lay.n_devices == 64 and lay.target == "tpu-v4-slice" and lay.device == "tpu-v4"
    assert lay.model == {"n_experts": 64, "k": 2, "n_layers": 1, "d_model": 32, "d_hidden": 64}
    assert lay.placement is None  # no profile: contiguous
    assert lay.predicted["step_time_s"] == pytest.approx(best["step_time_s"])


def test_plan_out_with_a_profile_carries_the_lpt_placement(tmp_path, capsys):
    loads = np.random.default_rng(0).gamma(0.5, size=64) + 0.01
    prof = tmp_path / "profile.json"
    prof.write_text(json.dumps({"load": loads.tolist()}))
    out = tmp_path / "plan.json"
    args = ["plan", "--target", "tpu-v4-slice", "--tokens", "65536", "--capacity-factors", "none", "--profile",
            str(prof), "--out", str(out), "model.n_experts=64", "model.d_model=32", "model.d_hidden=64",
            "data.n_family=2", "data.n_skills=0", "data.n_digit_sets=0"]
    assert main(args) == 0
    lay = read_plan(out)
    assert "wrote" in capsys.readouterr().out
    assert lay.placement is not None and lay.ep > 1
    want = lpt_placement(loads, lay.ep, capacity=64 // lay.ep)
    assert list(lay.placement) == want.tolist()
    lay.check_model({**MODEL, "n_experts": 64, "d_model": 32, "d_hidden": 64})  # balanced: runnable


def test_executable_layout_skips_ep_that_does_not_divide_the_experts():
    s = MoEShape(d_model=64, d_hidden=128, n_experts=48, k=2, n_layers=1, tokens=8192, capacity_factor=1.25)
    result = plan(s, cpu_mesh(32, _FAKE_CPU), capacity_factors=(1.25,), top=1000)
    model = {"n_experts": 48, "k": 2, "n_layers": 1, "d_model": 64, "d_hidden": 128}
    first32 = [r for r in result.ranked if r.ep == 32] + [r for r in result.ranked if r.ep != 32]
    assert first32[0].ep == 32  # 48 experts cannot be split over 32 devices
    lay = executable_layout(dataclasses.replace(result, ranked=first32), "cpu:32", model)
    assert lay.ep != 32 and 48 % lay.ep == 0
    with pytest.raises(ValueError, match="none of the 1 best layouts on cpu:32 splits the 48 experts evenly"):
        executable_layout(dataclasses.replace(result, ranked=first32[:1]), "cpu:32", model)


def test_cpu_mesh_shares_the_machine():
    pod = cpu_mesh(8, _FAKE_CPU)
    assert pod.n_devices == 8 and pod.name == "cpu:8"
    assert pod.device.peak_flops == pytest.approx(_FAKE_CPU.peak_flops / 8)
    assert pod.device.hbm_bw == pytest.approx(_FAKE_CPU.hbm_bw / 8)
    assert pod.device.injection_bw == pytest.approx(_FAKE_CPU.hbm_bw / 8)
    assert pod.peak_flops == pytest.approx(_FAKE_CPU.peak_flops)  # the whole mesh is the machine


def test_plan_flags_need_the_jax_backend(tmp_path, capsys):
    assert main(["train", "--plan", str(tmp_path / "p.json"), "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err.strip() == "moe train: error: --plan need(s) --backend jax"
    assert main(["train", "--backend", "jax", "--processes", "2", "steps=1"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["train", "--backend", "jax", "--coordinator", "10.0.0.1:x", "--out", str(tmp_path)]) == 2
    assert "--coordinator must be HOST:PORT or auto, got '10.0.0.1:x'" in capsys.readouterr().err
    assert main(["train", "--backend", "jax", "--coordinator", "10.0.0.1:1234", "--out", str(tmp_path)]) == 2
    assert "needs --num-processes N and --process-id I" in capsys.readouterr().err


_FAKE_CPU = DeviceSpec("cpu", peak_flops=100e9, hbm_bytes=16 * 2**30, hbm_bw=20e9, link_bw=0.0, links_per_chip=0)

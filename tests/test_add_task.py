"""Adding tasks through the experts (issue 10), on a small trained model.

Oracles: bit-for-bit outputs of every other task before and after (compartmentalised growth),
an explicit refit for the closed-form leave-one-out probe, the source checkpoint's optimizer
rows for the extended one, and sha256 integrity checks for added-task checkpoints.
"""

import dataclasses
import json

import numpy as np
import pytest

from moe import checkpoint as ckpt
from moe.added import new_run_folder, save_added
from moe.api import load
from moe.config import Config, load_config
from moe.datasets import load_added, load_source, source_of
from moe.experts import state
from moe.model import Chunk
from moe.tasks.skills import skill_task
from moe.train import Trainer, predict_split
from moe.transfer import FIXED_EPOCHS, FitRule, add_task, result_record, with_added_record
from moe.transfer_start import loo_ridge_error

pytestmark = [pytest.mark.unit, pytest.mark.timeout(600)]

SMALL = ["n_family=2", "family_size=120", "n_skills=3", "skill_size=60", "model.d_model=16", "model.n_experts=8",
         "model.d_hidden=16", "batch_size=64", "steps=40", "checkpoint_every=40", "eval_every=40",
         "baseline=false", "progress=false"]
FAST = dict(head_hidden=8, rule=FitRule(max_epochs=60, patience=10))


@pytest.fixture(scope="module")
def trunk(tmp_path_factory):
    out = tmp_path_factory.mktemp("trunk") / "run"
    config = load_config(None, SMALL)
    source = source_of(config.data)
    Trainer(config, load_source(source), out, data_source=source, echo=lambda _: None).train()
    return out


def _outputs(model, data):
    return {d.name: predict_split(model, d, "test") for d in data}


_SKILLS = {}


def _skill(t: int):
    if t not in _SKILLS:  # building the skill bank takes a while: once per task
        _SKILLS[t] = load_added({"skill": t, "seed": 0, "size": 60, "name": f"skill_{t:03d}"})
    return _SKILLS[t]


def test_closed_form_leave_one_out_matches_refitting():
    from moe.transfer_start import RIDGE

    rng = np.random.default_rng(0)
    f, y = rng.normal(size=(7, 5)), rng.normal(size=(7, 2))
    g = f / np.linalg.norm(f, axis=1, keepdims=True)
    errs = []
    for i in range(7):  # refit the same kernel ridge without example i, predict it
        keep = np.arange(7) != i
        k = g[keep] @ g[keep].T + 1.0
        lam = RIDGE * float(np.mean(np.diag(g @ g.T + 1.0)))  # lam is fixed by the full kernel
        alpha = np.linalg.solve(k + lam * np.eye(6), y[keep])
        pred = (g[i] @ g[keep].T + 1.0) @ alpha
        errs.append(np.mean((y[i] - pred) ** 2))
    assert loo_ridge_error(f.astype(np.float32), y) == pytest.approx(np.mean(errs), rel=1e-6)


def test_grown_experts_are_used_by_the_new_task_and_closed_to_every_other(trunk, gate_backend):
    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    data = load_source(model.manifest["data_source"])
    before = _outputs(model, data)
    old = [Chunk(d.name, d.x_test) for d in data]
    # a mixed batch's rows need not have a single-task batch's bits (grouping), so it has its own oracle
    before_mixed = model.forward(old, train=False).outputs
    params = {n: p.copy() for n, p in model.params.items()}
    task = _skill(5)
    res = add_task(model, config, task, shots=None, rng=np.random.default_rng(1), grow_experts=2, **FAST)
    assert res.grown == [8, 9] and model.config.n_experts == 10
    assert res.grown_share is not None and res.grown_share > 0
    after = _outputs(model, data)
    for d in data:  # every other task: the same bits
        assert np.array_equal(before[d.name], after[d.name]), d.name
    for n, p in params.items():  # what existed is unchanged (tables and experts grow only at the end)
        assert np.array_equal(p, model.params[n][tuple(slice(0, s) for s in p.shape)]), n
    for d, o, b in zip(data, model.forward(old, train=False).outputs, before_mixed, strict=True):
        assert np.array_equal(o, b), d.name
    out = model.forward([*old, Chunk(task.name, task.x_test)], train=False)
    old_rows = sum(d.x_test.shape[0] for d in data)
    for r in out.routings:  # no other task's row reaches a grown expert, even in one batch with it
        assert not np.isin(r.expert_index[:old_rows], res.grown).any()
        assert np.isin(r.expert_index[old_rows:], res.grown).any()


@pytest.mark.parametrize("start", ["fresh", "clone"])
def test_grown_experts_start_fresh_or_as_copies_and_lead_the_task_s_routing(trunk, start):
    """start_grown: "fresh" keeps the weights every new expert gets, "clone" perturbs copies of
    the sources; either way each grown expert's gate columns are its source's plus the push
    that puts it MARGIN above its source in the task's logits."""
    from moe.transfer_grow import MARGIN, PERTURB, expert_usage, start_grown

    model = load(trunk)
    task = _skill(5)
    model.add_task(task.spec, rng=np.random.default_rng(0))
    usage = expert_usage(model, task.name, task.x_train)
    grown = model.grow_experts(task.name, 2, rng=np.random.default_rng(1))
    layer = model.layers[0]
    fresh = {n: p[grown].copy() for n, p in layer.experts.params.items()}
    old_gate = {n: p.copy() for n, p in layer.gate.params.items()}
    sources = start_grown(model, task.name, usage, grown, rng=np.random.default_rng(2), start=start)
    src = sources[0]
    assert src[0] == int(np.argmax(usage[0][: grown[0]]))  # the task's most used expert first
    for n, p in layer.experts.params.items():
        if start == "fresh":
            assert np.array_equal(p[grown], fresh[n]), n
        else:
            spread = p[src].std(axis=tuple(range(1, p.ndim)), keepdims=True)
            assert not np.array_equal(p[grown], p[src]), n
            assert np.all(np.abs(p[grown] - p[src]) <= 6 * PERTURB * spread + 1e-12), n
    e = model.task_views(task.name, ("emb",))
    emb = next(iter(e.values()))[0].astype(np.float64)
    w = layer.gate.params["w_gate"].astype(np.float64)
    extra = w[w.shape[0] - layer.d_gate_extra:]  # the task embedding's rows
    for g, s_ in zip(grown, src, strict=True):
        assert emb @ extra[:, g] == pytest.approx(emb @ extra[:, s_] + MARGIN, rel=1e-5)
        for n, p in layer.gate.params.items():
            if n != "w_gate":
                np.testing.assert_array_equal(p[:, g], old_gate[n][:, s_])
    with pytest.raises(ValueError, match=r"start must be one of \('fresh', 'clone'\), got 'copy'"):
        start_grown(model, task.name, usage, grown, rng=np.random.default_rng(2), start="copy")


def test_auto_growth_undone_leaves_the_model_as_it_was(trunk):
    model = load(trunk)
    n = model.config.n_experts
    before = {k: v.copy() for k, v in model.params.items()}
    model.add_task(_skill(6).spec, rng=np.random.default_rng(0))
    grown = model.grow_experts("skill_006", 3, rng=np.random.default_rng(0))
    assert grown == [n, n + 1, n + 2] and model.expert_owners() == {"skill_006": grown}
    model.drop_last_experts(3)
    assert model.config.n_experts == n and not model.expert_owners()
    for k, v in before.items():
        assert np.array_equal(v, model.params[k][: v.shape[0]]), k
    with pytest.raises(ValueError, match="can only drop grown experts"):
        model.drop_last_experts(1)


def test_one_shot_per_class_uses_the_fixed_budget_and_auto_declines(trunk):
    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    task = load_added({"heldout": True, "name": "digits_ge5", "seed": 0}, shots=None)
    n = model.config.n_experts
    res = add_task(model, config, task, shots=1, rng=np.random.default_rng(0), grow_experts="auto", **FAST)
    assert res.shots == 2 and res.epochs == FIXED_EPOCHS and "fixed budget" in res.stop_rule
    assert res.growth.startswith("auto: declined") and res.grown == [] and model.config.n_experts == n
    assert res.init_from == min(res.similarity, key=res.similarity.get) or res.init_from is None
    assert len(res.similarity) == len(model.tasks)  # fresh + every other task


def test_auto_growth_declines_when_too_few_examples_are_held_out_to_compare(trunk):
    from moe.transfer import AUTO_MIN_HELD_OUT

    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    task = load_added({"heldout": True, "name": "digits_ge5", "seed": 0}, shots=None)
    n = model.config.n_experts
    res = add_task(model, config, task, shots=5, rng=np.random.default_rng(0), grow_experts="auto", **FAST)
    # 5 shots of each of 2 classes: split_fit_stop holds out 2 of each, far below the floor
    assert res.growth == f"auto: declined (only 4 held-out examples; comparing two fits needs {AUTO_MIN_HELD_OUT})"
    assert res.grown == [] and model.config.n_experts == n


def test_learned_routing_moves_the_embedding_from_its_measured_start(trunk):
    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    task = load_added({"heldout": True, "name": "digits_ge5", "seed": 0}, shots=None)
    res = add_task(model, config, task, shots=5, rng=np.random.default_rng(2), **FAST)
    best = min(res.similarity, key=res.similarity.get)
    assert res.init_from == (None if best == "(fresh)" else best)
    e = model.task_emb.params["e"]
    new = e[model.tasks.id(task.name)]
    start = e[model.tasks.id(res.init_from)] if res.init_from else None
    assert start is None or not np.array_equal(new, start)  # trained, not frozen
    assert start is None or np.linalg.norm(new - start) < np.linalg.norm(start)  # anchored near its start


def test_added_checkpoint_is_verified_and_resumes_joint_training(trunk, tmp_path):
    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    task = _skill(4)
    res = add_task(model, config, task, shots=None, rng=np.random.default_rng(0), grow_experts=2, adapter="own", **FAST)
    rec = result_record({"skill": 4, "seed": 0, "size": 60, "name": task.name}, res)
    assert rec["adapter"] == "own" and rec["train_rows"] == res.train_rows
    source = with_added_record(model.manifest["data_source"], rec)
    where, resumable = save_added(tmp_path / "added", ckpt.resolve(trunk), model, config, load_source(source), source)
    assert resumable
    # old rows of every optimizer state are the source's bits; new rows start at zero
    src_optim = ckpt.load_checkpoint(trunk)[1]["optim"]
    manifest, files, _ = ckpt.load_checkpoint(where)
    for key, old in src_optim.items():
        if key.startswith("data."):
            continue
        new = files["optim"][key]
        corner = tuple(slice(0, s) for s in old.shape)
        assert np.array_equal(new[corner], old), key
        rest = new.copy()
        rest[corner] = 0
        assert not rest.any(), key
    # the experts' Adam state (their own files, which an inference load does not read): the
    # source's for the old experts, none for the grown ones
    src_manifest, _, src_where = ckpt.load_checkpoint(trunk)
    n_old = len(res.grown) and res.grown[0]
    for i in range(len(model.layers)):
        old = state.read_rows(src_where, src_manifest["files"], i, np.arange(n_old))
        got = state.read_rows(where, manifest["files"], i, np.arange(n_old + len(res.grown)))
        assert old["adam.t"].any() and np.array_equal(got["adam.t"], np.concatenate([old["adam.t"], [0, 0]]))
        for key in old:
            if key.startswith("adam.") and key != "adam.t":
                assert np.array_equal(got[key], old[key]), (i, key)
    again = load(where)
    data = load_source(manifest["data_source"])
    assert np.array_equal(predict_split(again, data[-1], "test"), predict_split(model, task, "test"))
    assert data[-1].x_train.shape[0] == len(res.train_rows)
    # continue joint training with the added task included
    cfg = Config.from_dict(manifest["config"])
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=manifest["step"] + 20, sampling="uniform"))
    trainer = Trainer(cfg, data, tmp_path / "added", data_source=manifest["data_source"],
                      head_hidden=manifest["head_hidden"], expert_owners=manifest["expert_owners"], echo=lambda _: None)
    own = {n: p.copy() for n, (p, _) in again.task_views(task.name, ("head", "encoder")).items()}  # as saved
    assert any(n.startswith("enc.") for n in own)  # its own encoder row came back with it
    result = trainer.train(resume=True)
    assert result.step == manifest["step"] + 20 and result.seen[task.name] > 0
    for n, (p, _) in trainer.model.task_views(task.name, ("head", "encoder")).items():
        assert not np.array_equal(p, own[n]), n  # the added task trains jointly, its own encoder too
    assert trainer.model.expert_owners() == {task.name: res.grown}
    # the same integrity checks as any training checkpoint
    (where / "optim.safetensors").write_bytes((where / "optim.safetensors").read_bytes()[:-1] + b"\x00")
    with pytest.raises(ckpt.CheckpointError, match="optim.safetensors does not match its sha256"):
        ckpt.load_checkpoint(where)


def test_tasks_added_one_after_another_leave_earlier_ones_bit_identical(trunk):
    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    data = load_source(model.manifest["data_source"])
    for i, t in enumerate((7, 8, 9)):
        before = _outputs(model, data)
        task = _skill(t)
        add_task(model, config, task, shots=None, rng=np.random.default_rng(i), grow_experts=1 if i == 1 else 0, **FAST)
        after = _outputs(model, data)
        for d in data:
            assert np.array_equal(before[d.name], after[d.name]), (task.name, d.name)
        data.append(task)
    assert list(model.expert_owners()) == ["skill_008"]


def test_versioned_folder_never_overwrites(tmp_path):
    default = tmp_path / "add-x"
    out, said = new_run_folder(default, None)
    assert out == default and said == f"wrote {default}"
    (default / "checkpoints" / "step-00000001").mkdir(parents=True)
    (default / "checkpoints" / "step-00000001" / "manifest.json").write_text(json.dumps({}))
    out, said = new_run_folder(default, None)
    assert out == tmp_path / "add-x.v2" and "kept as it is" in said
    out.mkdir()
    assert new_run_folder(default, None)[0] == tmp_path / "add-x.v3"
    with pytest.raises(ValueError, match="already holds checkpoints; add-task never overwrites a result"):
        new_run_folder(tmp_path / "elsewhere", default)


def test_skill_task_alone_is_the_family_member():
    from moe.tasks.skills import make_skill_tasks

    a, b = make_skill_tasks(6, 60, 0)[5], skill_task(5, 60, 0)
    assert a.spec == b.spec and np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)


def _domain_row(model, domain: str, width: int) -> dict[str, np.ndarray]:
    table, row = model.encoders[width], model.space_row[domain]
    return {n: p[row].copy() for n, p in table.params.items()}


def test_own_adapter_trains_a_copy_of_the_domain_encoder_and_moves_no_other_task(trunk):
    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    data = load_source(model.manifest["data_source"])
    task = _skill(5)
    assert task.spec.domain == "skills"
    before, domain = _outputs(model, data), _domain_row(model, "skills", task.spec.n_inputs)
    n_rows = model.encoders[task.spec.n_inputs].n_rows
    res = add_task(model, config, task, shots=None, rng=np.random.default_rng(0), adapter="own", **FAST)
    assert res.adapter == "own" and "asked for" in res.adapter_why
    spec = model.tasks.spec(task.name)
    assert spec.domain is None and model.space_row[spec.input_space] == n_rows  # one row appended
    after = _outputs(model, data)
    for d in data:
        assert np.array_equal(before[d.name], after[d.name]), d.name
    for n, v in _domain_row(model, "skills", task.spec.n_inputs).items():
        assert np.array_equal(v, domain[n]), n  # the domain's encoder did not move
    views = model.task_views(task.name)
    enc = {n: p for n, (p, _) in views.items() if n.startswith("enc.")}
    assert sorted(k.split(".")[2].split("[")[0] for k in enc) == ["b", "w"]
    w = next(p for n, p in enc.items() if ".w[" in n)
    assert not np.array_equal(w, domain["w"])  # trained ...
    assert np.linalg.norm(w - domain["w"]) < np.linalg.norm(domain["w"])  # ... from the domain's copy
    assert res.params_added == sum(p.size for p, _ in views.values())
    assert sum(p.size for p in enc.values()) == (task.spec.n_inputs + 1) * model.config.d_model
    with pytest.raises(ValueError, match="already has an encoder of its own"):
        model.own_encoder(task.name)


def test_auto_adapter_keeps_the_lower_held_out_loss_and_puts_the_domain_back(trunk):
    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    data = load_source(model.manifest["data_source"])
    before, domain = _outputs(model, data), _domain_row(model, "skills", _skill(6).spec.n_inputs)
    decisions = set()
    for i, t in enumerate((6, 7)):  # 200 examples: 120 to train on, 36 of them held out
        task = load_added({"skill": t, "seed": 0, "size": 200, "name": f"skill_{t:03d}"})
        res = add_task(model, config, task, shots=None, rng=np.random.default_rng(i), **FAST)
        assert res.adapter_why.startswith(f"auto: {res.adapter}; held-out loss "), res.adapter_why
        own, shared = (float(part.split("held-out loss ")[-1].split()[0]) for part in res.adapter_why.split(" vs "))
        assert (res.adapter == "own") == (own < shared), res.adapter_why
        assert (model.tasks.spec(res.task).domain is None) == (res.adapter == "own")
        decisions.add(res.adapter)
    after = _outputs(model, data)
    for d in data:
        assert np.array_equal(before[d.name], after[d.name]), d.name
    for n, v in _domain_row(model, "skills", _skill(6).spec.n_inputs).items():
        assert np.array_equal(v, domain[n]), n  # the "own" trial trained the domain's row, then restored it
    # one example per class: nothing to compare on; 10: too few held out to compare on
    digits = load_added({"heldout": True, "name": "digits_ge5", "seed": 0}, shots=None)
    res = add_task(model, config, digits, shots=1, rng=np.random.default_rng(0), **FAST)
    assert res.adapter == "shared" and "nothing can be held out" in res.adapter_why
    res = add_task(model, config, _skill(8), shots=None, rng=np.random.default_rng(0), **FAST)
    assert res.adapter == "shared" and "only 11 held-out examples; comparing two fits needs 20" in res.adapter_why


def test_a_domain_the_model_does_not_know_gets_an_encoder_of_its_own(trunk):
    model = load(trunk)
    config = Config.from_dict(model.manifest["config"])
    task = _skill(8)
    task = dataclasses.replace(task, spec=dataclasses.replace(task.spec, domain="elsewhere"))
    res = add_task(model, config, task, shots=None, rng=np.random.default_rng(0), **FAST)
    assert res.adapter == "own" and "no task of domain 'elsewhere'" in res.adapter_why
    assert model.tasks.spec(task.name).domain is None
    assert any(n.startswith("enc.") for n in model.task_views(task.name))
    assert result_record({"name": task.name}, res)["adapter"] == "own"
    with pytest.raises(ValueError, match="adapter must be one of"):
        add_task(model, config, _skill(9), shots=None, rng=np.random.default_rng(0), adapter="mine")


def test_an_added_record_with_an_own_encoder_loads_without_its_domain():
    rec = {"skill": 3, "seed": 0, "size": 60, "name": "skill_003"}
    assert load_added(rec).spec.domain == "skills"
    own = load_added({**rec, "adapter": "own"})
    assert own.spec.domain is None and own.spec.input_space == "task:skill_003"
    assert np.array_equal(own.x_train, load_added(rec).x_train)
    with pytest.raises(ValueError, match="adapter must be 'shared' or 'own', got 'mine'"):
        load_added({**rec, "adapter": "mine"})

"""What a run is compared with: the ablation against a model whose experts output zero,
task-expert mutual information and overlap against routing worked out by hand, balanced
inference within its seats, the task groups."""

import math

import numpy as np
import pytest

from moe import compare
from moe.config import ModelConfig
from moe.model import MultiTaskMoE
from moe.tasks.builtin import builtin_tasks
from moe.tasks.metrics import evaluate
from moe.tasks.spec import TaskRegistry
from moe.train import evaluate_tasks

pytestmark = pytest.mark.unit


def _model(data, seed=0, **kw):
    cfg = ModelConfig(**{"d_model": 16, "n_experts": 8, "d_hidden": 16, "k": 2, **kw})
    rng = np.random.default_rng(seed)
    model = MultiTaskMoE(cfg, TaskRegistry([d.spec for d in data]), rng=rng)
    for n, p in model.params.items():  # a router that is not zero, so routing depends on the task
        if n.endswith("w_gate"):
            p[...] = rng.normal(size=p.shape).astype(p.dtype)
    return model


@pytest.fixture(scope="module")
def data():
    return builtin_tasks(seed=0, n_family=3, family_size=60, n_digit_sets=3)


def test_ablation_equals_the_model_whose_experts_output_zero(data):
    model = _model(data)
    got = compare.ablated(model, data)
    silent = _model(data)
    for n, p in silent.params.items():
        if ".moe.experts.w2" in n or ".moe.experts.b2" in n:
            p[...] = 0
    want = evaluate_tasks(silent, data, "test")
    full = evaluate_tasks(model, data, "test")
    for d in data:
        assert got[d.name] == want[d.name][d.spec.metric], d.name
    assert any(got[d.name] != full[d.name][d.spec.metric] for d in data)  # the experts did something


def test_groups_and_their_means():
    scores = {"digits_parity": 0.8, "digitset_000": 0.6, "digitset_001": 0.4, "skill_000": 0.3}
    assert [compare.group_of(n) for n in scores] == ["original", "digit sets", "digit sets", "skills"]
    g = compare.by_group(scores)
    assert g == pytest.approx({"original": 0.8, "digit sets": 0.5, "skills": 0.3, "all": 0.525})


def test_specialisation_of_routing_by_task_alone(data):
    """route_by=task: without noise every example of a task goes to the same k experts, the
    top-k of its embedding's logits, so the counts (and MI and overlap) follow by hand."""
    model = _model(data, route_by="task")
    layer = model.layers[0]
    logits = model.task_emb.params["e"] @ layer.gate.params["w_gate"]  # [T, E]
    top = np.argsort(-logits, axis=1, kind="stable")[:, :2]
    counts = np.zeros(logits.shape)
    for d in data:
        t = model.tasks.id(d.name)
        counts[t, top[t]] = d.x_train.shape[0]
    p = counts / counts.sum()
    pe, pt = p.sum(0), p.sum(1)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pt, pe)[nz])).sum())
    related = {frozenset((a.name, b.name)) for a in data for b in data
               if a.name < b.name and set(top[model.tasks.id(a.name)]) & set(top[model.tasks.id(b.name)])}
    spec = compare.specialisation(model, data, seed=0, related=lambda a, b: frozenset((a, b)) in related)
    free = spec["noise_free"]
    assert free["mutual_information"] == pytest.approx(mi, rel=1e-9)
    assert free["overlap_unrelated"] == 0.0 and free["overlap_related"] >= 0.5
    assert spec["train"]["mutual_information"] <= free["mutual_information"] + 1e-9  # noise only blurs it


def test_balanced_inference_keeps_its_seats_and_reports_drops(data):
    model = _model(data, gate="softmax_topk")
    for layer in model.layers:
        layer.gate.params["w_gate"][:, 0] += 3.0  # one expert everyone wants
    out = compare.balanced_inference(model, data, seed=0, batch_size=64)
    seats = math.ceil(1.25 * 64 * 2 / 8) / (64 * 2 / 8)  # busiest allowed / mean, full batches of 64
    assert out["balanced"]["max_mean_load_worst"] <= seats + 1e-9
    assert out["topk"]["max_mean_load_worst"] > out["balanced"]["max_mean_load_worst"]
    rates = out["topk_drop_rates"]
    assert set(rates) == {"1.0", "1.25", "1.5", "2.0"} and rates["1.0"] >= rates["2.0"] > 0
    ref = np.mean([evaluate(d.spec.kind, *_predict(model, d))[d.spec.metric] for d in data])
    assert out["topk"]["mean_score"] == pytest.approx(ref, abs=1e-6)  # float32 sums in other batches


def _predict(model, d):
    from moe.train import predict_split

    return predict_split(model, d, "test"), d.y_test


def test_group_table_has_a_row_per_group_and_a_column_per_model():
    moe = {"digits": 0.9, "digitset_000": 0.7, "skill_000": 0.6, "skill_001": 0.4}
    table = compare.group_table({"moe": moe, "no experts": {k: v - 0.1 for k, v in moe.items()}, "sklearn": {}})
    rows = [line.split() for line in table.splitlines()]
    assert rows[0] == ["group", "tasks", "moe", "no", "experts", "sklearn"]
    assert rows[1:] == [["original", "1", "0.900", "0.800", "-"], ["digit", "sets", "1", "0.700", "0.600", "-"],
                        ["skills", "2", "0.500", "0.400", "-"], ["all", "4", "0.650", "0.550", "-"]]


def test_specialisation_lines_say_once_what_a_gate_without_noise_trains_with():
    same = {"mutual_information": 1.5, "overlap_related": 0.4, "overlap_unrelated": 0.1}
    one = compare.specialisation_lines({"train": same, "noise_free": dict(same)})
    assert one == ["task-expert mutual information (no gate noise: the same while training and at inference): "
                   "1.500 nats; expert overlap of related skill tasks 0.400, unrelated 0.100"]
    two = compare.specialisation_lines({"train": {"mutual_information": 0.5}, "noise_free": {"mutual_information": 1.5}})
    assert two == ["task-expert mutual information while training (gate noise as at the last step): 0.500 nats",
                   "task-expert mutual information noise-free top-k: 1.500 nats"]
    bal = compare.specialisation_lines({"train": {"mutual_information": 3.0, "routing": "balanced", "balance_factor": 1.0},
                                        "noise_free": {"mutual_information": 3.2, "routing": "topk"}})
    assert bal == ["task-expert mutual information while training (balanced seats, factor 1): 3.000 nats",
                   "task-expert mutual information noise-free top-k: 3.200 nats"]

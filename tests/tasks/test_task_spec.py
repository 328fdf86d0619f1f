"""TaskSpec validation and serialisation, TaskRegistry ids, TaskData checks and helpers."""

import json
import math

import numpy as np
import pytest

from moe.tasks.spec import TASK_KINDS, TaskData, TaskRegistry, TaskSpec

pytestmark = pytest.mark.unit


def test_kinds_are_the_four_documented_ones():
    assert TASK_KINDS == ("multiclass", "binary", "multilabel", "regression")


@pytest.mark.parametrize(
    "kind,n_out,metric",
    [
        ("multiclass", 3, "accuracy"),
        ("binary", 1, "accuracy"),
        ("multilabel", 4, "f1"),
        ("regression", 2, "r2"),
    ],
)
def test_spec_round_trips_through_json(kind, n_out, metric):
    spec = TaskSpec("t1", kind, 7, n_out, loss_weight=0.5)
    d = json.loads(json.dumps(spec.to_dict()))
    assert TaskSpec.from_dict(d) == spec
    assert spec.metric == metric
    assert d == {"name": "t1", "kind": kind, "n_inputs": 7, "n_outputs": n_out, "loss_weight": 0.5}


def test_class_labels_travel_with_the_spec_and_are_checked():
    spec = TaskSpec("wine", "multiclass", 4, 3, classes=["barbera", "barolo", "grignolino"])
    assert spec.classes == ("barbera", "barolo", "grignolino")  # a tuple: the spec stays hashable
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["classes"] == ["barbera", "barolo", "grignolino"] and TaskSpec.from_dict(d) == spec
    assert TaskSpec("b", "binary", 2, 1, classes=(np.int64(0), 5)).classes == (0, 5)
    assert "classes" not in TaskSpec("a", "binary", 2, 1).to_dict()  # older manifests stay equal
    with pytest.raises(ValueError, match="multiclass task 'w' needs 3 distinct class labels"):
        TaskSpec("w", "multiclass", 4, 3, classes=["a", "a", "b"])
    with pytest.raises(ValueError, match="binary task 'w' needs 2 distinct class labels"):
        TaskSpec("w", "binary", 4, 1, classes=["a", "b", "c"])
    with pytest.raises(ValueError, match="regression task 'w' has no classes"):
        TaskSpec("w", "regression", 4, 1, classes=["a"])
    with pytest.raises(TypeError, match="class labels must be str, int or float"):
        TaskSpec("w", "binary", 4, 1, classes=[None, "b"])
    with pytest.raises(TypeError, match="classes must be a list of labels, got str"):
        TaskSpec("w", "binary", 4, 1, classes="ab")


def test_loss_weight_int_becomes_float_and_default_is_one():
    assert TaskSpec("a", "binary", 2, 1).loss_weight == 1.0
    w = TaskSpec("a", "binary", 2, 1, loss_weight=2).loss_weight
    assert isinstance(w, float) and w == 2.0


@pytest.mark.parametrize(
    "args,match",
    [
        (("", "binary", 2, 1), "non-empty"),
        (("a b", "binary", 2, 1), "whitespace"),
        (("a\tb", "binary", 2, 1), "whitespace"),
        (("a/b", "binary", 2, 1), "'/'"),
        (("a", "ranking", 2, 1), "ranking"),
        (("a", "binary", 0, 1), "n_inputs must be >= 1, got 0"),
        (("a", "regression", 3, 0), "n_outputs must be >= 1, got 0"),
        (("a", "binary", 3, 2), "binary task 'a' must have 1 output, got 2"),
        (("a", "multiclass", 3, 1), ">= 2 outputs"),
        (("a", "binary", 3, 1, 0.0), "loss_weight"),
        (("a", "binary", 3, 1, -1.0), "loss_weight"),
        (("a", "binary", 3, 1, math.nan), "loss_weight"),
        (("a", "binary", 3, 1, math.inf), "loss_weight"),
    ],
)
def test_spec_rejects_bad_values(args, match):
    with pytest.raises(ValueError, match=match):
        TaskSpec(*args)


@pytest.mark.parametrize(
    "args",
    [
        (3, "binary", 2, 1),
        ("a", 3, 2, 1),
        ("a", "binary", 2.0, 1),
        ("a", "binary", True, 1),
        ("a", "binary", 2, 1, "1"),
    ],
)
def test_spec_rejects_bad_types(args):
    with pytest.raises(TypeError):
        TaskSpec(*args)


def test_spec_is_frozen():
    spec = TaskSpec("a", "binary", 2, 1)
    with pytest.raises(AttributeError):
        spec.name = "b"  # type: ignore[misc]


def test_from_dict_rejects_unknown_and_missing_keys():
    d = TaskSpec("a", "binary", 2, 1).to_dict()
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        TaskSpec.from_dict({**d, "colour": "red"})
    del d["n_inputs"]
    with pytest.raises(ValueError, match="missing keys \\['n_inputs'\\]"):
        TaskSpec.from_dict(d)


def test_from_dict_without_loss_weight_uses_default():
    assert (
        TaskSpec.from_dict(
            {"name": "a", "kind": "binary", "n_inputs": 2, "n_outputs": 1}
        ).loss_weight
        == 1.0
    )


def _registry():
    reg = TaskRegistry()
    ids = [
        reg.add(TaskSpec("digits", "multiclass", 64, 10)),
        reg.add(TaskSpec("wine", "multiclass", 13, 3)),
        reg.add(TaskSpec("diabetes", "regression", 10, 1, 2.0)),
    ]
    return reg, ids


def test_registry_assigns_ids_in_order():
    reg, ids = _registry()
    assert ids == [0, 1, 2]
    assert reg.names == ("digits", "wine", "diabetes")
    assert len(reg) == 3
    assert [s.name for s in reg] == ["digits", "wine", "diabetes"]
    assert reg.id("wine") == 1
    assert reg.spec("wine") is reg.spec(1)
    assert reg.spec(2).loss_weight == 2.0
    assert "wine" in reg and "beer" not in reg


def test_registry_errors_name_the_problem():
    reg, _ = _registry()
    with pytest.raises(ValueError, match="task 'wine' is already registered"):
        reg.add(TaskSpec("wine", "binary", 2, 1))
    with pytest.raises(
        ValueError, match="unknown task 'beer'; known tasks: digits, wine, diabetes"
    ):
        reg.id("beer")
    with pytest.raises(ValueError, match="unknown task 'beer'"):
        reg.spec("beer")
    with pytest.raises(ValueError, match="task id must be in \\[0, 3\\), got 3"):
        reg.spec(3)
    with pytest.raises(ValueError, match="got -1"):
        reg.spec(-1)
    with pytest.raises(TypeError):
        reg.add({"name": "x"})  # type: ignore[arg-type]
    assert len(reg) == 3  # failed adds changed nothing


def test_registry_round_trips_through_json():
    reg, _ = _registry()
    back = TaskRegistry.from_dict(json.loads(json.dumps(reg.to_dict())))
    assert back == reg
    assert back.names == reg.names
    assert [back.id(n) for n in back.names] == [0, 1, 2]
    with pytest.raises(ValueError, match="tasks"):
        TaskRegistry.from_dict({"specs": []})


# -- TaskData -------------------------------------------------------------------------------


def _data(kind="multiclass", **overrides):
    n_out = {"multiclass": 3, "binary": 1, "multilabel": 2, "regression": 1}[kind]
    spec = TaskSpec("t", kind, 2, n_out)
    x = np.zeros((4, 2), np.float32)
    if kind == "multiclass":
        y = np.array([0, 1, 2, 1], np.int32)
    else:
        y = np.zeros((4, n_out), np.float32)
    fields = dict(
        spec=spec,
        x_train=x,
        y_train=y,
        x_val=x[:2],
        y_val=y[:2],
        x_test=x[:1],
        y_test=y[:1],
        mean=np.array([1.0, 2.0], np.float32),
        std=np.array([2.0, 4.0], np.float32),
    )
    if kind == "regression":
        fields.update(y_mean=np.array([10.0], np.float32), y_std=np.array([5.0], np.float32))
    if kind == "multiclass":
        fields["classes"] = np.array([3, 5, 7])
    if kind == "binary":
        fields["classes"] = np.array([-1, 1])
    fields.update(overrides)
    return TaskData(**fields)


@pytest.mark.parametrize("kind", TASK_KINDS)
def test_taskdata_accepts_well_formed_data(kind):
    td = _data(kind)
    assert td.name == "t"
    x, y = td.split("val")
    assert x is td.x_val and y is td.y_val


@pytest.mark.parametrize(
    "kind,override,match",
    [
        ("multiclass", {"y_train": np.array([0, 1, 2, 1], np.int64)}, "int32"),
        (
            "multiclass",
            {"y_train": np.array([0, 1, 3, 1], np.int32)},
            "class ids must be in \\[0, 3\\)",
        ),
        (
            "multiclass",
            {"x_train": np.zeros((4, 3), np.float32)},
            "2 input features, x_train has 3",
        ),
        ("multiclass", {"x_val": np.zeros((2, 2), np.float64)}, "x_val must be float32"),
        (
            "multiclass",
            {"x_test": np.zeros((0, 2), np.float32), "y_test": np.zeros(0, np.int32)},
            "test split is empty",
        ),
        ("multiclass", {"x_train": np.full((4, 2), np.nan, np.float32)}, "NaN"),
        ("multiclass", {"classes": None}, "classes"),
        ("binary", {"y_train": np.full((4, 1), 0.5, np.float32)}, "only 0 and 1"),
        ("binary", {"y_train": np.zeros(4, np.float32)}, "float32 \\[4, 1\\]"),
        ("regression", {"y_std": None}, "y_std"),
        ("regression", {"classes": np.array([0, 1])}, "must not have classes"),
        ("multilabel", {"y_mean": np.zeros(2, np.float32)}, "must not have y_mean"),
        ("multilabel", {"std": np.array([1.0, 0.0], np.float32)}, "std must be > 0"),
        ("multilabel", {"mean": np.zeros(3, np.float32)}, "mean must be float32 \\[2\\]"),
    ],
)
def test_taskdata_rejects_malformed_data(kind, override, match):
    with pytest.raises(ValueError, match=match):
        _data(kind, **override)


def test_taskdata_helpers_invert_the_scaling():
    td = _data("regression")
    raw = np.array([[3.0, 10.0]], np.float32)
    np.testing.assert_array_equal(td.standardize_inputs(raw), np.array([[1.0, 2.0]], np.float32))
    assert td.standardize_inputs(raw).dtype == np.float32
    np.testing.assert_array_equal(td.unstandardize_targets(np.array([[1.0]])), [[15.0]])
    with pytest.raises(ValueError, match="2 input features"):
        td.standardize_inputs(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="no class labels"):
        td.decode_labels(np.array([0]))
    with pytest.raises(ValueError, match="split must be one of"):
        td.split("dev")


def test_decode_labels_maps_ids_back_to_original_values():
    np.testing.assert_array_equal(_data("multiclass").decode_labels(np.array([2, 0, 1])), [7, 3, 5])
    np.testing.assert_array_equal(_data("binary").decode_labels(np.array([[1.0], [0.0]])), [1, -1])
    with pytest.raises(ValueError, match="not regression"):
        _data("binary").unstandardize_targets(np.zeros((1, 1)))


def test_taskdata_classes_must_agree_with_the_specs():
    assert _data(spec=TaskSpec("t", "multiclass", 2, 3, classes=[3, 5, 7])).classes.tolist() == [3, 5, 7]
    with pytest.raises(ValueError, match=r"task 't' classes \[3, 5, 7\] differ from its spec's \['a', 'b', 'c'\]"):
        _data(spec=TaskSpec("t", "multiclass", 2, 3, classes=["a", "b", "c"]))

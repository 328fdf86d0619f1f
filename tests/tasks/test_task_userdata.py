"""User tables and TOML task files: happy paths, kind inference, and every documented error."""

import json

import numpy as np
import pytest

from moe.tasks.spec import TaskSpec
from moe.tasks.userdata import data_entries, load_data, load_table, load_task_file

pytestmark = pytest.mark.unit


def _csv(path, header, rows):
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _wine_rows(n=30, seed=0):
    """Rows (alcohol, ph, colour, quality); quality in {3, 5, 7} cycling, so classes are balanced."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append(
            [
                f"{rng.normal(12, 1):.3f}",
                f"{rng.normal(3.3, 0.2):.3f}",
                "red" if i % 2 else "white",
                [3, 5, 7][i % 3],
            ]
        )
    return rows


@pytest.fixture
def wine_csv(tmp_path):
    return _csv(tmp_path / "wine.csv", ["alcohol", "ph", "colour", "quality"], _wine_rows())


def _all_y(td):
    return np.concatenate([td.y_train, td.y_val, td.y_test])


def _all_x_raw(td):
    return np.concatenate([td.x_train, td.x_val, td.x_test]).astype(np.float64) * td.std + td.mean


def test_csv_multiclass_with_chosen_features(wine_csv):
    td = load_table(
        wine_csv,
        name="wine_quality",
        target="quality",
        features=["alcohol", "ph"],
        kind="multiclass",
    )
    assert td.spec.kind == "multiclass" and td.spec.n_inputs == 2 and td.spec.n_outputs == 3
    np.testing.assert_array_equal(td.classes, [3, 5, 7])
    assert td.y_train.dtype == np.int32 and td.x_train.dtype == np.float32
    assert td.x_train.shape[0] + td.x_val.shape[0] + td.x_test.shape[0] == 30
    for y in (td.y_train, td.y_val, td.y_test):  # stratified
        assert set(y.tolist()) == {0, 1, 2}
    # every row comes back, with its label mapped through `classes`
    raw = {(round(float(a), 3), round(float(p), 3)): q for a, p, _, q in _wine_rows()}
    x = _all_x_raw(td)
    labels = td.decode_labels(_all_y(td))
    for (a, p), q in zip(x, labels, strict=True):
        assert raw[(round(a, 3), round(p, 3))] == q


def test_kind_is_inferred(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        [f"{v:.4f}", i % 2, [1, 2, 3][i % 3], f"{rng.normal():.4f}", i % 25]
        for i, v in enumerate(rng.normal(size=40))
    ]
    path = _csv(tmp_path / "t.csv", ["f", "b", "m", "r", "many"], rows)
    b = load_table(path, name="b", target="b", features=["f"])
    assert b.spec.kind == "binary" and b.y_train.shape[1] == 1
    np.testing.assert_array_equal(b.classes, [0, 1])
    m = load_table(path, name="m", target="m", features=["f"])
    assert m.spec.kind == "multiclass" and m.spec.n_outputs == 3
    np.testing.assert_array_equal(m.classes, [1, 2, 3])
    assert load_table(path, name="r", target="r", features=["f"]).spec.kind == "regression"
    assert (
        load_table(path, name="k", target="many", features=["f"]).spec.kind == "regression"
    )  # 25 values
    ml = load_table(path, name="ml", target=["b"], features=["f"], kind="multilabel")
    assert ml.spec.kind == "multilabel" and ml.y_train.shape[1] == 1


def test_default_features_are_every_other_column(tmp_path):
    rows = [[i, i * 2.0, i % 2, (i + 1) % 2] for i in range(20)]
    path = _csv(tmp_path / "ml.csv", ["a", "b", "l1", "l2"], rows)
    td = load_table(path, name="ml", target=["l1", "l2"])
    assert td.spec.kind == "multilabel" and td.spec.n_inputs == 2 and td.spec.n_outputs == 2
    y = _all_y(td)
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y[:, 0] + y[:, 1], 1)


def test_binary_labels_keep_their_original_values(tmp_path):
    rows = [[i, "-1" if i % 2 else "4"] for i in range(20)]
    td = load_table(_csv(tmp_path / "b.csv", ["x", "y"], rows), name="b", target="y")
    np.testing.assert_array_equal(td.classes, [-1, 4])
    x, y = _all_x_raw(td)[:, 0], _all_y(td)[:, 0]
    np.testing.assert_array_equal(
        y == 1, np.rint(x) % 2 == 0
    )  # 1 means classes[1] == 4 (even rows)


def test_regression_targets_are_standardised_on_train(tmp_path):
    rows = [[i, 10.0 + 3.0 * i] for i in range(30)]
    td = load_table(
        _csv(tmp_path / "r.csv", ["x", "y"], rows), name="r", target="y", kind="regression"
    )
    np.testing.assert_allclose(td.y_train.mean(), 0, atol=1e-5)
    y = td.unstandardize_targets(_all_y(td))[:, 0]
    x = _all_x_raw(td)[:, 0]
    np.testing.assert_allclose(y, 10.0 + 3.0 * x, rtol=1e-5, atol=1e-4)


def test_same_seed_same_split_other_seed_other_split(wine_csv):
    a = load_table(wine_csv, name="w", target="quality", features=["alcohol"], seed=3)
    b = load_table(wine_csv, name="w", target="quality", features=["alcohol"], seed=3)
    c = load_table(wine_csv, name="w", target="quality", features=["alcohol"], seed=4)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.x_test, c.x_test)


def test_split_column(tmp_path):
    rows = [[i, i % 2, ["train", "train", "val", "test", "1", "2.0"][i % 6]] for i in range(24)]
    td = load_table(
        _csv(tmp_path / "s.csv", ["x", "y", "fold"], rows), name="s", target="y", split="fold"
    )
    assert td.spec.n_inputs == 1  # the split column is not a feature
    assert (td.x_train.shape[0], td.x_val.shape[0], td.x_test.shape[0]) == (8, 8, 8)
    np.testing.assert_array_equal(
        np.sort(np.rint(_all_x_raw(td)[8:16, 0])), [2, 4, 8, 10, 14, 16, 20, 22]
    )


def test_npz_with_data_and_columns(tmp_path):
    rng = np.random.default_rng(0)
    data = np.column_stack([rng.normal(size=30), rng.normal(size=30), np.arange(30) % 3])
    path = tmp_path / "t.npz"
    np.savez(path, data=data, columns=np.array(["a", "b", "label"]))
    td = load_table(path, name="n", target="label")
    assert td.spec.kind == "multiclass" and td.spec.n_inputs == 2
    raw = _all_x_raw(td)
    orig = {round(float(v), 4) for v in data[:, 0]}
    assert {round(float(v), 4) for v in raw[:, 0]} == orig


def test_npz_with_one_array_per_column(tmp_path):
    path = tmp_path / "t.npz"
    np.savez(path, x1=np.arange(20.0), x2=np.arange(20) % 4, target=np.arange(20.0) * 0.5)
    td = load_table(path, name="n", target="target", features=["x1"])
    assert td.spec.kind == "regression" and td.spec.n_inputs == 1


def test_task_file_loads_tasks_in_order_with_relative_paths(tmp_path, wine_csv):
    sub = tmp_path / "data"
    sub.mkdir()
    _csv(sub / "r.csv", ["x", "y"], [[i, 0.5 * i] for i in range(20)])
    toml = tmp_path / "tasks.toml"
    toml.write_text(
        "seed = 5\n"
        '[[task]]\nname = "wine_quality"\npath = "wine.csv"\ntarget = "quality"\n'
        'features = ["alcohol", "ph"]\nkind = "multiclass"\nloss_weight = 2.0\n'
        '[[task]]\nname = "reg"\npath = "data/r.csv"\ntarget = "y"\n'
    )
    tasks = load_task_file(toml)
    assert [t.name for t in tasks] == ["wine_quality", "reg"]
    assert tasks[0].spec.loss_weight == 2.0 and tasks[1].spec.loss_weight == 1.0
    assert tasks[1].spec.kind == "regression"
    same = load_table(
        wine_csv, name="wine_quality", target="quality", features=["alcohol", "ph"], seed=5
    )
    np.testing.assert_array_equal(tasks[0].x_test, same.x_test)  # the file's seed is used


# -- errors -----------------------------------------------------------------------------------


def _err(match, fn, *args, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_missing_data_file(tmp_path):
    msg = _err("does not exist", load_table, tmp_path / "nope.csv", name="t", target="y")
    assert "nope.csv" in msg and "task 't'" in msg


def test_missing_task_file(tmp_path):
    assert "nope.toml" in _err("does not exist", load_task_file, tmp_path / "nope.toml")


def test_missing_data_file_named_from_a_task_file(tmp_path):
    toml = tmp_path / "tasks.toml"
    toml.write_text('[[task]]\nname = "t"\npath = "gone.csv"\ntarget = "y"\n')
    msg = _err("does not exist", load_task_file, toml)
    assert "tasks.toml" in msg and "gone.csv" in msg and "task 't'" in msg


def test_unknown_column_lists_the_available_ones(wine_csv):
    msg = _err("unknown column 'qualty'", load_table, wine_csv, name="w", target="qualty")
    assert "['alcohol', 'ph', 'colour', 'quality']" in msg and "wine.csv" in msg
    _err(
        "unknown column 'sugar'",
        load_table,
        wine_csv,
        name="w",
        target="quality",
        features=["sugar"],
    )


def test_non_numeric_feature_names_column_row_and_value(wine_csv):
    msg = _err("column 'colour'", load_table, wine_csv, name="w", target="quality")
    assert "row 1 (line 2)" in msg and "'white'" in msg and "non-numeric" in msg


def test_non_numeric_cell_deeper_in_the_file(tmp_path):
    rows = [[i, i % 2] for i in range(10)]
    rows[6][0] = "7,5".replace(",", ";")
    msg = _err(
        "column 'x' row 7 \\(line 8\\)",
        load_table,
        _csv(tmp_path / "t.csv", ["x", "y"], rows),
        name="t",
        target="y",
    )
    assert "'7;5'" in msg


@pytest.mark.parametrize("bad,col", [("nan", "x"), ("inf", "x"), ("-inf", "y"), ("NaN", "y")])
def test_nan_or_inf_in_features_or_target(tmp_path, bad, col):
    rows = [[i, float(i)] for i in range(10)]
    rows[4][0 if col == "x" else 1] = bad
    path = _csv(tmp_path / "t.csv", ["x", "y"], rows)
    msg = _err(f"column '{col}' row 5", load_table, path, name="t", target="y", kind="regression")
    assert "NaN or Inf" in msg


def test_nan_in_npz(tmp_path):
    x = np.arange(10.0)
    x[3] = np.nan
    path = tmp_path / "t.npz"
    np.savez(path, x=x, y=np.arange(10) % 2)
    assert "t.npz" in _err("column 'x' row 4", load_table, path, name="t", target="y")


def test_class_in_test_but_not_in_train(tmp_path):
    rows = [[i, i % 2, "train"] for i in range(10)] + [
        [10, 0, "val"],
        [11, 1, "val"],
        [12, 5, "test"],
    ]
    path = _csv(tmp_path / "t.csv", ["x", "y", "fold"], rows)
    msg = _err(
        "class 5 of target 'y' is in the test split but not in train",
        load_table,
        path,
        name="t",
        target="y",
        split="fold",
        kind="multiclass",
    )
    assert "t.csv" in msg


def test_binary_class_in_val_but_not_in_train(tmp_path):
    rows = [[i, 0, "train"] for i in range(6)] + [[6, 1, "val"], [7, 0, "test"]]
    path = _csv(tmp_path / "t.csv", ["x", "y", "fold"], rows)
    _err(
        "class 1 of target 'y' is in the val split but not in train",
        load_table,
        path,
        name="t",
        target="y",
        split="fold",
    )


def test_bad_split_value_and_empty_split(tmp_path):
    rows = [[i, i % 2, "train" if i < 8 else "holdout"] for i in range(10)]
    path = _csv(tmp_path / "t.csv", ["x", "y", "fold"], rows)
    _err(
        "split column 'fold' row 9 \\(line 10\\) is 'holdout'",
        load_table,
        path,
        name="t",
        target="y",
        split="fold",
    )
    rows = [[i, i % 2, "train" if i < 8 else "val"] for i in range(10)]
    path = _csv(tmp_path / "t2.csv", ["x", "y", "fold"], rows)
    _err("test split is empty", load_table, path, name="t", target="y", split="fold")


def test_duplicate_task_name(tmp_path, wine_csv):
    toml = tmp_path / "tasks.toml"
    entry = '[[task]]\nname = "w"\npath = "wine.csv"\ntarget = "quality"\nfeatures = ["ph"]\n'
    toml.write_text(entry + entry)
    msg = _err("duplicate task name 'w'", load_task_file, toml)
    assert "#1 and #2" in msg and "tasks.toml" in msg


def test_unknown_kind(tmp_path, wine_csv):
    _err(
        "kind must be one of multiclass, binary, multilabel, regression; got 'ordinal'",
        load_table,
        wine_csv,
        name="w",
        target="quality",
        kind="ordinal",
    )
    toml = tmp_path / "tasks.toml"
    toml.write_text(
        '[[task]]\nname = "w"\npath = "wine.csv"\ntarget = "quality"\nkind = "ordinal"\n'
    )
    assert "tasks.toml" in _err("'ordinal'", load_task_file, toml)


def test_toml_syntax_error(tmp_path):
    toml = tmp_path / "tasks.toml"
    toml.write_text('[[task]]\nname = "w\npath = "wine.csv"\n')
    assert "tasks.toml" in _err("TOML syntax error", load_task_file, toml)


@pytest.mark.parametrize(
    "text,match",
    [
        ("seed = 1\n", "at least one \\[\\[task\\]\\]"),
        (
            'colour = 1\n[[task]]\nname="a"\npath="w.csv"\ntarget="y"\n',
            "unknown top-level keys \\['colour'\\]",
        ),
        ('[[task]]\nname="a"\npath="w.csv"\ntarget="y"\ncolour=1\n', "unknown keys \\['colour'\\]"),
        ('[[task]]\nname="a"\npath="w.csv"\n', "missing required key 'target'"),
        ('[[task]]\nname=3\npath="w.csv"\ntarget="y"\n', "'name' must be a string"),
        ('seed = -1\n[[task]]\nname="a"\npath="w.csv"\ntarget="y"\n', "seed must be an int >= 0"),
        (
            '[[task]]\nname="a"\npath="w.csv"\ntarget="y"\nloss_weight="x"\n',
            "'loss_weight' must be a number",
        ),
    ],
)
def test_task_file_structure_errors(tmp_path, text, match):
    toml = tmp_path / "tasks.toml"
    toml.write_text(text)
    assert "tasks.toml" in _err(match, load_task_file, toml)


def test_empty_tables(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "empty.csv" in _err("table is empty", load_table, empty, name="t", target="y")
    header = _csv(tmp_path / "header.csv", ["x", "y"], [])
    _err("table is empty \\(header only, no rows\\)", load_table, header, name="t", target="y")
    path = tmp_path / "e.npz"
    np.savez(path, x=np.zeros(0), y=np.zeros(0))
    _err("table is empty", load_table, path, name="t", target="y")


def test_too_few_rows_to_split(tmp_path):
    path = _csv(tmp_path / "t.csv", ["x", "y"], [[1, 0], [2, 1]])
    _err("split is empty \\(2 rows", load_table, path, name="t", target="y")


def test_target_value_problems(tmp_path):
    rows = [[i, i % 3] for i in range(30)]
    path = _csv(tmp_path / "t.csv", ["x", "y"], rows)
    _err(
        "binary target 'y' needs exactly 2 distinct values, found 3: \\[0, 1, 2\\]",
        load_table,
        path,
        name="t",
        target="y",
        kind="binary",
    )
    _err(
        "multilabel target 'y' row 3 \\(line 4\\) is 2; expected 0 or 1",
        load_table,
        path,
        name="t",
        target="y",
        kind="multilabel",
    )
    const = _csv(tmp_path / "c.csv", ["x", "y"], [[i, 4] for i in range(10)])
    _err("target 'y' has a single value 4", load_table, const, name="t", target="y")
    three = _csv(tmp_path / "3.csv", ["x", "y", "z"], [[i, i % 2, i % 3] for i in range(12)])
    _err(
        "needs exactly one target column",
        load_table,
        three,
        name="t",
        target=["y", "z"],
        kind="multiclass",
    )


def test_column_role_and_name_problems(tmp_path, wine_csv):
    _err(
        "are both features and target",
        load_table,
        wine_csv,
        name="w",
        target="quality",
        features=["quality", "ph"],
    )
    _err(
        "target lists a column twice",
        load_table,
        wine_csv,
        name="w",
        target=["ph", "ph"],
        kind="multilabel",
    )
    _err("whitespace", load_table, wine_csv, name="wine quality", target="quality")
    _err(
        "loss_weight must be finite and > 0",
        load_table,
        wine_csv,
        name="w",
        target="quality",
        features=["ph"],
        loss_weight=0.0,
    )
    dup = tmp_path / "dup.csv"
    dup.write_text("a,a,y\n1,2,0\n")
    _err("column 'a' appears twice", load_table, dup, name="t", target="y")
    other = tmp_path / "t.json"
    other.write_text("{}")
    _err("must end in .csv or .npz", load_table, other, name="t", target="y")


def test_ragged_csv_row(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("x,y\n1,0\n2\n")
    _err("line 3 has 1 cells, expected 2", load_table, path, name="t", target="y")


def test_npz_problems(tmp_path):
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}, None], dtype=object), y=np.array([0, 1]))
    assert "obj.npz" in _err("cannot read NPZ", load_table, obj, name="t", target="y")
    nocols = tmp_path / "nocols.npz"
    np.savez(nocols, data=np.zeros((4, 2)))
    _err("'columns'", load_table, nocols, name="t", target="y")
    ragged = tmp_path / "ragged.npz"
    np.savez(ragged, x=np.zeros(4), y=np.zeros(3))
    _err("equal lengths", load_table, ragged, name="t", target="y")
    text = tmp_path / "text.npz"
    np.savez(text, x=np.array(["1.5", "2", "abc", "4"]), y=np.array([0, 1, 0, 1]))
    _err("column 'x' row 3 has non-numeric value 'abc'", load_table, text, name="t", target="y")
    notzip = tmp_path / "bad.npz"
    notzip.write_text("not a zip")
    _err("cannot read NPZ", load_table, notzip, name="t", target="y")


def test_value_beyond_float32_is_refused(tmp_path):
    rows = [[i, i % 2] for i in range(10)]
    rows[2][0] = "1e300"
    _err(
        "column 'x' has a value out of float32 range",
        load_table,
        _csv(tmp_path / "t.csv", ["x", "y"], rows),
        name="t",
        target="y",
    )


# ---- text class labels, continuous targets, the --data forms ------------------------------

GRAPES = ("barbera", "barolo", "grignolino")


def _grape_rows(n=45):
    return [[i % 7, (i * 3) % 5, GRAPES[i % 3]] for i in range(n)]


def test_text_class_labels_are_mapped_in_sorted_order(tmp_path):
    path = _csv(tmp_path / "g.csv", ["a", "b", "grape"], _grape_rows())
    td = load_table(path, name="g", target="grape")
    assert td.spec.kind == "multiclass" and td.spec.n_outputs == 3
    assert td.spec.classes == GRAPES and td.classes.tolist() == list(GRAPES)
    labels = td.decode_labels(np.concatenate([td.y_train, td.y_val, td.y_test]))
    assert sorted(labels.tolist()) == sorted(GRAPES[i % 3] for i in range(45))  # every row's own label back
    assert TaskSpec.from_dict(json.loads(json.dumps(td.spec.to_dict()))) == td.spec


def test_two_text_labels_make_a_binary_task_and_npz_strings_work(tmp_path):
    rows = [[i, " yes" if i % 2 else "no "] for i in range(20)]
    td = load_table(_csv(tmp_path / "b.csv", ["x", "ok"], rows), name="b", target="ok")
    assert td.spec.kind == "binary" and td.spec.classes == ("no", "yes")  # stripped, sorted
    x = np.arange(20, dtype=np.float64)
    assert td.decode_labels(td.y_train).tolist() == ["yes" if v % 2 else "no" for v in
                                                     np.rint(td.x_train[:, 0] * td.std[0] + td.mean[0])]
    npz = tmp_path / "g.npz"
    np.savez(npz, x=x, grape=np.array([GRAPES[i % 3] for i in range(20)]))
    assert load_table(npz, name="n", target="grape").spec.classes == GRAPES


def test_text_label_problems(tmp_path):
    rows = _grape_rows(30)
    _err("column 'grape' row 1 \\(line 2\\) has non-numeric value 'barbera'; expected a number",
         load_table, _csv(tmp_path / "r.csv", ["a", "b", "grape"], rows), name="r", target="grape",
         kind="regression")
    rows[4][2] = " "
    _err("column 'grape' row 5 \\(line 6\\) is empty; expected a class label",
         load_table, _csv(tmp_path / "e.csv", ["a", "b", "grape"], rows), name="e", target="grape")
    ids = [[i, f"id{i}"] for i in range(40)]
    _err("target 'who' has 40 distinct text values in 40 rows; class labels repeat",
         load_table, _csv(tmp_path / "i.csv", ["x", "who"], ids), name="i", target="who")
    one = [[i, "barolo"] for i in range(10)]
    _err("target 'g' has a single label 'barolo'", load_table, _csv(tmp_path / "o.csv", ["x", "g"], one),
         name="o", target="g")
    _err("binary target 'grape' needs exactly 2 distinct values, found 3: \\['barbera', 'barolo', 'grignolino'\\]",
         load_table, _csv(tmp_path / "t.csv", ["a", "b", "grape"], _grape_rows()), name="t", target="grape",
         kind="binary")


def test_a_continuous_target_declared_multiclass_is_named(tmp_path):
    rows = [[i % 5, f"{1.5 + 0.37 * i:.2f}"] for i in range(60)]
    path = _csv(tmp_path / "p.csv", ["x", "price"], rows)
    msg = _err("target 'price' is declared multiclass but holds 60 distinct non-integer values "
               "\\(1.5 in row 1 \\(line 2\\)\\): it looks continuous", load_table, path, name="p",
               target="price", kind="multiclass")
    assert 'kind = "regression"' in msg
    assert load_table(path, name="p", target="price").spec.kind == "regression"  # inferred: fine
    few = _csv(tmp_path / "h.csv", ["x", "y"], [[i, [0.5, 1.5][i % 2]] for i in range(20)])
    assert load_table(few, name="h", target="y", kind="binary").spec.classes == (0.5, 1.5)  # codes, not continuous


def test_data_entries_take_a_task_file_or_a_table_with_a_target(tmp_path):
    table = _csv(tmp_path / "grapes.csv", ["a", "b", "grape"], _grape_rows())
    toml = tmp_path / "t.toml"
    toml.write_text('[[task]]\nname = "one"\npath = "grapes.csv"\ntarget = "grape"\n'
                    '[[task]]\nname = "two"\npath = "grapes.csv"\ntarget = "a"\nfeatures = ["b"]\nkind = "regression"\n')
    assert [e["name"] for e in data_entries(toml)] == ["one", "two"]
    assert [d.name for d in load_data(toml, name="two")] == ["two"]
    _err("has no task named 'three'; it has \\['one', 'two'\\]", data_entries, toml, name="three")
    _err("--target, --kind describe a .csv/.npz table", data_entries, toml, target="grape", kind="binary")
    [entry] = data_entries(table, target="grape", seed=3)
    assert (entry["name"], entry["seed"], entry["split"]) == ("grapes", 3, None)  # named after the file
    assert load_data(table, target="grape", name="g")[0].spec.classes == GRAPES
    _err("--data grapes.csv is a table: say which column is the target with --target COLUMN", data_entries, table)
    _err("--data must be a TOML task file \\(.toml\\), or a table \\(.csv or .npz\\) with --target COLUMN; "
         "got 'x.txt'", data_entries, tmp_path / "x.txt", target="y")


def test_task_file_domain_shares_one_scaling_fitted_on_all_its_train_rows(tmp_path, wine_csv):
    _csv(tmp_path / "more.csv", ["alcohol", "ph", "sweet"],
         [[f"{20 + i}", f"{4 + i / 10:.2f}", i % 2] for i in range(30)])
    (tmp_path / "tasks.toml").write_text(
        '[[task]]\nname = "quality"\npath = "wine.csv"\ntarget = "quality"\n'
        'features = ["alcohol", "ph"]\ndomain = "cellar"\n'
        '[[task]]\nname = "sweet"\npath = "more.csv"\ntarget = "sweet"\ndomain = "cellar"\n'
        '[[task]]\nname = "alone"\npath = "wine.csv"\ntarget = "quality"\nfeatures = ["ph"]\n')
    q, sw, alone = load_task_file(tmp_path / "tasks.toml")
    assert q.spec.domain == sw.spec.domain == "cellar" and alone.spec.domain is None
    np.testing.assert_array_equal(q.mean, sw.mean)
    both = np.concatenate([q.x_train * q.std + q.mean, sw.x_train * sw.std + sw.mean])
    np.testing.assert_allclose(q.mean, both.mean(axis=0), rtol=1e-5)  # fitted on both train splits
    xt = np.concatenate([q.x_train, sw.x_train]).astype(np.float64)
    np.testing.assert_allclose(xt.mean(axis=0), 0, atol=1e-5)
    assert abs(q.x_train[:, 0].mean()) > 0.5  # each task alone is no longer centred: one scale for both
    [picked] = load_data(tmp_path / "tasks.toml", name="sweet")  # --data NAME: scaled as in training
    np.testing.assert_array_equal(picked.x_train, sw.x_train)
    np.testing.assert_array_equal(picked.mean, sw.mean)
    (tmp_path / "bad.toml").write_text(
        '[[task]]\nname = "quality"\npath = "wine.csv"\ntarget = "quality"\nfeatures = ["ph"]\n'
        'domain = "cellar"\n'
        '[[task]]\nname = "sweet"\npath = "more.csv"\ntarget = "sweet"\ndomain = "cellar"\n')
    with pytest.raises(ValueError, match=r"the tasks of domain 'cellar' \(\['quality', 'sweet'\]\) must "
                                         r"have the same number of features, got \[1, 2\]"):
        load_task_file(tmp_path / "bad.toml")

"""User tasks from tables (.csv with a header row, or .npz) described by a TOML file.

A task file lists tables and which columns are inputs and targets; paths are relative to the
TOML file's folder:

    seed = 0                      # optional split seed (default 0)
    [[task]]
    name = "wine_quality"
    path = "wine.csv"             # .csv (header row) or .npz
    target = "quality"            # column name; a list of names for multilabel
    features = ["alcohol", "ph"]  # optional; default: every column except target(s) and split
    kind = "multiclass"           # optional; multiclass | binary | multilabel | regression
    loss_weight = 1.0             # optional
    split = "fold"                # optional column: train/val/test (or 0/1/2) per row
    domain = "wine_table"         # optional: tasks over the same inputs share one encoder

Tasks of one domain must have the same number of features; they are standardised with one
(mean, std) fitted on the union of their training rows, so a row means the same to each.

A classification target may hold numbers or text labels ("barolo"); class id i is the i-th
label in sorted order, and the labels travel in the task's spec (so in checkpoints).
Commands take `--data` in one of two forms everywhere (load_data): such a TOML file, or one
.csv/.npz table with `--target COLUMN`.

NPZ files hold either one 2-D array `data` plus a string array `columns`, or one 1-D array per
column; they are always read with allow_pickle=False. Every problem is a ValueError naming the
file, the task, the column and what was expected versus found.
"""

from __future__ import annotations

import csv
import math
import tomllib
import zipfile
from pathlib import Path

import numpy as np

from moe.tasks.spec import TASK_KINDS, TaskData, TaskSpec
from moe.tasks.splits import make_task_data, split_indices, to_float32

_TOP_KEYS = ("seed", "task")
_TASK_KEYS = ("name", "path", "target", "features", "kind", "loss_weight", "split", "domain")
_SPLIT_NAMES = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
_MAX_INFERRED_CLASSES = 20


# -- reading tables -------------------------------------------------------------------------


class Table:
    """Named columns of one file; cells are parsed to numbers only when a column is used."""

    def __init__(
        self,
        path: Path,
        columns: list[str],
        cells: dict[str, list[str] | np.ndarray],
        lines: list[int] | None = None,
    ) -> None:
        self.path = path
        self.columns = columns
        self._cells = cells  # column -> list[str] (CSV) or 1-D ndarray (NPZ)
        self._lines = lines  # CSV: file line of each data row, for messages
        self.n_rows = len(next(iter(cells.values()))) if cells else 0

    def where_row(self, i: int) -> str:
        """Human row reference: 1-based data row, and the file line for CSV."""
        return f"row {i + 1}" + (f" (line {self._lines[i]})" if self._lines else "")

    def raw(self, col: str) -> object:
        return self._cells[col]

    def labels(self, col: str, where: str) -> np.ndarray | None:
        """Column as stripped text labels str[n] when any cell is not a number; None when
        every cell is one (then the column is read with numeric())."""
        cells = self._cells[col]
        if isinstance(cells, np.ndarray):
            if cells.dtype.kind not in "US":
                return None
            texts = [str(c).strip() for c in cells.tolist()]
        else:
            texts = [c.strip() for c in cells]
        if all(_is_number(t) for t in texts):
            return None
        for i, t in enumerate(texts):
            if not t:
                raise ValueError(f"{where}: column '{col}' {self.where_row(i)} is empty; expected a class label")
        return np.asarray(texts, dtype=str)

    def numeric(self, col: str, where: str) -> np.ndarray:
        """Column as finite float64 [n]; the first bad cell is named with its row and value."""
        cells = self._cells[col]
        if isinstance(cells, np.ndarray) and cells.dtype.kind in "biuf":
            values = cells.astype(np.float64)
        elif isinstance(cells, np.ndarray) and cells.dtype.kind not in "US":
            raise ValueError(f"{where}: column '{col}' has dtype {cells.dtype}; expected numbers")
        else:
            values = np.empty(len(cells), dtype=np.float64)
            for i, cell in enumerate(cells):
                try:
                    values[i] = float(cell)
                except ValueError:
                    raise ValueError(
                        f"{where}: column '{col}' {self.where_row(i)} has non-numeric value "
                        f"{str(cell)!r}; expected a number"
                    ) from None
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{where}: column '{col}' {self.where_row(i)} is {values[i]} (NaN or Inf); "
                "expected a finite number"
            )
        return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, where: str) -> Table:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise ValueError(f"{where}: table is empty (no header row)")
            header = [h.strip() for h in header]
            rows, lines = [], []
            for row in reader:
                if not any(c.strip() for c in row):
                    continue  # blank line
                if len(row) != len(header):
                    raise ValueError(
                        f"{where}: line {reader.line_num} has {len(row)} cells, "
                        f"expected {len(header)} (the header's columns)"
                    )
                rows.append(row)
                lines.append(reader.line_num)
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{where}: cannot read CSV: {e}") from None
    _check_header(header, where)
    cells = {h: [r[j] for r in rows] for j, h in enumerate(header)}
    return Table(path, header, cells, lines)


def _check_header(columns: list[str], where: str) -> None:
    seen: set[str] = set()
    for c in columns:
        if not c:
            raise ValueError(f"{where}: a column has an empty name; columns: {columns}")
        if c in seen:
            raise ValueError(f"{where}: column '{c}' appears twice; columns: {columns}")
        seen.add(c)


def _read_npz(path: Path, where: str) -> Table:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{where}: cannot read NPZ (without pickle): {e}") from None
    if "data" in arrays:
        data, names = arrays.pop("data"), arrays.pop("columns", None)
        if arrays:
            raise ValueError(
                f"{where}: NPZ with 'data' may hold only 'data' and 'columns', also found {sorted(arrays)}"
            )
        if names is None or names.ndim != 1 or names.dtype.kind not in "US":
            raise ValueError(f"{where}: NPZ 'data' needs a 1-D string array 'columns' beside it")
        if data.ndim != 2 or data.shape[1] != names.shape[0]:
            raise ValueError(
                f"{where}: NPZ 'data' must be 2-D with {names.shape[0]} columns (one per name "
                f"in 'columns'), got shape {data.shape}"
            )
        columns = [c.strip() for c in names.astype(str).tolist()]
        cells = {c: data[:, j] for j, c in enumerate(columns)}
    else:
        columns = list(arrays)
        for k, a in arrays.items():
            if a.ndim != 1:
                raise ValueError(
                    f"{where}: NPZ array '{k}' must be 1-D (one column), got {a.shape}"
                )
        lengths = {k: a.shape[0] for k, a in arrays.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{where}: NPZ columns must have equal lengths, got {lengths}")
        cells = dict(arrays)
    _check_header(columns, where)
    if not columns:
        raise ValueError(f"{where}: table is empty (no columns)")
    return Table(path, columns, cells)


def read_table(path: str | Path, where: str | None = None) -> Table:
    """Open a .csv or .npz table (columns by name); ValueError for anything unreadable."""
    path = Path(path)
    where = where or str(path)
    if not path.is_file():
        raise ValueError(f"{where}: data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, where)
    if suffix == ".npz":
        return _read_npz(path, where)
    raise ValueError(f"{where}: data file must end in .csv or .npz, got {path.name!r}")


# -- from columns to a task -----------------------------------------------------------------


def _pick_columns(
    table: Table, targets: list[str], features: list[str] | None, split: str | None, where: str
) -> list[str]:
    """Check every named column exists and roles do not overlap; return the feature columns."""
    named = targets + (features or []) + ([split] if split else [])
    for c in named:
        if c not in table.columns:
            raise ValueError(f"{where}: unknown column '{c}'; available columns: {table.columns}")
    for role, cols in (("target", targets), ("features", features or [])):
        if len(set(cols)) != len(cols):
            raise ValueError(f"{where}: {role} lists a column twice: {cols}")
    if features is None:
        features = [c for c in table.columns if c not in targets and c != split]
    overlap = sorted(set(features) & (set(targets) | {split}))
    if overlap:
        raise ValueError(f"{where}: columns {overlap} are both features and target/split")
    if not features:
        raise ValueError(f"{where}: no feature columns left; columns: {table.columns}")
    return features


def _infer_kind(y: np.ndarray, targets: list[str], where: str) -> str:
    if y.shape[1] > 1:
        return "multilabel" if np.all((y == 0) | (y == 1)) else "regression"
    v = y[:, 0]
    distinct = np.unique(v)
    if np.all(v == np.round(v)) and distinct.shape[0] <= _MAX_INFERRED_CLASSES:
        if distinct.shape[0] < 2:
            raise ValueError(
                f"{where}: target '{targets[0]}' has a single value {distinct[0]:g}; "
                'expected at least 2 classes (or say kind = "regression")'
            )
        return "binary" if distinct.shape[0] == 2 else "multiclass"
    return "regression"


def _label_kind(labels: np.ndarray, target: str, where: str) -> str:
    """binary or multiclass for a column of text labels; refuses what cannot be classes."""
    n, distinct = labels.shape[0], np.unique(labels)
    if distinct.shape[0] < 2:
        raise ValueError(f"{where}: target '{target}' has a single label {str(distinct[0])!r}; "
                         "expected at least 2 classes")
    if distinct.shape[0] > max(_MAX_INFERRED_CLASSES, n // 2):
        raise ValueError(f"{where}: target '{target}' has {distinct.shape[0]} distinct text values in {n} rows; "
                         "class labels repeat (is it an id or free-text column?)")
    return "binary" if distinct.shape[0] == 2 else "multiclass"


def _class_ids(kind: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(y, classes, n_outputs) of one label column (numbers or text): class id i is the
    i-th smallest label."""
    classes = np.unique(values)
    ids = np.searchsorted(classes, values)  # [n]
    if classes.dtype.kind == "f" and np.all(classes == np.round(classes)):
        classes = classes.astype(np.int64)
    if kind == "binary":
        return ids.astype(np.float32)[:, None], classes, 1
    return ids.astype(np.int32), classes, classes.shape[0]


def _check_class_count(kind: str, classes: np.ndarray, target: str, where: str) -> None:
    need = "exactly 2" if kind == "binary" else "at least 2"
    if (kind == "binary" and classes.shape[0] != 2) or classes.shape[0] < 2:
        shown = ", ".join(f"{c:g}" if classes.dtype.kind in "fiu" else repr(str(c)) for c in classes[:10])
        raise ValueError(
            f"{where}: {kind} target '{target}' needs {need} distinct values, "
            f"found {classes.shape[0]}: [{shown}{', ...' if classes.shape[0] > 10 else ''}]"
        )


def _encode(
    kind: str, y: np.ndarray, targets: list[str], table: Table, where: str
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(encoded y, classes, n_outputs) for make_task_data."""
    if kind in ("multiclass", "binary"):
        if y.shape[1] != 1:
            raise ValueError(
                f"{where}: a {kind} task needs exactly one target column, got {targets}"
            )
        v = y[:, 0]
        distinct = np.unique(v)
        fractional = np.flatnonzero(v != np.round(v))
        if fractional.size and distinct.shape[0] > _MAX_INFERRED_CLASSES:
            i = int(fractional[0])
            raise ValueError(
                f"{where}: target '{targets[0]}' is declared {kind} but holds {distinct.shape[0]} distinct "
                f"non-integer values ({v[i]:g} in {table.where_row(i)}): it looks continuous; "
                'for a continuous target say kind = "regression" (--kind regression)'
            )
        _check_class_count(kind, distinct, targets[0], where)
        return _class_ids(kind, v)
    if kind == "multilabel":
        for j, col in enumerate(targets):
            bad = np.flatnonzero((y[:, j] != 0) & (y[:, j] != 1))
            if bad.size:
                raise ValueError(
                    f"{where}: multilabel target '{col}' {table.where_row(int(bad[0]))} is "
                    f"{y[bad[0], j]:g}; expected 0 or 1"
                )
    return y, None, y.shape[1]


def _split_from_column(table: Table, col: str, where: str) -> np.ndarray:
    """Split id (0 train, 1 val, 2 test) per row from a train/val/test or 0/1/2 column."""
    codes = np.empty(table.n_rows, dtype=np.int64)
    for i, cell in enumerate(table.raw(col)):
        text = str(cell.item() if isinstance(cell, np.generic) else cell).strip().lower()
        code = _SPLIT_NAMES.get(text)
        if code is None:
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            code = int(number) if number in (0.0, 1.0, 2.0) else None
        if code is None:
            raise ValueError(
                f"{where}: split column '{col}' {table.where_row(i)} is {str(cell)!r}; "
                "expected train, val, test (or 0, 1, 2)"
            )
        codes[i] = code
    return codes


def _make_splits(
    kind: str, y: np.ndarray, table: Table, split: str | None, seed: int, where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = table.n_rows
    if split is not None:
        codes = _split_from_column(table, split, where)
        parts = tuple(np.flatnonzero(codes == c) for c in range(3))
    else:
        strat = y if kind == "multiclass" else (y[:, 0] if kind == "binary" else None)
        parts = split_indices(n, np.random.default_rng(seed), stratify=strat)
    for name, rows in zip(("train", "val", "test"), parts, strict=True):
        if rows.shape[0] == 0:
            raise ValueError(
                f"{where}: the {name} split is empty ({n} rows in the table); "
                "add rows (for classification about 3 or more per class) or give a split column"
            )
    return parts  # type: ignore[return-value]


def _check_classes_in_train(
    y: np.ndarray, classes: np.ndarray, parts, target: str, where: str
) -> None:
    ids = y[:, 0].astype(np.int64) if y.ndim == 2 else y.astype(np.int64)
    seen = set(np.unique(ids[parts[0]]).tolist())
    for name, rows in zip(("val", "test"), parts[1:], strict=True):
        missing = sorted(set(np.unique(ids[rows]).tolist()) - seen)
        if missing:
            raise ValueError(
                f"{where}: class {classes[missing[0]]} of target '{target}' is in the {name} split "
                "but not in train; every class must have training rows"
            )


def _as_names(value: object, what: str, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(
        f"{where}: {what} must be a column name or a non-empty list of names, got {value!r}"
    )


def load_table(
    path: str | Path,
    *,
    name: str,
    target: str | list[str],
    features: list[str] | None = None,
    kind: str | None = None,
    seed: int = 0,
    loss_weight: float = 1.0,
    split: str | None = None,
    domain: str | None = None,
    scale_inputs: bool = True,
) -> TaskData:
    """One task from a .csv/.npz table: pick columns, check them, split, standardise.

    When `kind` is None it is inferred from the target: one column of text labels, or whose
    values are all integers with at most 20 distinct values, is classification (2 values ->
    binary, more -> multiclass); several 0/1 columns are multilabel; anything else is
    regression. Class labels are the target's distinct values in sorted order (numbers or
    text such as "barolo"), kept in TaskData.classes and in the spec, so checkpoints carry them. Without a `split`
    column rows are split 60/20/20 by default_rng(seed), stratified for classification.
    scale_inputs=False leaves the inputs as they are (mean 0, std 1), for a caller that scales
    a whole domain at once.
    """
    where = f"{path}: task '{name}'"
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    if kind is not None and kind not in TASK_KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(TASK_KINDS)}; got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{where}: seed must be an int >= 0, got {seed!r}")
    try:
        TaskSpec(name, "regression", 1, 1, loss_weight, domain)  # checks the name, loss_weight, domain
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    targets = _as_names(target, "target", where)
    if features is not None:
        features = _as_names(features, "features", where)
    if split is not None and not isinstance(split, str):
        raise ValueError(f"{where}: split must be a column name, got {split!r}")
    table = read_table(path, where)
    features = _pick_columns(table, targets, features, split, where)
    if table.n_rows == 0:
        raise ValueError(f"{where}: table is empty (header only, no rows)")
    x = np.stack([table.numeric(c, where) for c in features], axis=1)  # [n, d]
    for j, col in enumerate(features):
        to_float32(x[:, j], f"{where}: column '{col}'")  # refuse what float32 cannot hold
    labels = table.labels(targets[0], where) if len(targets) == 1 and kind in (None, "multiclass", "binary") else None
    if labels is not None:  # text class labels, e.g. "barolo"
        kind = kind or _label_kind(labels, targets[0], where)
        _check_class_count(kind, np.unique(labels), targets[0], where)
        y, classes, n_out = _class_ids(kind, labels)
    else:
        y_raw = np.stack([table.numeric(c, where) for c in targets], axis=1)  # [n, T]
        for j, col in enumerate(targets):
            to_float32(y_raw[:, j], f"{where}: column '{col}'")
        kind = kind or _infer_kind(y_raw, targets, where)
        y, classes, n_out = _encode(kind, y_raw, targets, table, where)
    parts = _make_splits(kind, y, table, split, seed, where)
    if classes is not None:
        _check_classes_in_train(y, classes, parts, targets[0], where)
    spec = TaskSpec(name, kind, len(features), n_out, loss_weight, domain,
                    classes=None if classes is None else tuple(classes.tolist()))
    identity = (np.zeros(x.shape[1], np.float32), np.ones(x.shape[1], np.float32))
    return make_task_data(spec, x, y, parts, classes=classes, x_stats=None if scale_inputs else identity)


# -- the TOML task file ---------------------------------------------------------------------


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: TOML syntax error: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text: {e}") from None


def _task_args(entry: object, i: int, path: Path, seed: int) -> dict:
    """Validate one [[task]] table and turn it into load_table keyword arguments."""
    where = f"{path}: [[task]] #{i + 1}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table, got {entry!r}")
    unknown = sorted(set(entry) - set(_TASK_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {list(_TASK_KEYS)}")
    for key in ("name", "path", "target"):
        if key not in entry:
            raise ValueError(f"{where}: missing required key '{key}'")
    for key in ("name", "path", "kind", "split", "domain"):
        if key in entry and not isinstance(entry[key], str):
            raise ValueError(f"{where}: '{key}' must be a string, got {entry[key]!r}")
    w = entry.get("loss_weight", 1.0)
    if isinstance(w, bool) or not isinstance(w, int | float):
        raise ValueError(f"{where}: 'loss_weight' must be a number, got {w!r}")
    return {
        "path": path.parent / entry["path"],
        "name": entry["name"],
        "target": entry["target"],
        "features": entry.get("features"),
        "kind": entry.get("kind"),
        "seed": seed,
        "loss_weight": float(w),
        "split": entry.get("split"),
        "domain": entry.get("domain"),
    }


def task_file_entries(path: str | Path) -> list[dict]:
    """The load_table keyword arguments of every task a TOML task file lists, checked."""
    path = Path(path)
    doc = _read_toml(path)
    unknown = sorted(set(doc) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {unknown}; allowed: {list(_TOP_KEYS)}")
    seed = doc.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{path}: seed must be an int >= 0, got {seed!r}")
    entries = doc.get("task")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected at least one [[task]] table, found none")
    args = [_task_args(e, i, path, seed) for i, e in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, a in enumerate(args):
        if a["name"] in seen:
            raise ValueError(
                f"{path}: duplicate task name '{a['name']}' in [[task]] #{seen[a['name']] + 1} "
                f"and #{i + 1}"
            )
        seen[a["name"]] = i
    return args


def _load_entries(path: Path, args: list[dict]) -> list[TaskData]:
    """The tasks of a task file's entries; the tasks of a shared domain are scaled together."""
    counts: dict[str, int] = {}  # domain -> its tasks in this file
    for a in args:
        if a["domain"] is not None:
            counts[a["domain"]] = counts.get(a["domain"], 0) + 1
    tasks = []
    for i, a in enumerate(args):
        shared = counts.get(a["domain"], 0) > 1  # left unscaled here, scaled per domain below
        try:
            tasks.append(load_table(**a, scale_inputs=not shared))
        except ValueError as e:
            raise ValueError(f"{path} [[task]] #{i + 1}: {e}") from None
    return _standardize_domains(tasks, path)


def _standardize_domains(tasks: list[TaskData], path: Path) -> list[TaskData]:
    """Scale the tasks of each shared domain with one standardiser fitted on all their train rows."""
    import dataclasses

    from moe.tasks.splits import fit_standardizer, standardize

    groups: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        if t.spec.domain is not None:
            groups.setdefault(t.spec.domain, []).append(i)
    out = list(tasks)
    for domain, idx in groups.items():
        if len(idx) < 2:
            continue
        widths = {tasks[i].spec.n_inputs for i in idx}
        if len(widths) > 1:
            names = [tasks[i].name for i in idx]
            raise ValueError(f"{path}: the tasks of domain {domain!r} ({names}) must have the same "
                             f"number of features, got {sorted(widths)}")
        mean, std = fit_standardizer(np.concatenate([tasks[i].x_train for i in idx]))
        for i in idx:
            t = tasks[i]
            out[i] = dataclasses.replace(
                t, x_train=standardize(t.x_train, mean, std), x_val=standardize(t.x_val, mean, std),
                x_test=standardize(t.x_test, mean, std), mean=mean, std=std)
    return out


def load_task_file(path: str | Path) -> list[TaskData]:
    """Every task listed in a TOML task file, in file order (see the module doc for the format)."""
    return _load_entries(Path(path), task_file_entries(path))


DATA_FORMS = "a TOML task file (.toml), or a table (.csv or .npz) with --target COLUMN"


def data_entries(
    path: str | Path,
    *,
    target: str | None = None,
    name: str | None = None,
    features: list[str] | None = None,
    kind: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """What a command's `--data` names, as load_table keyword arguments: every task of a TOML
    task file (`name` then picks one), or one .csv/.npz table read with `target` (the task
    is called `name`, by default the file's stem). The same forms in every command."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".toml":
        given = [flag for flag, v in (("--target", target), ("--features", features), ("--kind", kind)) if v]
        if given:
            raise ValueError(f"{path}: {', '.join(given)} describe a .csv/.npz table; a TOML task file "
                             "names each task's target, features and kind itself")
        entries = task_file_entries(path)
        if name is None:
            return entries
        chosen = [e for e in entries if e["name"] == name]
        if not chosen:
            raise ValueError(f"{path} has no task named {name!r}; it has {[e['name'] for e in entries]}")
        return chosen
    if suffix in (".csv", ".npz"):
        if not target:
            raise ValueError(f"--data {path.name} is a table: say which column is the target with --target COLUMN")
        return [{"path": path, "name": name or path.stem, "target": target, "features": features, "kind": kind,
                 "seed": seed, "loss_weight": 1.0, "split": None, "domain": None}]
    raise ValueError(f"--data must be {DATA_FORMS}; got {path.name!r}")


def load_data(path: str | Path, **options) -> list[TaskData]:
    """The tasks a command's `--data` names (see data_entries for the forms and options). A
    task of a TOML file is read with the whole file, so a shared domain is scaled as in training."""
    entries = data_entries(path, **options)
    if Path(path).suffix.lower() == ".toml":
        wanted = {e["name"] for e in entries}
        return [t for t in _load_entries(Path(path), task_file_entries(path)) if t.name in wanted]
    return [load_table(**e) for e in entries]  # each error names the file and the task

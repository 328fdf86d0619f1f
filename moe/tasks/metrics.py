"""Per-kind evaluation metrics from raw model outputs, in plain numpy (no warnings, no sklearn).

They agree with sklearn.metrics (zero_division=0, force_finite=True) and define every edge case:
  multiclass  accuracy; macro_f1 = mean F1 over the classes present in y or in the predictions
              (sklearn's label set); a class that is never predicted has F1 0.
  binary      accuracy; f1 of the positive class (0 when y and predictions have no positives).
  multilabel  f1 = micro F1 over all (row, label) cells (0 when there are no positives at all);
              accuracy = subset accuracy (a row counts only if every label is right).
  regression  r2 = 1 - SS_res / SS_tot per output, averaged over outputs; an output whose target
              is constant has r2 1.0 if predicted exactly and 0.0 otherwise (sklearn's
              force_finite). mse = mean squared error over all cells (no 0.5; the loss has it).
Regression values are on whatever scale y is given in: TaskData keeps y standardised on train,
so mse is in standard units; r2 is scale-invariant anyway.
"""

from __future__ import annotations

import numpy as np

from moe.tasks.losses import check_outputs, check_targets, predict
from moe.tasks.spec import METRIC_BY_KIND, check_kind


def primary_metric(kind: str) -> str:
    """The metric a task of this kind is judged by (same as TaskSpec.metric)."""
    return METRIC_BY_KIND[check_kind(kind)]


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """2tp / (2tp + fp + fn), with 0 where the denominator is 0."""
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 0.0)


def _multiclass(pred: np.ndarray, y: np.ndarray, n_classes: int) -> dict[str, float]:
    tp = np.bincount(y[pred == y], minlength=n_classes).astype(np.float64)  # [C]
    n_pred = np.bincount(pred, minlength=n_classes).astype(np.float64)  # [C]
    n_true = np.bincount(y, minlength=n_classes).astype(np.float64)  # [C]
    present = (n_pred + n_true) > 0
    f1 = _f1(tp, n_pred - tp, n_true - tp)[present]
    return {"accuracy": float(np.mean(pred == y)), "macro_f1": float(f1.mean())}


def _counts(pred: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    p, t = pred == 1, y == 1
    return float(np.sum(p & t)), float(np.sum(p & ~t)), float(np.sum(~p & t))


def _r2(out: np.ndarray, y: np.ndarray) -> float:
    o, t = out.astype(np.float64), y.astype(np.float64)
    ss_res = np.square(t - o).sum(axis=0)  # [D]
    ss_tot = np.square(t - t.mean(axis=0)).sum(axis=0)  # [D]
    r2 = np.where(ss_tot > 0, 1 - ss_res / np.where(ss_tot > 0, ss_tot, 1), 0.0)
    r2 = np.where((ss_tot == 0) & (ss_res == 0), 1.0, r2)
    return float(r2.mean())


def evaluate(kind: str, out: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Metrics of raw outputs `out` against targets `y` (both as in losses.loss_and_grad)."""
    check_kind(kind)
    out = check_outputs(kind, out)
    y = check_targets(kind, out, y)
    pred = predict(kind, out)
    if kind == "multiclass":
        return _multiclass(pred, y.astype(np.intp), out.shape[1])
    if kind == "regression":
        with np.errstate(under="ignore"):  # squares too small for float64 are 0: correct
            diff = out.astype(np.float64) - y.astype(np.float64)  # [B, D]
            return {"r2": _r2(out, y), "mse": float(np.mean(np.square(diff)))}
    f1 = float(_f1(*(np.asarray(c) for c in _counts(pred, y))))
    if kind == "binary":
        return {"accuracy": float(np.mean(pred == y)), "f1": f1}
    return {"f1": f1, "accuracy": float(np.mean(np.all(pred == y, axis=1)))}

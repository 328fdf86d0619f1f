"""Per-kind task losses with their gradients (backward beside forward), and predictions.

Conventions (all means are over the batch B only):
  multiclass  softmax cross-entropy            out [B, C], y int [B]
  binary      sigmoid BCE with logits          out [B, 1], y 0/1 [B, 1]
  multilabel  sigmoid BCE with logits, summed over the L labels, then mean over the batch;
              so each label gets the same gradient scale as a binary task    out, y [B, L]
  regression  0.5 * squared error, summed over outputs, mean over the batch; the 0.5 makes
              the gradient exactly (out - y) / B                             out, y [B, D]
Gradients are d(loss)/d(out) with out's dtype. Written to survive np.seterr(all="raise") for
logits as large as +-100 in float32: exponentials only ever see non-positive arguments, so they
cannot overflow; they and the probabilities and gradients built from them may underflow, and
flushing those to 0 is the right answer, so underflow (only) is silenced in those blocks.
Binary/multilabel targets may be soft (in [0, 1]); the loss is then still the BCE.
"""

from __future__ import annotations

import numpy as np

from moe.tasks.spec import check_kind


def check_outputs(kind: str, out: object) -> np.ndarray:
    """`out` if it is a non-empty float [B, n_outputs] array."""
    if not isinstance(out, np.ndarray) or out.dtype.kind != "f" or out.ndim != 2:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise ValueError(f"{kind} outputs must be a float array [B, n_outputs], got {got}")
    if out.shape[0] == 0:
        raise ValueError(f"{kind} outputs have an empty batch; the mean over 0 rows is undefined")
    return out


def check_targets(kind: str, out: np.ndarray, y: object) -> np.ndarray:
    """`y` as an array if it fits `out` for this kind (int ids [B] or the outputs' shape)."""
    y = np.asarray(y)
    if kind == "multiclass":
        if y.dtype.kind not in "iu" or y.shape != (out.shape[0],):
            raise ValueError(
                f"multiclass targets must be int class ids [{out.shape[0]}], got {y.dtype} {y.shape}"
            )
        if y.min() < 0 or y.max() >= out.shape[1]:
            raise ValueError(
                f"multiclass targets must be in [0, {out.shape[1]}), got [{y.min()}, {y.max()}]"
            )
        return y
    if y.shape != out.shape:
        raise ValueError(f"{kind} targets must have the outputs' shape {out.shape}, got {y.shape}")
    if kind == "binary" and out.shape[1] != 1:
        raise ValueError(f"binary outputs must be [B, 1], got {out.shape}")
    return y


def _softmax_xent(out: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b = out.shape[0]
    z = out - out.max(axis=1, keepdims=True)  # [B, C], <= 0
    rows = np.arange(b)
    with np.errstate(under="ignore"):  # tiny probabilities and gradients flush to 0: correct
        e = np.exp(z)  # [B, C]
        s = e.sum(axis=1, keepdims=True)  # [B, 1], >= 1
        nll = np.log(s[:, 0]) - z[rows, y]  # [B]
        grad = e / s  # [B, C] softmax
        grad[rows, y] -= 1
    return nll.astype(np.float64), grad.astype(out.dtype, copy=False)


def _sigmoid_bce(out: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = y.astype(out.dtype, copy=False)
    with np.errstate(under="ignore"):  # exp(-|z|) may underflow to 0: correct
        e = np.exp(-np.abs(out))  # [B, L] in (0, 1]
        # BCE(z, y) = max(z, 0) - z*y + log(1 + exp(-|z|)), exact and finite for any z.
        per = np.maximum(out, 0) - out * y + np.log1p(e)  # [B, L]
        p = np.where(out >= 0, 1 / (1 + e), e / (1 + e))  # [B, L] sigmoid(out)
        grad = p - y  # [B, L]
    return per.sum(axis=1, dtype=np.float64), grad.astype(out.dtype, copy=False)


def _half_mse(out: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(under="ignore"):  # squares/gradients too small to hold are 0: correct
        diff = out - y.astype(out.dtype, copy=False)  # [B, D]
        rows = 0.5 * np.square(diff, dtype=np.float64).sum(axis=1)  # [B]
    return rows, diff.astype(out.dtype, copy=False)


def row_losses(kind: str, out: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 loss of each row [B], d row-loss / d out [B, n_out]) for a task of this kind.

    For batches that mix many tasks: the trainer weights rows (by task) and sums, in one call
    per kind instead of one per task."""
    check_kind(kind)
    out = check_outputs(kind, out)
    y = check_targets(kind, out, y)
    if kind == "multiclass":
        return _softmax_xent(out, y)
    if kind == "regression":
        return _half_mse(out, y)
    return _sigmoid_bce(out, y)


def loss_and_grad(kind: str, out: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(mean loss over the batch, d loss / d out) for a task of this kind; see the module doc."""
    rows, grad = row_losses(kind, out, y)
    with np.errstate(under="ignore"):
        grad = grad / grad.dtype.type(rows.shape[0])
    return float(rows.mean()), grad


def predict(kind: str, out: np.ndarray) -> np.ndarray:
    """Predictions in the same form as the targets.

    multiclass: argmax int32 [B]; binary/multilabel: (out > 0) as float32 0/1 [B, L], i.e.
    probability > 0.5; regression: `out` itself (identity, no copy).
    """
    check_kind(kind)
    out = check_outputs(kind, out)
    if kind == "multiclass":
        return out.argmax(axis=1).astype(np.int32)  # [B]
    if kind == "regression":
        return out
    return (out > 0).astype(np.float32)  # [B, L]

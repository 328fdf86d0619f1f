"""The report's pictures, drawn from summary dicts (JSON) so any saved profile can be redrawn.

Why these four: load in expert-id order says WHICH expert is hot or dead (importance beside
it says whether the gate also leans on it); the sorted view says HOW uneven the load is;
the task x expert heatmap says who sends what where; load per shard says what the busiest
process has to carry. matplotlib is imported only when drawing (see pyplot()).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

MAX_HEATMAP_COLS = 512  # experts are summed into at most this many column bins in heatmaps
BAR_LIMIT = 256  # above this many experts (or bins) bars become a filled step curve
ID_TICK_LIMIT = 64  # label every expert id on the x axis up to this many experts
TASK_TICK_LIMIT = 40  # label heatmap rows with task names up to this many tasks
WIDTH_IN, DPI = 12.0, 100  # every picture is 1200 px wide

HOT, DEAD, EVEN, BAR, IMPORTANCE = "#d62728", "#7f7f7f", "#2ca02c", "#1f77b4", "#111111"


def pyplot() -> Any:
    """pyplot on the Agg backend, chosen here (never at package import); a session that
    already imported pyplot keeps its backend, since switching would close its figures."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mpl_errstate() -> np.errstate:
    """matplotlib relies on numpy's default float-error handling (tests raise on all)."""
    return np.errstate(divide="warn", over="warn", invalid="warn", under="ignore")


def relative(values: Sequence[float]) -> np.ndarray:
    """values / their mean (1.0 = an even share); all zeros stay zeros."""
    v = np.asarray(values, dtype=np.float64)  # [E]
    mean = float(v.mean()) if v.size else 0.0
    return v / mean if mean > 0 else v


def aggregate_expert_columns(
    matrix: np.ndarray | sp.spmatrix, max_cols: int = MAX_HEATMAP_COLS
) -> tuple[np.ndarray, np.ndarray]:
    """Sum contiguous, balanced groups of expert columns of a [T, E] matrix into at most max_cols.

    Returns (binned float64 [T, n_cols], edges int64 [n_cols + 1]): column e falls in bin b
    when edges[b] <= e < edges[b + 1]. With E <= max_cols every expert is its own bin.
    """
    if isinstance(max_cols, bool) or not isinstance(max_cols, int) or max_cols < 1:
        raise ValueError(f"max_cols must be a positive int, got {max_cols!r}")
    T, E = matrix.shape
    n_cols = min(E, max_cols)
    edges = (np.arange(n_cols + 1, dtype=np.int64) * E) // n_cols  # [n_cols+1]
    if sp.issparse(matrix):
        coo = sp.coo_matrix(matrix)
        col_bin = np.searchsorted(edges, coo.col, side="right") - 1  # [nnz]
        flat = coo.row.astype(np.int64) * n_cols + col_bin  # [nnz]
        binned = np.bincount(flat, weights=coo.data.astype(np.float64), minlength=T * n_cols)  # [T*n_cols]
        return binned.reshape(T, n_cols), edges
    dense = np.asarray(matrix, dtype=np.float64)  # [T, E]
    return np.add.reduceat(dense, edges[:-1], axis=1), edges  # [T, n_cols]


def _bars(ax: Any, x: np.ndarray, y: np.ndarray, colors: Any, label: str) -> None:
    if x.size <= BAR_LIMIT:
        ax.bar(x, y, width=0.8, color=colors, label=label)
    else:
        ax.fill_between(np.append(x, x[-1] + 1), np.append(y, y[-1]), step="post", color=BAR, label=label)


def _save(plt: Any, fig: Any, path: Path) -> None:
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)


def plot_load_by_id(plt: Any, title: str, s: Mapping[str, Any], path: Path) -> None:
    """Load / mean per expert in expert-id order, importance / mean beside it, the hottest
    experts in red with their ids, dead experts marked on the axis."""
    basis = s["balance_basis"]
    load = relative(s[basis])  # [E]
    imp = relative(s["importance"])  # [E]
    E = load.size
    x = np.arange(E)
    hot = [h["expert"] for h in s.get("hot_experts", [])]
    colors = np.full(E, BAR, dtype=object)
    colors[hot] = HOT
    with _mpl_errstate():
        fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.6))
        _bars(ax, x, load, list(colors), f"{'load' if basis == 'load' else 'assignments'} / mean")
        if E <= BAR_LIMIT:
            ax.scatter(x, imp, marker="_", s=max(20.0, 4000.0 / E), color=IMPORTANCE, linewidths=2,
                       label="importance / mean", zorder=3)
        else:
            ax.step(x, imp, where="post", color=IMPORTANCE, linewidth=0.7, alpha=0.6, label="importance / mean")
        ax.axhline(1.0, color=EVEN, linestyle="--", linewidth=1, label="even share (1.0)")
        top = float(max(load.max(initial=0.0), imp.max(initial=0.0), 1.0))
        level, prev = 0, None
        for e in sorted(hot):  # neighbouring ids get their labels stacked, not run together
            level = level + 1 if prev is not None and e - prev <= max(1, E // 40) and level < 2 else 0
            ax.annotate(str(e), (e, max(load[e], imp[e])), xytext=(0, 4 + 10 * level), textcoords="offset points",
                        ha="center", fontsize=9, color=HOT, fontweight="bold")
            prev = e
        dead = s["dead_experts"]
        if dead:
            ax.scatter(dead, np.zeros(len(dead)), marker="x", color=DEAD, s=40, zorder=4,
                       label=f"dead ({len(dead)})", clip_on=False)
        ax.set_ylim(0, top * 1.22)
        ax.set_xlim(-0.6, E - 0.4)
        if E <= ID_TICK_LIMIT:
            ax.set_xticks(x)
            ax.tick_params(axis="x", labelsize=8 if E > 32 else 9)
        ax.set_xlabel("expert id")
        ax.set_ylabel("share relative to the mean")
        ax.set_title(f"{title}: load per expert, in expert-id order (the hottest in red)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=9, ncol=4, frameon=False)
        _save(plt, fig, path)


def plot_load_sorted(plt: Any, title: str, s: Mapping[str, Any], path: Path) -> None:
    """Load / mean sorted busiest first (ids on the axis for small E), with the share of all
    load the busiest tenth of the experts carries."""
    basis = s["balance_basis"]
    load = relative(s[basis])  # [E]
    E = load.size
    order = np.lexsort((np.arange(E), -load))  # busiest first, ties: lower id
    ranked = load[order]  # [E]
    total = float(ranked.sum())
    tenth = max(1, E // 10)
    share = float(ranked[:tenth].sum()) / total if total > 0 else 0.0
    x = np.arange(E)
    with _mpl_errstate():
        fig, ax = plt.subplots(figsize=(WIDTH_IN, 3.6))
        _bars(ax, x, ranked, BAR, "load / mean")
        ax.axhline(1.0, color=EVEN, linestyle="--", linewidth=1, label="even share (1.0)")
        if E <= ID_TICK_LIMIT:
            ax.set_xticks(x)
            ax.set_xticklabels([str(e) for e in order.tolist()], fontsize=8 if E > 32 else 9)
            ax.set_xlabel("expert id, busiest first")
        else:
            ax.set_xlabel(f"{E} experts, busiest first")
        ax.set_xlim(-0.6, E - 0.4)
        ax.set_ylabel("share relative to the mean")
        ax.set_title(f"{title}: load sorted — the busiest {tenth} of {E} experts carry {100 * share:.0f}% "
                     f"of it (an even spread: {100 * tenth / E:.0f}%)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=9, ncol=2, frameon=False)
        _save(plt, fig, path)


def plot_heatmap(plt: Any, title: str, matrix: np.ndarray | sp.spmatrix, task_names: list[str], path: Path) -> None:
    """Each task's share of its gate mass per expert (rows sum to 1), experts binned if many."""
    binned, _ = aggregate_expert_columns(matrix)  # [T, n_cols]
    totals = binned.sum(axis=1, keepdims=True)  # [T, 1]
    share = np.divide(binned, totals, out=np.zeros_like(binned), where=totals > 0)  # [T, n_cols]
    T, n_cols = share.shape
    E = matrix.shape[1]
    heading = f"{title}: which experts each task uses (a row is one task's gate mass, summing to 1)"
    xlabel = "expert id"
    if n_cols < E:
        heading += f"\n{E} experts summed into {n_cols} columns of ~{E / n_cols:.0f} consecutive ids"
        xlabel = "expert id bin"
    with _mpl_errstate():
        height = max(3.0, min(10.0, 1.4 + 0.22 * T))
        fig, ax = plt.subplots(figsize=(WIDTH_IN, height))
        vmax = float(share.max()) if share.max() > 0 else 1.0
        im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax)
        fig.colorbar(im, ax=ax, label="share of the task's gate mass", fraction=0.03, pad=0.01)
        ax.set_title(heading, fontsize=11)
        ax.set_xlabel(xlabel)
        if n_cols == E and E <= ID_TICK_LIMIT:
            ax.set_xticks(np.arange(0, E, 1 if E <= 32 else 2))
            ax.tick_params(axis="x", labelsize=9)
        if T <= TASK_TICK_LIMIT:
            ax.set_yticks(np.arange(T))
            ax.set_yticklabels(task_names, fontsize=9)
            ax.set_ylabel("task")
        else:
            ax.set_ylabel(f"{T} tasks, in registry order (see the table)")
        _save(plt, fig, path)


def plot_bins(plt: Any, title: str, label: str, current: Mapping[str, Any], suggested: Mapping[str, Any] | None,
              path: Path) -> None:
    """Load per shard (or device) relative to the mean, for the run's placement and, when
    given, the load-balanced (LPT) one."""
    now = relative(current["bin_load"])  # [S]
    S = now.size
    x = np.arange(S)
    with _mpl_errstate():
        fig, ax = plt.subplots(figsize=(min(WIDTH_IN, 4.0 + 0.5 * S), 3.0))
        width = 0.4 if suggested is not None else 0.8
        ax.bar(x - (width / 2 if suggested is not None else 0), now, width=width, color=BAR,
               label=f"this run's placement (max/mean {current['max_mean_bin_load']:.2f})")
        if suggested is not None:
            ax.bar(x + width / 2, relative(suggested["bin_load"]), width=width, color=EVEN,
                   label=f"load-balanced placement (max/mean {suggested['max_mean_bin_load']:.2f})")
        ax.axhline(1.0, color=IMPORTANCE, linestyle="--", linewidth=1)
        if S <= ID_TICK_LIMIT:
            ax.set_xticks(x)
        ax.set_xlabel(f"{label} id")
        ax.set_ylabel("load relative to the mean")
        ax.set_title(f"{title}: load per {label}")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), fontsize=9, frameon=False)
        _save(plt, fig, path)

"""Profile reports: one JSON file, PNG plots per layer, an HTML page, and a text table.

Why: balance numbers are easiest to trust when they can be re-read (JSON), seen (sorted
per-expert load, task x expert heatmap) and skimmed in a terminal (format_summary).
matplotlib is imported inside write_report only, so importing moe.profiling never
touches a plotting backend.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from moe.profiling.stats import LoadProfile, ModelProfile, encode_matrix

REPORT_FORMAT = "moe.profile_report/1"
MAX_HEATMAP_COLS = 512  # experts are summed into at most this many column bins in heatmaps
_BAR_LIMIT = 256  # above this many experts the sorted load is drawn as a filled step curve
_TICK_LIMIT = 40  # label heatmap rows with task names up to this many tasks


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


def _layers_and_summary(
    profile: ModelProfile | LoadProfile,
) -> tuple[dict[str, LoadProfile], dict[str, Any], bool]:
    if isinstance(profile, ModelProfile):
        return dict(profile.layers), profile.summary(), False
    if isinstance(profile, LoadProfile):
        return {"layer": profile}, profile.summary(), True
    raise TypeError(f"write_report expects a ModelProfile or LoadProfile, got {type(profile).__name__}")


def _file_stems(names: list[str], prefix: str) -> dict[str, str]:
    """Filesystem-safe, distinct stems per layer name."""
    stems: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}"
        stem, i = base, 1
        while stem in used:
            stem, i = f"{base}_{i}", i + 1
        used.add(stem)
        stems[name] = stem
    return stems


def write_report(
    profile: ModelProfile | LoadProfile, out_dir: Path, *, prefix: str = "profile", html_page: bool = True
) -> dict[str, str]:
    """Write <prefix>.json, per-layer load and heatmap PNGs and (optionally) <prefix>.html.

    Returns {kind: path}: "json", "html", and per layer "load:<layer>" / "heatmap:<layer>"
    (just "load" / "heatmap" for a single LoadProfile). The JSON holds the summary and each
    layer's task x expert matrices ("gates", "counts"): dense list-of-lists when the profile
    stores them dense, CSR triplets {indptr, indices, data} when sparse.
    """
    if not isinstance(prefix, str) or not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a non-empty file name without path separators, got {prefix!r}")
    layers, summary, single = _layers_and_summary(profile)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "format": REPORT_FORMAT,
        "summary": summary,
        "matrices": {
            name: {
                "gates": encode_matrix(p.task_expert_matrix("gates")),
                "counts": encode_matrix(p.task_expert_matrix("counts")),
            }
            for name, p in layers.items()
        },
    }
    paths: dict[str, str] = {"json": str(out / f"{prefix}.json")}
    _write_text(Path(paths["json"]), json.dumps(doc, allow_nan=False))

    plt = _pyplot()
    stems = {"layer": prefix} if single else _file_stems(list(layers), prefix)
    layer_summaries = {"layer": summary} if single else summary["layers"]
    for name, p in layers.items():
        suffix = "" if single else f":{name}"
        load_path = out / f"{stems[name]}_load.png"
        heat_path = out / f"{stems[name]}_heatmap.png"
        title = "" if single else name
        _plot_load(plt, title, layer_summaries[name], load_path)
        _plot_heatmap(plt, title, p, heat_path)
        paths[f"load{suffix}"] = str(load_path)
        paths[f"heatmap{suffix}"] = str(heat_path)
    if html_page:
        html_path = out / f"{prefix}.html"
        _write_text(html_path, _html(summary, paths))
        paths["html"] = str(html_path)
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _pyplot() -> Any:
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


def _plot_load(plt: Any, name: str, s: Mapping[str, Any], path: Path) -> None:
    """Per-expert load sorted high to low with its mean, and the histogram of load / mean."""
    values, label = np.asarray(s["load"], dtype=np.float64), "load"  # [E]
    if not np.any(values):
        values, label = np.asarray(s["counts"], dtype=np.float64), "dispatched rows"
    ranked = np.sort(values)[::-1]  # [E]
    mean = float(ranked.mean())
    E = ranked.size
    with _mpl_errstate():
        fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
        try:
            x = np.arange(E)
            if E <= _BAR_LIMIT:
                ax.bar(x, ranked, width=1.0, color="C0")
            else:
                ax.fill_between(x, ranked, step="post", color="C0")
            ax.axhline(mean, color="C3", linestyle="--", label=f"mean {mean:.4g}")
            ax.set_xlabel(f"{E} experts, sorted by {label}")
            ax.set_ylabel(label)
            ax.set_title(
                f"{name + ': ' if name else ''}per-expert {label} "
                f"(cv {s['cv_load']:.3f}, max/mean {s['max_mean_load']:.2f})"
            )
            ax.legend(loc="upper right")
            rel = values / mean if mean > 0 else values  # [E]
            hx.hist(rel, bins=int(min(50, max(10, E // 4))), color="C0")
            if mean > 0:
                hx.axvline(1.0, color="C3", linestyle="--")
            hx.set_xlabel(f"{label} / mean" if mean > 0 else label)
            hx.set_ylabel("experts")
            hx.set_title(f"{len(s['dead_experts'])} dead experts, drop rate {100 * s['drop_rate']:.1f}%")
            fig.tight_layout()
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)


def _plot_heatmap(plt: Any, name: str, p: LoadProfile, path: Path) -> None:
    """Each task's share of its gate mass per expert (rows sum to 1), experts binned if many."""
    binned, edges = aggregate_expert_columns(p.task_expert_matrix("gates"))  # [T, n_cols]
    totals = binned.sum(axis=1, keepdims=True)  # [T, 1]
    share = np.divide(binned, totals, out=np.zeros_like(binned), where=totals > 0)  # [T, n_cols]
    T, n_cols = share.shape
    title = f"{name + ': ' if name else ''}task x expert routing (row-normalised gate mass)"
    xlabel = "expert"
    if n_cols < p.n_experts:
        title += f"\n{p.n_experts} experts aggregated into {n_cols} column bins of ~{p.n_experts / n_cols:.0f}"
        xlabel = "expert bin (contiguous expert ids)"
    with _mpl_errstate():
        fig, ax = plt.subplots(figsize=(11, max(3.0, min(12.0, 1.0 + 0.25 * T))))
        try:
            vmax = float(share.max()) if share.max() > 0 else 1.0
            im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=vmax)
            fig.colorbar(im, ax=ax, label="share of task's gate mass")
            ax.set_title(title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("task")
            if T <= _TICK_LIMIT:
                ax.set_yticks(np.arange(T))
                ax.set_yticklabels(p.task_names)
            fig.tight_layout()
            fig.savefig(path, dpi=100)
        finally:
            plt.close(fig)


def _html(summary: Mapping[str, Any], paths: Mapping[str, str]) -> str:
    """A self-contained page beside the PNGs (images referenced by file name)."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>moe load profile</title>",
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em}"
        "img{max-width:100%;display:block;margin:1em 0}</style></head><body>",
        "<h1>moe load profile</h1>",
        f"<pre>{html.escape(format_summary(summary, max_tasks=None))}</pre>",
    ]
    for kind, path in paths.items():
        if kind.startswith(("load", "heatmap")):
            parts.append(f"<h2>{html.escape(kind)}</h2>")
            parts.append(f"<img src='{html.escape(Path(path).name, quote=True)}' alt='{html.escape(kind, quote=True)}'>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _layer_summaries(summary: Mapping[str, Any]) -> tuple[dict[str, Mapping[str, Any]], Mapping[str, Any] | None]:
    if not isinstance(summary, Mapping):
        raise TypeError(f"format_summary expects a summary dict, got {type(summary).__name__}")
    if "layers" in summary and "headline" in summary:
        return dict(summary["layers"]), summary["headline"]
    if "per_task" in summary and "cv_load" in summary:
        return {"layer": summary}, None
    raise ValueError(
        f"format_summary expects LoadProfile.summary() or ModelProfile.summary(), got keys {sorted(summary)}"
    )


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    for r in rows:
        line.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return line


def format_summary(summary: Mapping[str, Any], *, max_tasks: int | None = 50) -> str:
    """A readable text table of LoadProfile.summary() or ModelProfile.summary() for the CLI.

    Per-task rows show entropy in nats and exp(entropy), the effective number of experts
    a task uses; only the first max_tasks tasks per layer are listed (None: all).
    """
    layers, headline = _layer_summaries(summary)
    out = []
    rows = [
        [name, str(s["n_experts"]), str(s["examples"]), f"{s['cv_importance']:.3f}", f"{s['cv_load']:.3f}",
         f"{s['max_mean_load']:.2f}", f"{100 * s['drop_rate']:.2f}%", str(len(s["dead_experts"]))]
        for name, s in layers.items()
    ]
    out += _table(["layer", "experts", "examples", "cv(importance)", "cv(load)", "max/mean", "dropped", "dead"], rows)
    if headline is not None:
        worst = headline["worst_layer"]
        out.append("")
        out.append(
            f"worst layer: {worst if worst is not None else '-'}  cv(load) {headline['cv_load']:.3f}  "
            f"cv(importance) {headline['cv_importance']:.3f}  max/mean {headline['max_mean_load']:.2f}  "
            f"dropped {100 * headline['drop_rate']:.2f}%  dead experts {headline['dead_experts']}"
        )
    for name, s in layers.items():
        tasks = list(s["per_task"].items())
        shown = tasks if max_tasks is None else tasks[:max_tasks]
        out.append("")
        out.append(f"per-task routing ({name}):")
        rows = [
            [task, str(t["examples"]), f"{t['entropy']:.3f}", f"{math.exp(t['entropy']):.1f}",
             ", ".join(str(e) for e in t["top_experts"]) or "-"]
            for task, t in shown
        ]
        out += _table(["task", "examples", "entropy(nats)", "eff.experts", "top experts"], rows)
        if len(shown) < len(tasks):
            out.append(f"... {len(tasks) - len(shown)} more tasks")
    return "\n".join(out) + "\n"

"""Profile reports: one JSON file, a per-task CSV, PNG plots per layer, an HTML page, a text table.

Why: balance numbers are easiest to trust when they can be re-read (JSON, CSV), seen
(per-expert load by id and sorted, the task x expert heatmap, load per shard) and skimmed
in a terminal (format_summary). Every output says which split was routed and whether the
gate noise was on, because the same checkpoint gives quite different figures either way.
The page and the pictures are drawn from the JSON document alone (moe.profiling.page), so
fields added to a summary later appear without changes here. matplotlib is imported
inside write_report only, so importing moe.profiling never touches a plotting backend.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe.profiling import plots
from moe.profiling.placement import lpt_placement, placement_stats
from moe.profiling.plots import MAX_HEATMAP_COLS, aggregate_expert_columns
from moe.profiling.stats import LoadProfile, ModelProfile, encode_matrix

REPORT_FORMAT = "moe.profile_report/1"
__all__ = ["MAX_HEATMAP_COLS", "REPORT_FORMAT", "aggregate_expert_columns", "format_summary", "write_report"]

# Per-layer summary keys the page and the text table show in their own places; any other
# scalar a layer summary holds is listed under "other figures".
KNOWN_LAYER_KEYS = frozenset({
    "n_experts", "n_tasks", "examples", "assignments", "dropped", "counts", "importance", "load",
    "cv_importance", "cv_load", "max_mean_load", "balance_basis", "drop_rate", "dead_experts",
    "hot_experts", "drops_by_capacity", "per_task",
})
KNOWN_TASK_KEYS = ("examples", "share", "entropy", "top_experts", "top_shares")


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


def layer_summaries(summary: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """{layer name: LoadProfile summary} of a ModelProfile or LoadProfile summary."""
    if not isinstance(summary, Mapping):
        raise TypeError(f"format_summary expects a summary dict, got {type(summary).__name__}")
    if "layers" in summary and "headline" in summary:
        return dict(summary["layers"])
    if "per_task" in summary and "cv_load" in summary:
        return {"layer": summary}
    raise ValueError(
        f"format_summary expects LoadProfile.summary() or ModelProfile.summary(), got keys {sorted(summary)}"
    )


def placement_section(
    layers: Mapping[str, Mapping[str, Any]], assignment: Sequence[int], *, label: str = "shard", source: str = ""
) -> dict[str, Any]:
    """Load per bin (shard or device) of each layer under `assignment` (bin of each expert),
    next to what a load-balanced (LPT) placement of the same experts would give."""
    a = np.asarray(assignment, dtype=np.int64)  # [E]
    n_bins = int(a.max()) + 1
    out: dict[str, Any] = {"label": label, "source": source, "n_bins": n_bins, "assignment": a.tolist(),
                           "layers": {}}
    for name, s in layers.items():
        basis = np.asarray(s[s["balance_basis"]], dtype=np.float64)  # [E]
        if basis.shape != a.shape:
            raise ValueError(f"the placement places {a.size} experts, layer {name!r} has {basis.size}")
        current = placement_stats(basis, a, n_bins)
        suggested = None
        if basis.any():
            lpt = lpt_placement(basis, n_bins, capacity=math.ceil(basis.size / n_bins))
            suggested = placement_stats(basis, lpt, n_bins)
        out["layers"][name] = {"current": current, "balanced": suggested}
    return out


def write_report(
    profile: ModelProfile | LoadProfile,
    out_dir: Path,
    *,
    prefix: str = "profile",
    html_page: bool = True,
    placement: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Write <prefix>.json, <prefix>_tasks.csv, per-layer PNGs and (optionally) <prefix>.html.

    Returns {kind: path}: "json", "csv", "html", and per layer "load:<layer>" (expert-id
    order), "sorted:<layer>", "heatmap:<layer>" and, with a placement, "bins:<layer>" (just
    "load", "sorted", ... for a single LoadProfile). The JSON holds the context (split,
    noise, batching), the summary, each layer's task x expert matrices ("gates", "counts":
    dense list-of-lists, or CSR triplets {indptr, indices, data} when the profile is
    sparse) and, with a placement {"assignment": bin per expert, "label", "source"}, the
    load per bin. The CSV holds every task of every layer (the page may show only some).
    """
    if not isinstance(prefix, str) or not prefix or "/" in prefix or os.sep in prefix:
        raise ValueError(f"prefix must be a non-empty file name without path separators, got {prefix!r}")
    layers, summary, single = _layers_and_summary(profile)
    per_layer = {"layer": summary} if single else summary["layers"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "format": REPORT_FORMAT,
        "context": summary.get("context", {}),
        "summary": summary,
        "matrices": {
            name: {
                "gates": encode_matrix(p.task_expert_matrix("gates")),
                "counts": encode_matrix(p.task_expert_matrix("counts")),
            }
            for name, p in layers.items()
        },
        "placement": None if placement is None else placement_section(
            per_layer, placement["assignment"], label=placement.get("label", "shard"),
            source=placement.get("source", "")),
    }
    paths: dict[str, str] = {"json": str(out / f"{prefix}.json"), "csv": str(out / f"{prefix}_tasks.csv")}
    _write_text(Path(paths["json"]), json.dumps(doc, allow_nan=False))
    _write_text(Path(paths["csv"]), tasks_csv(per_layer))

    plt = plots.pyplot()
    stems = {"layer": prefix} if single else _file_stems(list(layers), prefix)
    for name, p in layers.items():
        suffix = "" if single else f":{name}"
        s = per_layer[name]
        title = layer_title(name)
        drawn = {
            "load": lambda path, s=s, t=title: plots.plot_load_by_id(plt, t, s, path),
            "sorted": lambda path, s=s, t=title: plots.plot_load_sorted(plt, t, s, path),
            "heatmap": lambda path, p=p, t=title: plots.plot_heatmap(plt, t, p.task_expert_matrix("gates"),
                                                                     list(p.task_names), path),
        }
        if doc["placement"] is not None:
            bins = doc["placement"]["layers"][name]
            drawn["bins"] = lambda path, b=bins, t=title: plots.plot_bins(
                plt, t, doc["placement"]["label"], b["current"], b["balanced"], path)
        for kind, draw in drawn.items():
            path = out / f"{stems[name]}_{kind}.png"
            draw(path)
            paths[f"{kind}{suffix}"] = str(path)
    if html_page:
        from moe.profiling.page import render_page

        html_path = out / f"{prefix}.html"
        images = {kind: Path(p).name for kind, p in paths.items() if p.endswith(".png")}
        _write_text(html_path, render_page(doc, images, csv_name=Path(paths["csv"]).name,
                                           json_name=Path(paths["json"]).name, single=single))
        paths["html"] = str(html_path)
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- shared wording
def layer_title(name: str) -> str:
    """'block0' -> 'MoE block 0'; other names as they are."""
    m = re.fullmatch(r"block(\d+)", name)
    return f"MoE block {m.group(1)}" if m else name


def routing_words(context: Mapping[str, Any]) -> str:
    """How the figures were measured, in a few words: 'train split, gate noise on'."""
    if not context:
        return "split and gate noise not recorded"
    noise = "gate noise on" if context.get("noise") else "no gate noise"
    words = f"{context.get('split', '?')} split, {noise}"
    if context.get("routing") not in (None, "", "top-k", "topk"):
        words += f", {context['routing']} routing"
        if context.get("balance_factor") is not None:
            words += f" (factor {context['balance_factor']:g})"
    return words


def id_ranges(ids: Sequence[int], limit: int = 40) -> str:
    """[3, 17, 18, 19, 40] -> '3, 17-19, 40' (at most `limit` items, then '... (N in all)')."""
    if not ids:
        return "none"
    parts: list[str] = []
    start = prev = int(ids[0])
    for e in [*map(int, ids[1:]), None]:
        if e is not None and e == prev + 1:
            prev = e
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if e is not None:
            start = prev = e
    text = ", ".join(parts[:limit])
    return text + (f", ... ({len(ids)} in all)" if len(parts) > limit else "")


def top_experts_text(t: Mapping[str, Any], n: int = 5) -> str:
    """'12 (41%), 3 (22%)' from a per-task summary's top_experts and top_shares."""
    experts = list(t.get("top_experts", []))[:n]
    shares = list(t.get("top_shares", []))
    if not experts:
        return "-"
    if len(shares) < len(experts):
        return ", ".join(map(str, experts))
    return ", ".join(f"{e} ({100 * v:.0f}%)" for e, v in zip(experts, shares, strict=False))


def hot_text(h: Mapping[str, Any]) -> str:
    """'expert 12: 2.3x mean (digits 41%, wine 20%)'."""
    tasks = ", ".join(f"{name} {100 * share:.0f}%" for name, share in h.get("tasks", []))
    return f"expert {h['expert']}: {h['over_mean']:.2f}x mean" + (f" ({tasks})" if tasks else "")


def extra_scalars(mapping: Mapping[str, Any], known: frozenset[str] | Sequence[str]) -> dict[str, Any]:
    """The scalar (number, str, bool) entries of a summary that no fixed place shows."""
    return {k: v for k, v in mapping.items() if k not in known and isinstance(v, int | float | str | bool)}


def task_columns(layers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Extra per-task scalar keys (beyond KNOWN_TASK_KEYS), in first-seen order."""
    seen: dict[str, None] = {}
    for s in layers.values():
        for t in s["per_task"].values():
            for k in extra_scalars(t, KNOWN_TASK_KEYS):
                seen.setdefault(k, None)
    return list(seen)


def tasks_csv(layers: Mapping[str, Mapping[str, Any]]) -> str:
    """Every task of every layer, one row each, with every per-task figure."""
    extra = task_columns(layers)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "task", "examples", "share_of_gate_mass", "entropy_nats", "effective_experts",
                "top_experts", "top_shares", *extra])
    for name, s in layers.items():
        for task, t in s["per_task"].items():
            w.writerow([name, task, t["examples"], f"{t.get('share', 0.0):.6g}", f"{t['entropy']:.6g}",
                        f"{math.exp(t['entropy']):.6g}", " ".join(map(str, t["top_experts"])),
                        " ".join(f"{v:.4g}" for v in t.get("top_shares", [])),
                        *(t.get(k, "") for k in extra)])
    return buf.getvalue()


# ----------------------------------------------------------------------------- text
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))]
    for r in rows:
        line.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    return line


def format_summary(summary: Mapping[str, Any], *, max_tasks: int | None = 50) -> str:
    """A readable text table of LoadProfile.summary() or ModelProfile.summary() for the CLI.

    Opens with how the decisions were made (split, gate noise); per layer the balance
    figures, the hottest and the dead experts by id and the drops at other capacity
    factors; per task the entropy in nats and exp(entropy), the effective number of experts
    a task uses, its share of the gate mass and its top experts. Only the first max_tasks
    tasks per layer are listed (None: all).
    """
    layers = layer_summaries(summary)
    headline = summary.get("headline")
    context = summary.get("context", {})
    out = [f"routing measured on: {routing_words(context)}"
           + (f"; {context['examples']:,} examples of {context['tasks']} tasks" if "examples" in context else "")]
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
        out.append("")
        out.append(f"{name}: hottest " + "; ".join(hot_text(h) for h in s.get("hot_experts", [])[:3])
                   if s.get("hot_experts") else f"{name}: nothing routed")
        out.append(f"{name}: dead experts: {id_ranges(s['dead_experts'])}")
        drops = s.get("drops_by_capacity")
        if drops:
            out.append(f"{name}: would drop at capacity factor " + ", ".join(
                f"{d['capacity_factor']:g}: {100 * d['drop_rate']:.1f}%" for d in drops))
        tasks = list(s["per_task"].items())
        shown = tasks if max_tasks is None else tasks[:max_tasks]
        out.append("")
        out.append(f"per-task routing ({name}):")
        rows = [
            [task, str(t["examples"]), f"{100 * t.get('share', 0.0):.1f}%", f"{t['entropy']:.3f}",
             f"{math.exp(t['entropy']):.1f}", top_experts_text(t, 3)]
            for task, t in shown
        ]
        out += _table(["task", "examples", "share", "entropy(nats)", "eff.experts", "top experts (share)"], rows)
        if len(shown) < len(tasks):
            out.append(f"... {len(tasks) - len(shown)} more tasks (all of them in the CSV and JSON)")
    return "\n".join(out) + "\n"

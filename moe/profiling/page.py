"""The profile's HTML page, rendered from the report's JSON document and its picture names.

Why a page of its own: the figures only mean something with their legend (what importance
and load are, which split was routed, whether the gate noise was on), the experts have to
be named (which one is hot, which are dead), and hundreds of tasks need a table one can
sort rather than a wall of text. The page is one self-contained file beside the PNGs;
every field a summary gains later shows up under "other figures" or as a table column.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

from moe.profiling.report import (
    KNOWN_LAYER_KEYS,
    extra_scalars,
    id_ranges,
    layer_summaries,
    layer_title,
    routing_words,
    task_columns,
    top_experts_text,
)

MAX_PAGE_TASKS = 1000  # rows per task table on the page; the CSV and JSON hold every task

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1240px;margin:0 auto;padding:1.5em 2em 4em;background:#fff}
h1{margin:.2em 0 .1em;font-size:1.7em} h2{margin-top:2em;border-bottom:2px solid #ddd;padding-bottom:.2em}
h3{margin:1.4em 0 .4em;font-size:1.1em}
.context{background:#eef4fb;border-left:4px solid #1f77b4;padding:.7em 1em;margin:1em 0;line-height:1.5}
.note{color:#555;font-size:.92em;margin:.3em 0 .8em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{padding:.28em .7em;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
th{background:#f2f2f2;position:sticky;top:0} td:first-child,th:first-child{text-align:left}
td.wide,th.wide{text-align:left;white-space:normal}
table.sortable th{cursor:pointer} table.sortable th:hover{background:#e2e2e2}
.scroll{max-height:560px;overflow:auto;border:1px solid #e4e4e4;display:inline-block;max-width:100%}
img{max-width:100%;display:block;margin:.6em 0 1.2em;border:1px solid #eee}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.35em 1.2em;margin:.6em 0}
dt{font-weight:600} dd{margin:0}
.hot{color:#d62728;font-weight:600} .facts{line-height:1.7}
details{margin:1em 0} summary{cursor:pointer;font-weight:600;font-size:1.05em}
nav a{margin-right:1em}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable').forEach(function(table){
  table.querySelectorAll('th').forEach(function(th, col){
    th.title = 'click to sort';
    th.addEventListener('click', function(){
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var up = th.dataset.up !== '1'; th.dataset.up = up ? '1' : '0';
      rows.sort(function(a, b){
        var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
        var c = (x !== undefined && y !== undefined) ? parseFloat(x) - parseFloat(y)
              : a.cells[col].textContent.localeCompare(b.cells[col].textContent);
        return up ? c : -c;
      });
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
});
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float, text: str) -> str:
    return f"<td data-v='{value!r}'>{_e(text)}</td>"


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:.4g}"


def _context_html(ctx: Mapping[str, Any]) -> str:
    if not ctx:
        return ("<div class='context'>How these decisions were made (split, gate noise) was not recorded "
                "with this profile.</div>")
    bits = [f"Routed: <b>the {_e(ctx.get('split', '?'))} split</b>"]
    if "examples" in ctx:
        bits[0] += f" ({ctx['examples']:,} examples of {ctx.get('tasks', '?')} tasks)"
    if ctx.get("noise"):
        seed = ctx.get("noise_seed")
        bits.append(f"<b>gate noise on</b> (as in training{'' if seed is None else f', seed {seed}'}): load is "
                    "the smooth estimator the balance loss sees")
    else:
        bits.append("<b>no gate noise</b> (as at inference): load is the number of assignments")
    if ctx.get("routing") not in (None, "", "top-k"):
        bits.append(f"<b>{_e(ctx['routing'])} routing</b>")
    if "batch_size" in ctx:
        mixed = " mixing the tasks in proportion to their size" if ctx.get("batching") == "mixed" else ""
        bits.append(f"batches of {ctx['batch_size']}{mixed}")
    if "gates" in ctx:
        gates = sorted(set(ctx["gates"]))
        cf = ctx.get("capacity_factor")
        bits.append(f"gate {_e(', '.join(gates))}, k = {_e(ctx.get('k', '?'))}, "
                    + ("dropless" if cf is None else f"capacity factor {_e(cf)}"))
    for key in ("checkpoint", "step"):
        if key in ctx:
            bits.append(f"{key} {_e(ctx[key])}")
    return "<div class='context'>" + " · ".join(bits) + "</div>"


def _legend(ctx: Mapping[str, Any]) -> str:
    noise = ctx.get("noise")
    items = [
        ("importance", "for each expert, the sum over examples of the gate value it was given: how much of the "
                       "output it is responsible for (Shazeer et al. 2017)."),
        ("load", "for each expert, how many examples it is expected to receive. With gate noise it is Shazeer's "
                 "smooth estimator, the sum over examples of the probability that the expert is among the k "
                 "chosen under a fresh noise draw (what the load loss balances); without noise it is the "
                 "number of assignments the gate made to it (before any capacity limit)."),
        ("CV", "coefficient of variation over the experts, std / mean with the population std: 0 is a perfectly "
               "even spread. The balance losses are w · CV²."),
        ("max/mean", "the busiest expert's load over the mean load: 1.0 is even. With a capacity factor cf each "
                     "expert takes at most about cf × the mean per batch, so a max/mean above cf means drops."),
        ("dropped", "assignments cut because an expert's capacity C = ceil(cf · B · k / E) rows per batch was "
                    "full; they contribute nothing to the output."),
        ("dead", "experts that no example was routed to (no rows and zero importance)."),
        ("entropy", "of a task's gate mass over the experts, in nats; exp(entropy) is the effective number of "
                    "experts the task uses."),
        ("share", "a task's share of all gate mass of the block (roughly its share of the examples); for a top "
                  "expert, the share of that task's gate mass it receives; for a hot expert, the share of its "
                  "assignments each task makes."),
    ]
    why = ("Training-time figures (gate noise on, train split) are usually more even than inference-time ones "
           "(no noise, test split): the noise spreads ties and the smooth estimator averages probabilities. "
           "`moe eval` reports the test split without noise; `moe profile --no-noise --split test` draws this "
           "page for it." if noise else
           "These are inference-time figures (no gate noise). `moe train` also reports the training-time "
           "figures (train split, noise on, what the balance losses see), which are usually more even.")
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items)
    return (f"<details open><summary>What the figures mean</summary><dl>{rows}</dl>"
            f"<p class='note'>{_e(why)}</p></details>")


def _overview(layers: Mapping[str, Mapping[str, Any]]) -> str:
    head = ("<tr><th>block</th><th>experts</th><th>examples</th><th>CV(importance)</th><th>CV(load)</th>"
            "<th>max/mean load</th><th>dropped</th><th>dead experts</th><th>hottest expert</th></tr>")
    rows = []
    for name, s in layers.items():
        hot = s.get("hot_experts") or []
        hottest = f"expert {hot[0]['expert']} ({hot[0]['over_mean']:.2f}× mean)" if hot else "-"
        rows.append(
            f"<tr><td><a href='#{_e(name)}'>{_e(layer_title(name))}</a></td><td>{s['n_experts']:,}</td>"
            f"<td>{s['examples']:,}</td><td>{s['cv_importance']:.3f}</td><td>{s['cv_load']:.3f}</td>"
            f"<td>{s['max_mean_load']:.2f}</td><td>{100 * s['drop_rate']:.2f}%</td>"
            f"<td>{len(s['dead_experts'])}</td><td class='hot'>{_e(hottest)}</td></tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _hot_table(s: Mapping[str, Any]) -> str:
    hot = s.get("hot_experts") or []
    if not hot:
        return "<p class='note'>Nothing was routed.</p>"
    imp = s["importance"]
    mean_imp = sum(imp) / len(imp) if imp else 0.0
    rows = "".join(
        f"<tr><td class='hot'>{h['expert']}</td><td>{h['over_mean']:.2f}</td>"
        f"<td>{(imp[h['expert']] / mean_imp if mean_imp > 0 else 0.0):.2f}</td>"
        f"<td class='wide'>{_e(', '.join(f'{n} {100 * v:.0f}%' for n, v in h['tasks']) or '-')}</td></tr>"
        for h in hot)
    return ("<h3>Hottest experts</h3><table><thead><tr><th>expert</th><th>load / mean</th>"
            "<th>importance / mean</th><th class='wide'>tasks making most of its assignments</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _drops_table(s: Mapping[str, Any], ctx: Mapping[str, Any]) -> str:
    drops = s.get("drops_by_capacity")
    if not drops:
        return ""
    B, k, E = ctx.get("batch_size"), ctx.get("k"), s["n_experts"]
    rows = []
    for d in drops:
        cap = math.ceil(d["capacity_factor"] * B * k / E) if isinstance(B, int) and isinstance(k, int) else None
        rows.append(f"<tr><td>{d['capacity_factor']:g}</td><td>{'-' if cap is None else cap}</td>"
                    f"<td>{d['dropped']:,}</td><td>{100 * d['drop_rate']:.2f}%</td></tr>")
    batch = f" of {B}" if isinstance(B, int) else ""
    return ("<h3>Drops per capacity factor</h3><p class='note'>What the same routing decisions would drop "
            f"if each expert took at most C rows per batch{batch} (dropless models included).</p>"
            "<table><thead><tr><th>capacity factor</th><th>C (rows per expert per batch)</th>"
            f"<th>assignments dropped</th><th>drop rate</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _bins_table(placement: Mapping[str, Any], name: str) -> str:
    layer = placement["layers"][name]
    cur, best = layer["current"], layer["balanced"]
    label = placement["label"]
    mean = cur["mean_bin_load"]
    head = f"<tr><th>{_e(label)}</th><th>experts</th><th>load</th><th>load / mean</th></tr>"
    rows = "".join(
        f"<tr><td>{b}</td><td>{n}</td><td>{v:.4g}</td><td>{(v / mean if mean > 0 else 0.0):.2f}</td></tr>"
        for b, (n, v) in enumerate(zip(cur["bin_experts"], cur["bin_load"], strict=True)))
    lpt = ("" if best is None else f" A load-balanced (LPT) placement of the same experts would give max/mean "
           f"{best['max_mean_bin_load']:.2f}.")
    src = f" ({_e(placement['source'])})" if placement.get("source") else ""
    return (f"<h3>Load per {_e(label)}</h3><p class='note'>The run's placement{src}: max/mean "
            f"{cur['max_mean_bin_load']:.2f} over {cur['n_bins']} {_e(label)}s.{_e(lpt)}</p>"
            f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>")


def _task_table(s: Mapping[str, Any], extra: list[str]) -> str:
    tasks = list(s["per_task"].items())
    note = f"{len(tasks)} tasks; click a column to sort."
    if len(tasks) > MAX_PAGE_TASKS:
        tasks = sorted(tasks, key=lambda kv: -kv[1]["examples"])[:MAX_PAGE_TASKS]
        note = (f"The {MAX_PAGE_TASKS} tasks with the most examples of {len(s['per_task'])}; the CSV and the "
                "JSON hold every task. Click a column to sort.")
    head = ("<tr><th>task</th><th>examples</th><th>share</th><th>entropy (nats)</th><th>effective experts</th>"
            "<th class='wide'>top experts (share of the task's gate mass)</th>"
            + "".join(f"<th>{_e(c)}</th>" for c in extra) + "</tr>")
    rows = []
    for task, t in tasks:
        cells = [f"<td>{_e(task)}</td>", _num(t["examples"], f"{t['examples']:,}"),
                 _num(t.get("share", 0.0), f"{100 * t.get('share', 0.0):.1f}%"),
                 _num(t["entropy"], f"{t['entropy']:.3f}"),
                 _num(math.exp(t["entropy"]), f"{math.exp(t['entropy']):.1f}"),
                 f"<td class='wide'>{_e(top_experts_text(t))}</td>"]
        for c in extra:
            v = t.get(c, "")
            cells.append(_num(float(v), _fmt(v)) if isinstance(v, int | float) and not isinstance(v, bool)
                         else f"<td>{_e(v)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return (f"<h3>Per-task routing</h3><p class='note'>{_e(note)}</p><div class='scroll'>"
            f"<table class='sortable'><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>")


def _others(s: Mapping[str, Any]) -> str:
    extra = extra_scalars(s, KNOWN_LAYER_KEYS)
    if not extra:
        return ""
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in extra.items())
    return f"<h3>Other figures</h3><table><tbody>{rows}</tbody></table>"


def _img(images: Mapping[str, str], kind: str, alt: str) -> str:
    name = images.get(kind)
    return "" if name is None else f"<img src='{_e(name)}' alt='{_e(alt)}'>"


def render_page(doc: Mapping[str, Any], images: Mapping[str, str], *, csv_name: str, json_name: str,
                single: bool = False) -> str:
    """The whole page. images maps a report kind ("load:block0", or "load" for a single
    layer) to the picture's file name beside the page."""
    summary = doc["summary"]
    ctx = doc.get("context") or {}
    layers = layer_summaries(summary)
    placement = doc.get("placement")
    extra_cols = task_columns(layers)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>moe load balance ({_e(routing_words(ctx))})</title><style>{_STYLE}</style></head><body><main>",
        "<h1>Expert load balance</h1>",
        _context_html(ctx),
        _overview(layers),
        f"<p class='note'>Data: <a href='{_e(json_name)}'>{_e(json_name)}</a> (everything on this page) · "
        f"<a href='{_e(csv_name)}'>{_e(csv_name)}</a> (every task of every block).</p>",
        _legend(ctx),
    ]
    if len(layers) > 1:
        parts.append("<nav>" + "".join(f"<a href='#{_e(n)}'>{_e(layer_title(n))}</a>" for n in layers) + "</nav>")
    for name, s in layers.items():
        key = "" if single else f":{name}"
        title = layer_title(name)
        parts += [
            f"<h2 id='{_e(name)}'>{_e(title)} — {s['n_experts']:,} experts</h2>",
            "<p class='facts'>",
            f"Dead experts ({len(s['dead_experts'])}): {_e(id_ranges(s['dead_experts']))}<br>",
            f"CV(importance) {s['cv_importance']:.3f} · CV(load) {s['cv_load']:.3f} · max/mean load "
            f"{s['max_mean_load']:.2f} · dropped {100 * s['drop_rate']:.2f}% of {s['assignments']:,} assignments",
            "</p>",
            _hot_table(s),
            _img(images, f"load{key}", f"{title}: load and importance per expert in expert-id order"),
            _img(images, f"sorted{key}", f"{title}: load per expert, sorted"),
            _drops_table(s, ctx),
        ]
        if placement is not None:
            parts += [_bins_table(placement, name), _img(images, f"bins{key}", f"{title}: load per bin")]
        parts += [_others(s), "<h3>Tasks and experts</h3>",
                  _img(images, f"heatmap{key}", f"{title}: task x expert routing"),
                  _task_table(s, extra_cols)]
    parts += [f"<script>{_SORT_JS}</script>", "</main></body></html>"]
    return "\n".join(p for p in parts if p) + "\n"


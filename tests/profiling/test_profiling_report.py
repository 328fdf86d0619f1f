"""Reports: the files exist, PNGs are PNGs, the JSON re-reads to the summary and matrices, the
page shows what the JSON holds (and every picture it references exists)."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from moe.profiling import LoadProfile, ModelProfile, format_summary, placement_stats, write_report
from moe.profiling.page import MAX_PAGE_TASKS, render_page
from moe.profiling.report import aggregate_expert_columns, id_ranges
from moe.profiling.stats import decode_matrix

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


CONTEXT = {"split": "val", "noise": False, "noise_seed": None, "batch_size": 40, "k": 2}


class Page(HTMLParser):
    """The page's pictures, table cells and text."""

    def __init__(self) -> None:
        super().__init__()
        self.src: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.src.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(Path(path).read_text())
    return page


def _model(make_routing):
    rng = np.random.default_rng(0)
    m = ModelProfile(3, ["wine", "iris", "digits"], sparse_threshold=512, context=CONTEXT)
    for _ in range(3):
        for name, E in (("block0", 16), ("block/1", 600)):  # block/1: sparse, binned heatmap, odd name
            B = 40
            m.add(name, make_routing(rng, B, E, 2), rng.integers(0, 3, size=B))
    return m


def test_write_report_for_a_model(tmp_path, make_routing):
    m = _model(make_routing)
    paths = write_report(m, tmp_path / "out")
    assert set(paths) == {"json", "csv", "html"} | {f"{k}:{b}" for k in ("load", "sorted", "heatmap")
                                                    for b in ("block0", "block/1")}
    for kind, path in paths.items():
        p = Path(path)
        assert p.is_file() and p.parent == tmp_path / "out", kind
        if kind.startswith(("load", "heatmap")):
            assert p.read_bytes()[:8] == PNG_MAGIC, kind
    assert Path(paths["json"]).name == "profile.json"
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["format"] == "moe.profile_report/1"
    assert doc["summary"] == json.loads(json.dumps(m.summary()))
    assert doc["context"] == CONTEXT and doc["placement"] is None
    assert doc["matrices"]["block0"]["gates"]["layout"] == "dense"
    assert doc["matrices"]["block/1"]["gates"]["layout"] == "csr"
    assert set(doc["matrices"]["block/1"]["gates"]) >= {"indptr", "indices", "data"}
    for name, layer in m.layers.items():
        for kind, dtype in (("gates", np.float64), ("counts", np.int64)):
            got = decode_matrix(doc["matrices"][name][kind], (3, layer.n_experts), dtype)
            want = layer.task_expert_matrix(kind)
            got = got.toarray() if sp.issparse(got) else got
            np.testing.assert_array_equal(got, want.toarray() if sp.issparse(want) else want)
    page = read_page(paths["html"])
    pictures = {Path(p).name for k, p in paths.items() if p.endswith(".png")}
    assert set(page.src) == pictures  # every picture shown, and each exists (checked above)
    for src in page.src:
        assert (Path(paths["html"]).parent / src).is_file()
    assert "/" not in Path(paths["load:block/1"]).name


def test_write_report_for_one_layer_with_prefix(tmp_path, make_routing):
    rng = np.random.default_rng(1)
    p = LoadProfile(8, 2)
    p.add(make_routing(rng, 20, 8, 2), rng.integers(0, 2, size=20))
    paths = write_report(p, tmp_path, prefix="run7", html_page=False)
    assert set(paths) == {"json", "csv", "load", "sorted", "heatmap"}
    assert sorted(Path(v).name for v in paths.values()) == [
        "run7.json", "run7_heatmap.png", "run7_load.png", "run7_sorted.png", "run7_tasks.csv"]
    assert json.loads(Path(paths["json"]).read_text())["summary"] == json.loads(json.dumps(p.summary()))
    assert Path(paths["load"]).read_bytes()[:8] == PNG_MAGIC


def test_write_report_of_an_empty_profile(tmp_path):
    paths = write_report(LoadProfile(300, 2), tmp_path)  # nothing routed: all-zero plots still render
    assert Path(paths["heatmap"]).read_bytes()[:8] == PNG_MAGIC
    text = " ".join(read_page(paths["html"]).text)
    assert "Nothing was routed." in text and "not recorded" in text  # no context: said so


def test_write_report_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="ModelProfile or LoadProfile, got dict"):
        write_report({}, tmp_path)
    with pytest.raises(ValueError, match="prefix"):
        write_report(LoadProfile(4, 1), tmp_path, prefix="../x")


@pytest.mark.parametrize("as_sparse", [False, True])
def test_aggregate_expert_columns_against_a_loop(as_sparse):
    rng = np.random.default_rng(2)
    T, E = 5, 1300
    mat = rng.random((T, E)) * (rng.random((T, E)) < 0.05)
    binned, edges = aggregate_expert_columns(sp.csr_matrix(mat) if as_sparse else mat, max_cols=512)
    assert binned.shape == (T, 512) and edges[0] == 0 and edges[-1] == E
    widths = np.diff(edges)
    assert widths.min() >= 2 and widths.max() - widths.min() <= 1  # balanced, no empty bin
    want = np.zeros((T, 512))
    for t in range(T):
        for e in range(E):
            b = next(i for i in range(512) if edges[i] <= e < edges[i + 1])
            want[t, b] += mat[t, e]
    np.testing.assert_allclose(binned, want, rtol=1e-12, atol=1e-15)
    small, small_edges = aggregate_expert_columns(mat[:, :100])
    np.testing.assert_array_equal(small, mat[:, :100])  # E <= 512: one expert per column
    np.testing.assert_array_equal(small_edges, np.arange(101))


def test_format_summary_tables(make_routing):
    m = _model(make_routing)
    s = m.summary()
    text = format_summary(s)
    for name in ("block0", "block/1", "wine", "iris", "digits", "worst layer"):
        assert name in text
    cv0 = s["layers"]["block0"]["cv_load"]
    assert f"{cv0:.3f}" in text
    wine = s["layers"]["block0"]["per_task"]["wine"]
    top = ", ".join(f"{e} ({100 * v:.0f}%)" for e, v in zip(wine["top_experts"][:3], wine["top_shares"], strict=False))
    assert top in text
    assert text.startswith("routing measured on: val split, no gate noise\n")
    hot = s["layers"]["block0"]["hot_experts"][0]
    assert f"block0: hottest expert {hot['expert']}: {hot['over_mean']:.2f}x mean" in text
    assert f"block0: dead experts: {id_ranges(s['layers']['block0']['dead_experts'])}" in text
    one = format_summary(s["layers"]["block0"], max_tasks=1)
    rows = [line.split()[0] for line in one.splitlines() if line.strip()]
    assert "wine" in rows and "digits" not in rows and "... 2 more tasks" in one
    assert one.startswith("routing measured on: split and gate noise not recorded")
    with pytest.raises(ValueError, match="expects LoadProfile.summary"):
        format_summary({"x": 1})
    with pytest.raises(TypeError, match="summary dict"):
        format_summary([1])


def test_importing_profiling_does_not_import_matplotlib():
    code = "import sys, moe.profiling; print('matplotlib' in sys.modules)"
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": str(root)}, timeout=60, check=True)
    assert out.stdout.strip() == "False"


def test_id_ranges():
    assert id_ranges([]) == "none"
    assert id_ranges([3, 17, 18, 19, 40]) == "3, 17-19, 40"
    assert id_ranges([0, 1]) == "0-1"
    assert id_ranges(list(range(0, 200, 2)), limit=3) == "0, 2, 4, ... (100 in all)"


def test_page_names_the_experts_and_shows_the_legend_and_context(tmp_path, make_routing):
    m = _model(make_routing)
    s = m.summary()["layers"]["block0"]
    paths = write_report(m, tmp_path)
    text = " ".join(read_page(paths["html"]).text)
    for words in ("the val split", "no gate noise", "What the figures mean", "importance", "CV", "max/mean",
                  "Hottest experts", "Drops per capacity factor", "Per-task routing"):
        assert words in text, words
    assert f"Dead experts ({len(s['dead_experts'])}): {id_ranges(s['dead_experts'])}" in text
    for h in s["hot_experts"]:
        assert f"{h['over_mean']:.2f}" in text
    for d in s["drops_by_capacity"]:  # C per batch of the context's 40 examples, k = 2
        assert f"{100 * d['drop_rate']:.2f}%" in text
    assert str(math.ceil(1.25 * 40 * 2 / 16)) in text


def test_tasks_csv_holds_every_task_of_every_layer(tmp_path, make_routing):
    m = _model(make_routing)
    paths = write_report(m, tmp_path)
    rows = list(csv.DictReader(Path(paths["csv"]).open()))
    assert [(r["layer"], r["task"]) for r in rows] == [(b, t) for b in ("block0", "block/1")
                                                      for t in ("wine", "iris", "digits")]
    s = m.summary()["layers"]["block0"]["per_task"]["iris"]
    r = rows[1]
    assert int(r["examples"]) == s["examples"]
    assert float(r["entropy_nats"]) == pytest.approx(s["entropy"], rel=1e-5)
    assert [int(e) for e in r["top_experts"].split()] == s["top_experts"]


def test_load_per_shard_matches_placement_stats(tmp_path, make_routing):
    m = _model(make_routing)
    rng = np.random.default_rng(5)
    m2 = ModelProfile(3, ["wine", "iris", "digits"], context=CONTEXT)
    for _ in range(3):
        m2.add("block0", make_routing(rng, 40, 16, 2), rng.integers(0, 3, size=40))
    assignment = [e % 4 for e in range(16)]
    paths = write_report(m2, tmp_path, placement={"assignment": assignment, "label": "device", "source": "test"})
    doc = json.loads(Path(paths["json"]).read_text())
    s = m2.summary()["layers"]["block0"]
    want = placement_stats(np.asarray(s[s["balance_basis"]]), np.asarray(assignment), 4)
    got = doc["placement"]["layers"]["block0"]
    assert got["current"] == json.loads(json.dumps(want))
    assert got["balanced"]["max_mean_bin_load"] <= got["current"]["max_mean_bin_load"] + 1e-12
    assert "bins:block0" in paths and "Load per device" in " ".join(read_page(paths["html"]).text)
    with pytest.raises(ValueError, match="the placement places 8 experts, layer 'block0' has 16"):
        write_report(m, tmp_path / "x", placement={"assignment": [0, 1] * 4})


def test_page_shows_fields_it_does_not_know_and_truncates_long_task_tables(tmp_path, make_routing):
    """New per-block and per-task figures (e.g. mutual information) appear without page changes;
    thousands of tasks are cut to MAX_PAGE_TASKS rows on the page, busiest first."""
    T = MAX_PAGE_TASKS + 5
    names = [f"t{i}" for i in range(T)]
    m = ModelProfile(T, names, context=CONTEXT)
    rng = np.random.default_rng(6)
    m.add("block0", make_routing(rng, 300, 8, 2), rng.integers(0, T, size=300))
    summary = json.loads(json.dumps(m.summary()))
    layer = summary["layers"]["block0"]
    layer["task_expert_mi_nats"] = 0.4321
    for t in layer["per_task"].values():
        t["entropy_noise_free"] = 1.25
    html = render_page({"summary": summary, "context": CONTEXT}, {"load:block0": "x.png"},
                       csv_name="t.csv", json_name="t.json")
    page = Page()
    page.feed(html)
    text = " ".join(page.text)
    assert "task_expert_mi_nats" in text and "0.4321" in text and "entropy_noise_free" in text
    assert f"The {MAX_PAGE_TASKS} tasks with the most examples of {T}" in text
    assert len(re.findall(r"<tr><td>t\d+</td>", html)) == MAX_PAGE_TASKS
    assert page.src == ["x.png"]  # only pictures that were drawn are referenced

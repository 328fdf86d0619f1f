"""Reports: the files exist, PNGs are PNGs, the JSON re-reads to the summary and matrices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from moe.profiling import LoadProfile, ModelProfile, format_summary, write_report
from moe.profiling.report import aggregate_expert_columns
from moe.profiling.stats import decode_matrix

pytestmark = pytest.mark.unit

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model(make_routing):
    rng = np.random.default_rng(0)
    m = ModelProfile(3, ["wine", "iris", "digits"], sparse_threshold=512)
    for _ in range(3):
        for name, E in (("block0", 16), ("block/1", 600)):  # block/1: sparse, binned heatmap, odd name
            B = 40
            m.add(name, make_routing(rng, B, E, 2), rng.integers(0, 3, size=B))
    return m


def test_write_report_for_a_model(tmp_path, make_routing):
    m = _model(make_routing)
    paths = write_report(m, tmp_path / "out")
    assert set(paths) == {"json", "html", "load:block0", "heatmap:block0", "load:block/1", "heatmap:block/1"}
    for kind, path in paths.items():
        p = Path(path)
        assert p.is_file() and p.parent == tmp_path / "out", kind
        if kind.startswith(("load", "heatmap")):
            assert p.read_bytes()[:8] == PNG_MAGIC, kind
    assert Path(paths["json"]).name == "profile.json"
    doc = json.loads(Path(paths["json"]).read_text())
    assert doc["format"] == "moe.profile_report/1"
    assert doc["summary"] == json.loads(json.dumps(m.summary()))
    assert doc["matrices"]["block0"]["gates"]["layout"] == "dense"
    assert doc["matrices"]["block/1"]["gates"]["layout"] == "csr"
    assert set(doc["matrices"]["block/1"]["gates"]) >= {"indptr", "indices", "data"}
    for name, layer in m.layers.items():
        for kind, dtype in (("gates", np.float64), ("counts", np.int64)):
            got = decode_matrix(doc["matrices"][name][kind], (3, layer.n_experts), dtype)
            want = layer.task_expert_matrix(kind)
            got = got.toarray() if sp.issparse(got) else got
            np.testing.assert_array_equal(got, want.toarray() if sp.issparse(want) else want)
    page = Path(paths["html"]).read_text()
    for kind, path in paths.items():
        if kind.startswith(("load", "heatmap")):
            assert f"src='{Path(path).name}'" in page
    assert "/" not in Path(paths["load:block/1"]).name


def test_write_report_for_one_layer_with_prefix(tmp_path, make_routing):
    rng = np.random.default_rng(1)
    p = LoadProfile(8, 2)
    p.add(make_routing(rng, 20, 8, 2), rng.integers(0, 2, size=20))
    paths = write_report(p, tmp_path, prefix="run7", html_page=False)
    assert set(paths) == {"json", "load", "heatmap"}
    assert sorted(Path(v).name for v in paths.values()) == ["run7.json", "run7_heatmap.png", "run7_load.png"]
    assert json.loads(Path(paths["json"]).read_text())["summary"] == json.loads(json.dumps(p.summary()))
    assert Path(paths["load"]).read_bytes()[:8] == PNG_MAGIC


def test_write_report_of_an_empty_profile(tmp_path):
    paths = write_report(LoadProfile(300, 2), tmp_path)  # nothing routed: all-zero plots still render
    assert Path(paths["heatmap"]).read_bytes()[:8] == PNG_MAGIC


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
    top = s["layers"]["block0"]["per_task"]["wine"]["top_experts"]
    assert ", ".join(map(str, top)) in text
    one = format_summary(s["layers"]["block0"], max_tasks=1)
    assert "wine" in one and "digits" not in one and "... 2 more tasks" in one
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

"""A layer costs its weights: gradients exist once a backward ran, and only for the experts
that received rows; Adam moments exist once an update ran, and only for the experts updated.
Inference keeps nothing for a backward. Checked on the bank's own accounting and, in a fresh
process, on the kernel's count of resident memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe.experts.ffn import FEW_ROWS
from moe.experts.local import LocalExperts
from moe.hierarchical import HierarchicalMoELayer
from moe.layer import MoELayer

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _row_bytes(d: int, h: int) -> int:
    return 4 * (2 * d * h + h + d)


@pytest.mark.parametrize("kind", ["flat", "hier"])
def test_state_appears_only_where_training_touched(kind):
    rng = np.random.default_rng(0)
    d, h = 6, 5
    if kind == "flat":
        layer = MoELayer(d, 12, h, k=2, gate="softmax_topk", rng=rng)
    else:
        layer = HierarchicalMoELayer(d, 3, 4, h, k_primary=1, k_secondary=2, rng=rng)
    mem = layer.experts.memory()
    assert mem == {"weights_bytes": 12 * _row_bytes(d, h), "grad_bytes": 0, "adam_bytes": 0, "experts_with_adam": 0}

    x = rng.standard_normal((5, d), dtype=np.float32)
    y, r = layer.forward(x, train=False)  # inference: nothing kept for a backward
    assert layer.experts.memory() == mem and layer.experts.bank._cache is None
    with pytest.raises(ValueError, match="grad=False: train=False forwards need grad=True"):
        layer.backward(np.ones_like(y))

    seen: set[int] = set()
    most = 0
    for step, (n, spread) in enumerate(((2, 1.0), (30, 0.01), (1, 1.0))):  # some experts get no rows
        xb = (x[:1] + spread * rng.standard_normal((n, d))).astype(np.float32)  # 0.01: a few busy experts
        y, r = layer.forward(xb, train=False, grad=True)  # no gate noise: the close rows crowd
        layer.backward(np.ones_like(y))
        now = set(np.flatnonzero(r.counts).tolist())
        bank = layer.experts.bank
        assert bank.touched.tolist() == sorted(now)
        many = [e for e in sorted(now) if r.counts[e] > FEW_ROWS]  # gradients packed; the others as factors
        assert bank.explicit.tolist() == many and bank.implicit.tolist() == sorted(now - set(many))
        assert many or step != 1, "the 30 close rows should crowd some expert"
        most = max(most, len(many))
        factors = 4 * n * 2 * h if bank.implicit.size else 0  # d_pre [N, h] (k = 2 rows per example)
        grad = layer.experts.memory()["grad_bytes"]
        assert len(many) * _row_bytes(d, h) + factors <= grad <= most * _row_bytes(d, h) * 17 // 16 + factors
        layer.experts.apply_update(1e-2)
        seen |= now
        mem = layer.experts.memory()
        assert mem["experts_with_adam"] == len(seen) < 12
        assert mem["adam_bytes"] == 2 * len(seen) * _row_bytes(d, h)  # m and v of updated experts only
        assert layer.experts.optimizer.state_rows().tolist() == sorted(seen)


def test_dense_gradients_are_built_on_request_and_kept_current():
    rng = np.random.default_rng(1)
    layer = MoELayer(4, 6, 3, k=1, gate="softmax_topk", rng=rng, dtype=np.float64)
    x = np.concatenate([rng.standard_normal(4) + 0.01 * rng.standard_normal((12, 4)), rng.standard_normal((6, 4))])
    y, r1 = layer.forward(x)
    layer.backward(np.ones_like(y))
    assert layer.experts.bank.grads.nbytes() == 0  # nobody asked yet
    w1 = layer.grads["experts.w1"]  # built now, from the packed rows and the factors
    bank = layer.experts.bank
    assert bank.explicit.size and bank.implicit.size  # 12 close rows, 6 spread: both kinds
    np.testing.assert_array_equal(w1[bank.explicit], bank.grad_rows["w1"])
    np.testing.assert_array_equal(w1[bank.implicit], bank.low_rank["w1"].materialize())
    assert not w1[np.setdiff1d(np.arange(6), bank.touched)].any()
    y, r2 = layer.forward(x[:1])
    layer.backward(np.ones_like(y))
    assert layer.grads["experts.w1"] is w1  # the same array, rewritten by the backward
    for e in range(6):
        assert w1[e].any() == (r2.counts[e] > 0)


_CHILD = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from moe.layer import MoELayer

def status():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}

rng = np.random.default_rng(0)
x = rng.standard_normal((256, 64), dtype=np.float32)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status()["VmRSS"]
layer = MoELayer(64, 1024, 128, k=2, gate="softmax_topk", rng=rng)
built = status()["VmHWM"] - base
layer.forward(x, train=False)
infer = status()["VmHWM"] - base
print(json.dumps({"built": built, "infer": infer, "weights": layer.experts.memory()["weights_bytes"]}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_building_and_inference_cost_the_weights_in_resident_memory():
    """Planted bug caught: moments or gradients allocated (and touched) at construction, or an
    inference forward that keeps a dense gradient or moment buffer, would show 2-4x."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["weights"] == 1024 * _row_bytes(64, 128)  # 64 MiB
    assert got["built"] <= 1.15 * got["weights"], got
    assert got["infer"] <= 1.15 * got["weights"], got


def test_grown_experts_keep_old_state_and_give_new_ones_none():
    rng = np.random.default_rng(2)
    bank = LocalExperts(4, 3, 2, rng=rng, dtype=np.float64)
    x = rng.standard_normal((3, 3))
    offsets = np.array([0, 2, 2, 3, 3])
    bank.forward(x, offsets)
    bank.backward(np.ones_like(x))
    bank.apply_update(0.1)
    grown = bank.grown(3, rng=rng)
    assert grown.optimizer.state_rows().tolist() == [0, 2]
    assert grown.optimizer.t.tolist() == [1, 0, 1, 0, 0, 0, 0]
    old, new = bank.optimizer.state_dict(), grown.optimizer.state_dict()
    for k in ("m.w1", "v.b2"):
        np.testing.assert_array_equal(new[k], old[k])


@pytest.mark.parametrize("rows", [[0, 2, 2, 3, 3, 3], [0] * 12 + [1] * 3 + [3], [1] * 20])
def test_gradient_norms_of_packed_and_factored_experts_are_those_of_the_dense_gradients(rows):
    """Experts with 1..FEW_ROWS rows (factors only), with more (packed rows), and a mix."""
    rng = np.random.default_rng(3)
    bank = LocalExperts(4, 5, 6, rng=rng, dtype=np.float64)
    eid = np.array(rows)
    offsets = np.searchsorted(eid, np.arange(5)).astype(np.int64)
    x = rng.standard_normal((eid.size, 5))
    bank.forward(x, offsets)
    bank.backward(rng.standard_normal((eid.size, 5)))
    ids, sq = bank.expert_sq_norms()
    np.testing.assert_array_equal(ids, np.unique(eid))
    dense = sum(np.square(bank.grads[n].reshape(4, -1)).sum(axis=1) for n in ("w1", "b1", "w2", "b2"))
    np.testing.assert_allclose(sq, dense[ids], rtol=1e-12)
    assert bank.grad_sq_norm() == pytest.approx(dense.sum(), rel=1e-12)

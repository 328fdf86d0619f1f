"""A shard's memory is its experts' weights plus what training touched, and `stats` says so
(docs/PROTOCOL.md §5.1). Oracle: the byte count of the rows it must hold, and an in-process
LocalExperts bank given the same requests."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from moe.experts.local import LocalExperts
from moe.sharding.launch import LocalShards
from moe.sharding.remote import RemoteExperts, ShardLinks

pytestmark = pytest.mark.distributed

RUN, E, D, H = "memory-run", 8, 4, 8
ROW = 4 * (2 * D * H + H + D)  # float32 bytes of one expert


def _memory(links: ShardLinks) -> dict:
    replies = links.call("stats", {0: ((), (0,), (), {})}, layer=0)
    return replies[0].header.meta


@pytest.mark.timeout(60)
def test_stats_report_weights_then_only_what_training_touched():
    with LocalShards([list(range(E))], n_layers=1, d_model=D, d_hidden=H, run=RUN, heartbeat_s=5.0) as shards:
        with ShardLinks(shards.endpoints, run=RUN, gen=0, deadline_s=5.0, heartbeat_s=5.0,
                        liveness=shards.alive) as links:
            m = _memory(links)
            assert (m["weights_bytes"], m["grad_bytes"], m["adam_bytes"], m["experts_with_adam"]) == (E * ROW, 0, 0, 0)
            assert m["peak_rss_bytes"] >= m["rss_bytes"] >= E * ROW

            local = LocalExperts(E, D, H, rng=np.random.default_rng(3))
            remote = RemoteExperts(links, 0, E, D, np.zeros(E, dtype=np.int32))
            with tempfile.TemporaryDirectory() as tmp:
                remote.load_part(Path(tmp), local.save_part(Path(tmp), 0), 0)
            rng = np.random.default_rng(0)
            x = rng.standard_normal((6, D)).astype(np.float32)
            remote.forward(x, np.array([0, 6, 6, 6, 6, 6, 6, 6, 6]))  # a forward alone: no gradients
            assert _memory(links)["grad_bytes"] == 0

            updated: set[int] = set()
            for offsets in ([0, 2, 2, 5, 5, 5, 6, 6, 6], [0, 0, 0, 3, 3, 3, 3, 6, 6]):
                offsets = np.array(offsets)
                for group in (remote, local):
                    group.forward(x, offsets)
                    group.backward(np.ones_like(x))
                    group.apply_update(0.1)
                updated |= set(np.flatnonzero(np.diff(offsets)).tolist())
                m = _memory(links)
                assert m["experts_with_adam"] == len(updated) < E
                assert m["adam_bytes"] == 2 * len(updated) * ROW  # m and v of the updated experts only
                assert 0 < m["grad_bytes"] <= 3 * ROW  # the largest backward touched three experts
                assert {k: v for k, v in local.memory().items() if k != "grad_bytes"} == {
                    k: m[k] for k in ("weights_bytes", "adam_bytes", "experts_with_adam")}

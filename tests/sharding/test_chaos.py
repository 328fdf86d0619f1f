"""The short form of the chaos campaign (bench/chaos.py; the full figures are in docs/RELIABILITY.md).

Real `moe train --shards 2` processes: shards killed with -9 at random times (seeded), the
coordinator killed and resumed, a shard stopped with SIGSTOP, a shard killed until the run gives
up, and fuzzed frames at a live `moe shard serve`. Oracles: one uninterrupted run (bit-identical final state, the load
profile included), the process table (no orphans), the temp folder (no launch folders left),
the kernel's RSS of the fuzzed shard.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "chaos.py"


@pytest.fixture(scope="module")
def chaos():
    spec = importlib.util.spec_from_file_location("moe_bench_chaos", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def campaign(chaos, tmp_path_factory):
    out = tmp_path_factory.mktemp("chaos")
    return chaos.Campaign(argparse.Namespace(out=str(out / "results.jsonl")), work=out / "work")


@pytest.mark.timeout(900)
def test_random_shard_kills_complete_bit_identically(chaos, campaign):
    chaos.kill_shards(campaign, 3, random.Random(1))
    rows = [r for r in campaign.rows if r["kind"] == "kill"]
    assert len(rows) == 3
    for r in rows:
        assert r["exit"] == 0 and r["identical"], r


@pytest.mark.timeout(900)
def test_a_killed_coordinator_resumes_bit_identically_and_leaves_nothing(chaos, campaign):
    chaos.kill_coordinator(campaign, 1, random.Random(2))
    (r,) = [r for r in campaign.rows if r["kind"] == "coordinator"]
    assert r["exit"] == 0 and r["identical"], r
    assert r["orphans"] == [] and r["stale_tmp_after_resume"] == 0 and r["launch_folders_left"] == [], r


@pytest.mark.timeout(900)
def test_a_stopped_shard_is_detected_and_the_run_completes_bit_identically(chaos, campaign):
    chaos.sigstop(campaign, 1, random.Random(5))
    (r,) = [r for r in campaign.rows if r["kind"] == "sigstop"]
    assert r["exit"] == 0 and r["identical"], r
    assert r["detected_after_s"] is not None and r["detected_by"] in ("deadline", "heartbeats"), r


@pytest.mark.timeout(900)
def test_a_shard_killed_again_and_again_gives_up_in_one_line(chaos, campaign):
    chaos.give_up(campaign, 1, random.Random(3))
    (r,) = [r for r in campaign.rows if r["kind"] == "giveup"]
    assert r["exit"] == 3 and r["tracebacks"] == 0, r
    assert r["final_line"].startswith("moe train: gave up: 4 expert failures within 600 s (limit 3)"), r


@pytest.mark.timeout(900)
def test_fuzzed_frames_leave_the_shard_up_and_its_memory_flat(chaos, campaign):
    chaos.fuzz(campaign, 20_000, random.Random(4))
    (r,) = [r for r in campaign.rows if r["kind"] == "fuzz"]
    assert r["alive"] and r["replies"] == r["messages"], r
    assert r["rss_growth_mb"] < 10, r

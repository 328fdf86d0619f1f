"""Step time of one MoE layer with experts in-process vs on 1, 2 and 4 shard processes.

One step = MoELayer forward (gate, dispatch, experts, combine) + backward + the experts'
squared gradient norm + the experts' lazy Adam update, at T=8192 tokens, d=256, h=512, k=2,
E=512 (softmax top-2 gate with random weights, so rows spread over the experts).

Equal cores: every process of a configuration is confined to the same 2 CPUs
(os.sched_setaffinity). In-process, the coordinator's OpenMP/BLAS use 2 threads. With shards,
shard s is pinned to CPU s % 2 with 1 OpenMP/BLAS thread (1 shard: both CPUs, 2 threads); the
coordinator may use both CPUs (it mostly waits while the shards compute). Every process runs with
OMP_WAIT_POLICY=passive (spinning OpenMP workers of several processes starve each other).
The machine's 2 cores are shared with other work, so a configuration's in-process and sharded
steps alternate within one run and the table reports both medians and their ratio.

Bytes on the wire are counted at the coordinator (every frame sent and received on the data
links, headers included; heartbeats excluded). The minimum is the dispatched rows and their
gradients: forward sends N x d x 4 bytes of rows and gets N x d x 4 back, backward sends N x d x 4
of output gradients and gets N x d x 4 of input gradients: 4 N d 4 bytes per step (2 N d 4 each
way), N = T k (no capacity drops).

Each configuration runs in its own process. Run: python bench/sharding.py [--steps 7] [--only ipc:1,ipc:2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import _timing  # noqa: F401  (bench/_timing.py: thread settings before numpy loads)

T, D, H, K, E = 8192, 256, 512, 2, 512
CPUS = (0, 1)


def _layer(rng_seed: int):
    """The benchmark's MoE layer; the same gate weights (so the same routing) for every seed use."""
    import numpy as np

    from moe.layer import MoELayer

    rng = np.random.default_rng(rng_seed)
    layer = MoELayer(D, E, H, K, gate="softmax_topk", w_importance=0.0, w_load=0.0, rng=rng)
    w = layer.params["gate.w_gate"]
    w[...] = np.random.default_rng(1).standard_normal(w.shape).astype(np.float32)
    return layer


def _step(layer, x, dy) -> int:
    _, routing = layer.forward(x, train=True)
    layer.backward(dy)
    layer.experts.grad_sq_norm()
    layer.experts.apply_update(1e-3, 1.0)
    return int(routing.counts.sum())


def worker(n: int, transport: str, steps: int, warmup: int) -> dict:
    """Alternate steps of the in-process layer and the sharded one (bench/_timing.py), so both
    see the same background load (the 2 cores are shared with other work); the machine's
    limits are probed before and after (a NOISY run when they moved by more than 10%)."""
    import numpy as np
    from _timing import measure_row

    from moe.sharding import session
    from moe.sharding.launch import LocalShards
    from moe.sharding.links import Access, ShardLinks
    from moe.sharding.remote import RemoteExperts, contiguous_placement

    os.sched_setaffinity(0, set(CPUS))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, D)).astype(np.float32)  # [T, d]
    dy = rng.standard_normal((T, D)).astype(np.float32)  # [T, d]
    local = _layer(0)
    remote = _layer(0)
    placement = contiguous_placement(E, n)
    lists = [np.flatnonzero(placement == s).tolist() for s in range(n)]
    threads = "2" if n == 1 else "1"
    cpus = [list(CPUS)] if n == 1 else [[CPUS[s % 2]] for s in range(n)]
    secret = session.new_secret()
    with LocalShards(lists, n_layers=1, d_model=D, d_hidden=H, run="bench", secret=secret, transport=transport,
                     cpus=cpus, env={"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}) as shards:
        with ShardLinks(shards.endpoints, run="bench", access=Access(secret), deadline_s=120.0,
                        liveness=shards.alive) as links:
            links.ping_all(60.0)
            remote.set_experts(RemoteExperts(links, 0, E, D, placement))
            rows, wire = [], []

            def in_process() -> None:
                rows.append(_step(local, x, dy))

            def sharded() -> None:
                b0 = (links.bytes_sent, links.bytes_received)
                rows_r = _step(remote, x, dy)
                assert rows_r == rows[-1]  # same gate weights: the same routing
                wire.append((links.bytes_sent - b0[0], links.bytes_received - b0[1]))

            row = measure_row({"local": in_process, "remote": sharded}, steps, warmup=warmup)
    t_local, t_remote = row.timings["local"].times, row.timings["remote"].times
    sent, received = zip(*wire[warmup:], strict=True)
    return {"local_s": row.median("local"), "remote_s": row.median("remote"), "rows": rows[-1],
            "ratios": [r / q for r, q in zip(t_remote, t_local, strict=True)],
            "sent": float(np.median(sent)), "received": float(np.median(received)),
            "noisy": row.noisy, "load": [row.load_before, row.load_after]}


def run_config(n: int, transport: str, steps: int, warmup: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "OMP_WAIT_POLICY": "passive"}
    cmd = [sys.executable, __file__, "--worker", str(n), transport, "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{n} shards over {transport} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--only", default="ipc:1,ipc:2,ipc:4,tcp:1,tcp:2,tcp:4", help="transport:shards list")
    p.add_argument("--worker", nargs=2, metavar=("N", "TRANSPORT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(int(args.worker[0]), args.worker[1], args.steps, args.warmup)))
        return
    print(f"MoE layer step (fwd + bwd + grad norm + lazy Adam), T={T} d={D} h={H} k={K} E={E}; every process "
          f"on CPUs {CPUS}; in-process and sharded steps alternate; medians of {args.steps} steps after "
          f"{args.warmup} warm-up")
    print("| configuration | in-process ms | sharded ms | sharded / in-process | range over the steps | "
          "wire MiB/step | vs minimum | load before/after |\n|---|--:|--:|--:|--:|--:|--:|---|")
    for item in args.only.split(","):
        transport, n = item.split(":")
        r = run_config(int(n), transport, args.steps, args.warmup)
        minimum = 4 * r["rows"] * D * 4
        wire_bytes = r["sent"] + r["received"]
        lo, hi = min(r["ratios"]), max(r["ratios"])
        print(f"| {n} shard(s), {transport} | {r['local_s'] * 1e3:,.0f} | {r['remote_s'] * 1e3:,.0f} | "
              f"{r['remote_s'] / r['local_s']:.2f} | {lo:.2f}-{hi:.2f} | {wire_bytes / 2**20:.1f} | "
              f"{wire_bytes / minimum:.4f} | {r['load'][0]:.2f} / {r['load'][1]:.2f}"
              f"{' NOISY' if r['noisy'] else ''} |", flush=True)
    print(f"\nminimum wire bytes = 4 x N x d x 4 (rows out and back in forward, gradients out and back in "
          f"backward), N = T x k = {T * K} rows here: {4 * T * K * D * 4 / 2**20:.0f} MiB per step")
    print("target: 2 shards over ipc <= 1.15x the in-process step time")


if __name__ == "__main__":
    main()

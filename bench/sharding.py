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

Each configuration runs in its own process. Run: python bench/sharding.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

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


def _step(layer, x, dy) -> tuple[float, int]:
    t0 = time.perf_counter()
    _, routing = layer.forward(x, train=True)
    layer.backward(dy)
    layer.experts.grad_sq_norm()
    layer.experts.apply_update(1e-3, 1.0)
    return time.perf_counter() - t0, int(routing.counts.sum())


def worker(n: int, transport: str, steps: int, warmup: int) -> dict:
    """Alternate steps of the in-process layer and the sharded one, so both see the same
    background load (the 2 cores are shared with other work); report both medians."""
    import numpy as np

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
            t_local, t_remote, sent, received = [], [], [], []
            for i in range(warmup + steps):
                tl, rows = _step(local, x, dy)
                b0 = (links.bytes_sent, links.bytes_received)
                tr, rows_r = _step(remote, x, dy)
                assert rows_r == rows  # same gate weights: the same routing
                if i >= warmup:
                    t_local.append(tl)
                    t_remote.append(tr)
                    sent.append(links.bytes_sent - b0[0])
                    received.append(links.bytes_received - b0[1])
    return {"local_s": float(np.median(t_local)), "remote_s": float(np.median(t_remote)), "rows": rows,
            "ratios": [r / q for r, q in zip(t_remote, t_local, strict=True)],
            "sent": float(np.median(sent)), "received": float(np.median(received))}


def run_config(n: int, transport: str, steps: int, warmup: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "OMP_WAIT_POLICY": "passive"}
    cmd = [sys.executable, __file__, "--worker", str(n), transport, "--steps", str(steps), "--warmup", str(warmup)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{n} shards over {transport} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
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
    header = (f"{'configuration':<18}{'in-process':>12}{'sharded':>12}{'ratio':>8}{'ratio range':>16}"
              f"{'wire MiB/step':>15}{'vs minimum':>12}")
    print(header)
    print("-" * len(header))
    for item in args.only.split(","):
        transport, n = item.split(":")
        r = run_config(int(n), transport, args.steps, args.warmup)
        minimum = 4 * r["rows"] * D * 4
        wire_bytes = r["sent"] + r["received"]
        lo, hi = min(r["ratios"]), max(r["ratios"])
        print(f"{f'{n} shard(s), {transport}':<18}{r['local_s'] * 1e3:>9.0f} ms{r['remote_s'] * 1e3:>9.0f} ms"
              f"{r['remote_s'] / r['local_s']:>7.3f}x{f'{lo:.2f}-{hi:.2f}x':>16}{wire_bytes / 2**20:>15.1f}"
              f"{wire_bytes / minimum:>11.4f}x", flush=True)
    print(f"\nminimum wire bytes = 4 x N x d x 4 (rows out and back in forward, gradients out and back in "
          f"backward), N = T x k = {T * K} rows here: {4 * T * K * D * 4 / 2**20:.0f} MiB per step")
    print("target: 2 shards over ipc <= 1.15x the in-process step time")


if __name__ == "__main__":
    main()

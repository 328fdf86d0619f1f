"""How a training step scales with the number of experts: flat MoELayer vs HierarchicalMoELayer.

One step = forward + backward + the experts' lazy Adam (touched experts only) + dense Adam on
the gate parameters, at d=64, h=128, k=2, T=8192 tokens. Configurations:
  flat   E=64        MoELayer, noisy top-2
  hier   E=1,024     32 groups x 32 experts
  hier   E=65,536    256 groups x 256 experts
The hierarchical layers use k_primary=1, k_secondary=2 (k=2): per example the router does
O((a + b) d) work instead of O((a + 2b) d) with k_primary=2, and both experts of an example sit
in one group, so a sharded deployment (one group per shard) sends each example to one shard.

Each configuration runs in its own process so its peak RSS (resource.getrusage) is its own.
The floor column is the expert bytes a step must move at the copy bandwidth measured in the
same run: per touched expert (W = its weights, 66 KB here) forward reads W, backward reads W,
lazy Adam reads p, m, v and writes p, m, v: 8 W. An expert with more than FEW_ROWS rows also
writes its gradient and Adam reads it back (10 W); one with fewer keeps it as factors that
Adam expands in cache (moe.optim.LowRank), so nothing more goes through memory.
Run: python bench/hier_scale.py [--steps 7] [--only flat64,hier1024,hier65536]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout

D, H, K, T = 64, 128, 2, 8192
CONFIGS = {
    "flat64": dict(kind="flat", E=64),
    "hier1024": dict(kind="hier", a=32, b=32),
    "hier65536": dict(kind="hier", a=256, b=256),
}


def expert_bytes() -> int:
    return 4 * (D * H + H + H * D + D)


def copy_bandwidth(reps: int = 5) -> float:
    """GB/s of np.copyto on 256 MiB float32 arrays (bytes read + written), best of reps."""
    src = np.ones(64 << 20, dtype=np.float32)
    dst = np.empty_like(src)
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def model_bytes(n_experts: int, n_groups: int, per_group: int) -> int:
    """Upper bound of the float32 state: expert weights + grads + Adam m, v of every expert, and
    the gate weights + grads + m, v (lazy Adam holds moments only for experts it updated)."""
    expert = n_experts * (D * H + H + H * D + D)
    gate = 2 * (D * n_groups + n_groups * D * per_group) if n_groups else 2 * D * n_experts
    return 4 * 4 * (expert + gate)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def build(cfg: dict, rng: np.random.Generator):
    from moe.hierarchical import HierarchicalMoELayer
    from moe.layer import MoELayer

    if cfg["kind"] == "flat":
        return MoELayer(D, cfg["E"], H, k=K, gate="noisy_topk", rng=rng)
    return HierarchicalMoELayer(D, cfg["a"], cfg["b"], H, k_primary=1, k_secondary=2, rng=rng)


def run_one(name: str, steps: int, warmup: int) -> dict:
    """Time `steps` steps after `warmup` in this process; report medians and peak RSS."""
    from moe import bindings
    from moe.optim import Adam, AdamConfig

    cfg = CONFIGS[name]
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    layer = build(cfg, rng)
    build_s = time.perf_counter() - t0
    gate_params = {n: layer.params[n] for n in layer.gate_param_names}
    gate_opt = Adam(gate_params, AdamConfig())
    x = rng.standard_normal((T, D), dtype=np.float32)
    dy = (rng.standard_normal((T, D), dtype=np.float32) / np.float32(T)).astype(np.float32)
    noise = np.random.default_rng(1)
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "expert_adam": [], "gate_adam": [], "step": []}
    balance = []
    for i in range(warmup + steps):
        t = [time.perf_counter()]
        _, routing = layer.forward(x, rng=noise)
        t.append(time.perf_counter())
        layer.backward(dy)
        t.append(time.perf_counter())
        layer.experts.apply_update(1e-3)
        t.append(time.perf_counter())
        gate_opt.step({n: layer.grads[n] for n in gate_params}, 1e-3)
        t.append(time.perf_counter())
        if i >= warmup:
            for j, key in enumerate(("forward", "backward", "expert_adam", "gate_adam")):
                phases[key].append(t[j + 1] - t[j])
            phases["step"].append(t[-1] - t[0])
            balance.append((int((routing.counts > 0).sum()), int(layer.experts.bank.explicit.size)))
    return {
        "config": name,
        "experts": layer.n_experts,
        "backend": bindings.backend(),
        "build_s": build_s,
        **{f"{k}_ms": 1e3 * float(np.median(v)) for k, v in phases.items()},
        "active_experts": int(np.median([b[0] for b in balance])),
        "explicit_experts": int(np.median([b[1] for b in balance])),  # gradients written out
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        **{k.replace("_bytes", "_gib"): v / 2**30 for k, v in layer.experts.memory().items() if k.endswith("_bytes")},
        "experts_with_adam": layer.experts.memory()["experts_with_adam"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=7, help="timed steps per configuration (>= 5)")
    ap.add_argument("--warmup", type=int, default=25,
                    help="untimed steps first: the first steps at E = 65,536 give thousands of experts their moments (page faults), 25 reach steady state")
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated configurations")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.steps, args.warmup)))
        return
    if args.steps < 5:
        ap.error(f"--steps must be >= 5, got {args.steps}")
    print(f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in args.only.split(","):
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}; choose from {list(CONFIGS)}")
        cfg = CONFIGS[name]
        need = model_bytes(cfg.get("E", cfg.get("a", 0) * cfg.get("b", 0)), cfg.get("a", 0), cfg.get("b", 0))
        if need * 1.3 > mem_available():
            print(f"skip {name}: needs ~{need * 1.3 / 2**30:.1f} GiB, {mem_available() / 2**30:.1f} GiB available")
            continue
        cmd = [sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    bw = copy_bandwidth()  # after the children: a child inherits the parent's peak RSS
    print(f"copy bandwidth {bw:.1f} GB/s; load average {os.getloadavg()[0]:.2f}")
    for r in rows:
        moved = (8 * r["active_experts"] + 2 * r["explicit_experts"]) * expert_bytes()
        r["floor_ms"] = 1e3 * moved / (bw * 1e9)
        r["vs_flat64"] = r["step_ms"] / rows[0]["step_ms"] if rows[0]["config"] == "flat64" else float("nan")
    cols = ["config", "experts", "step_ms", "vs_flat64", "floor_ms", "forward_ms", "backward_ms", "expert_adam_ms",
            "gate_adam_ms", "active_experts", "explicit_experts", "experts_with_adam", "peak_rss_gib", "weights_gib", "grad_gib", "adam_gib"]
    print("\n| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols) + " |")
    if rows:
        print(f"\nbackend: {rows[0]['backend']}; medians over {args.steps} steps after {args.warmup} warm-up; T={T}, d={D}, h={H}, k={K}")


if __name__ == "__main__":
    main()

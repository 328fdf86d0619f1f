"""Peak memory of an MoE layer against its floor and against a torch Mixtral-style loop.

    python bench/memory.py [--only flat512,flat4096,hier65536] [--skip-torch]

For each configuration and each case, a fresh child process builds the layer and then does
the case's work; its peak RSS (VmHWM) is measured from a baseline taken after the imports and
the input batch (the high-water mark is reset there through /proc/self/clear_refs), so the
figure is what the layer costs, not the interpreter:
  build   construct the layer
  infer   build, then one inference forward (train=False / torch.inference_mode)
  train   build, then one training step: forward, backward, lazy Adam on the experts that
          received rows, dense Adam on the router

Floors, from the bytes that must exist (float32):
  weights                       every parameter (experts and router)
  train floor                   weights + the gradients and both Adam moments of the router
                                and of the experts that received rows (untouched experts need
                                neither: PyTorch's .grad=None / lazy optimizer state, DeepSpeed
                                ZeRO's three budgets); activations are not counted

Configurations (T = 8192 rows per batch, k = 2):
  flat512    MoELayer E=512,  d=256, h=512, softmax top-2 router (the torch loop's router)
  flat4096   MoELayer E=4096, d=256, h=512, softmax top-2
  hier65536  HierarchicalMoELayer 256 groups x 256 experts, d=64, h=128, k_primary=1,
             k_secondary=2; torch: the same two-level routing, experts in a ModuleList
The torch peer is the loop of bench/layer.py (Hugging Face Mixtral's sparse block: a Python
loop over experts, index_select, index_add_), with torch.optim.Adam, whose state is created
on the first step only for parameters that have a gradient; grads are set to None between
steps, so experts without rows have none.
torch is a bench-only dependency (`pip install -e .[bench]`). Heavy: run alone, under
`flock -x /tmp/moe-cpu.lock`; flat4096's training step needs ~18 GB for either side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout

from moe.rss import resident  # noqa: E402

T = 8192
CONFIGS = {
    "flat512": dict(kind="flat", E=512, d=256, h=512),
    "flat4096": dict(kind="flat", E=4096, d=256, h=512),
    "hier65536": dict(kind="hier", a=256, b=256, d=64, h=128),
}
CASES = ("build", "infer", "train")
GIB = 2**30


def _reset_peak() -> int:
    """Reset the high-water mark to the current RSS; return that baseline."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return resident()["rss_bytes"]


def _expert_bytes(cfg: dict) -> int:
    return 4 * (2 * cfg["d"] * cfg["h"] + cfg["h"] + cfg["d"])


# ----------------------------------------------------------------------------- ours
def run_ours(name: str, case: str) -> dict:
    from moe.hierarchical import HierarchicalMoELayer
    from moe.layer import MoELayer
    from moe.optim import Adam, AdamConfig

    cfg = CONFIGS[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((T, cfg["d"]), dtype=np.float32)
    dy = rng.standard_normal((T, cfg["d"]), dtype=np.float32) / np.float32(T)
    base = _reset_peak()
    if cfg["kind"] == "flat":
        layer = MoELayer(cfg["d"], cfg["E"], cfg["h"], k=2, gate="softmax_topk", rng=rng)
    else:
        layer = HierarchicalMoELayer(cfg["d"], cfg["a"], cfg["b"], cfg["h"], k_primary=1, k_secondary=2, rng=rng)
    gate_names = layer.gate_param_names
    touched = 0
    if case == "infer":
        _, r = layer.forward(x, train=False)
        touched = int(np.count_nonzero(r.counts))
    elif case == "train":
        gate_opt = Adam({n: layer.params[n] for n in gate_names}, AdamConfig())
        _, r = layer.forward(x, rng=np.random.default_rng(1))
        layer.backward(dy)
        layer.experts.apply_update(1e-3)
        gate_opt.step({n: layer.grads[n] for n in gate_names}, 1e-3)
        touched = int(np.count_nonzero(r.counts))
    peak = resident()["peak_rss_bytes"] - base
    gate_bytes = sum(layer.params[n].nbytes for n in gate_names)
    return {"side": "ours", "config": name, "case": case, "peak": peak, "touched": touched,
            "weights": gate_bytes + layer.experts.memory()["weights_bytes"], "gate_bytes": gate_bytes,
            **{k: v for k, v in layer.experts.memory().items() if k != "weights_bytes"}}


# ----------------------------------------------------------------------------- torch
def _torch_layer(cfg: dict):
    import torch
    from torch import nn

    def expert():
        return nn.Sequential(nn.Linear(cfg["d"], cfg["h"]), nn.ReLU(), nn.Linear(cfg["h"], cfg["d"]))

    def run_experts(experts, x, rows_of, weights):
        """The Mixtral loop: per expert, its rows through it, scaled and added back."""
        out = torch.zeros_like(x)
        for e, (slot, rows) in rows_of.items():
            y = experts[e](x[rows]) * weights[rows, slot, None]
            out.index_add_(0, rows, y)
        return out

    class Flat(nn.Module):  # bench/layer.py's Mixtral-style block
        def __init__(self):
            super().__init__()
            E = cfg["E"]
            self.gate = nn.Linear(cfg["d"], E, bias=False)
            self.experts = nn.ModuleList(expert() for _ in range(E))

        def forward(self, x):
            probs = torch.softmax(self.gate(x), dim=-1)
            weights, chosen = torch.topk(probs, 2, dim=-1)
            weights = weights / weights.sum(dim=-1, keepdim=True)
            mask = nn.functional.one_hot(chosen, num_classes=len(self.experts)).permute(2, 1, 0)  # [E, k, T]
            rows_of = {}
            for e in range(len(self.experts)):
                slot, rows = torch.where(mask[e])
                if rows.numel():
                    rows_of[e] = (slot, rows)
            return run_experts(self.experts, x, rows_of, weights), len(rows_of)

    class Hier(nn.Module):  # the same two-level routing: top-1 group, then top-2 inside it
        def __init__(self):
            super().__init__()
            a, b = cfg["a"], cfg["b"]
            self.a, self.b = a, b
            self.primary = nn.Linear(cfg["d"], a, bias=False)
            self.secondary = nn.Parameter(torch.randn(a, cfg["d"], b) * 0.01)
            self.experts = nn.ModuleList(expert() for _ in range(a * b))

        def forward(self, x):
            gp, group = torch.softmax(self.primary(x), dim=-1).max(dim=-1)  # [T], [T]
            chosen = torch.empty((x.shape[0], 2), dtype=torch.long)
            weights = torch.empty((x.shape[0], 2))
            for i in torch.unique(group).tolist():  # a one_hot over 65,536 experts would be 8 GB
                rows = torch.where(group == i)[0]
                w, j = torch.topk(torch.softmax(x[rows] @ self.secondary[i], dim=-1), 2, dim=-1)
                chosen[rows] = i * self.b + j
                weights[rows] = gp[rows, None] * w / w.sum(dim=-1, keepdim=True)
            flat = chosen.reshape(-1)
            order = torch.argsort(flat, stable=True)
            ids, counts = torch.unique_consecutive(flat[order], return_counts=True)
            rows_of = {}
            for e, part in zip(ids.tolist(), torch.split(order, counts.tolist()), strict=True):
                rows_of[e] = (part % 2, part // 2)
            return run_experts(self.experts, x, rows_of, weights), len(rows_of)

    return Flat() if cfg["kind"] == "flat" else Hier()


def run_torch(name: str, case: str) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    cfg = CONFIGS[name]
    x = torch.randn(T, cfg["d"])
    dy = torch.randn(T, cfg["d"]) / T
    base = _reset_peak()
    block = _torch_layer(cfg)
    touched = 0
    if case == "infer":
        with torch.inference_mode():
            _, touched = block(x)
    elif case == "train":
        opt = torch.optim.Adam(block.parameters(), lr=1e-3)
        opt.zero_grad(set_to_none=True)
        y, touched = block(x)
        y.backward(dy)
        opt.step()
    peak = resident()["peak_rss_bytes"] - base
    weights = sum(p.numel() * p.element_size() for p in block.parameters())
    return {"side": "torch", "config": name, "case": case, "peak": peak, "touched": touched, "weights": weights}


# ----------------------------------------------------------------------------- parent
def floors(cfg: dict, weights: int, gate_bytes: int, touched: int) -> dict[str, int]:
    step_state = gate_bytes + touched * _expert_bytes(cfg)  # bytes of gradients, and of each moment
    return {"weights": weights, "weights+grads": weights + step_state, "train_floor": weights + 3 * step_state}


def child(side: str, name: str, case: str) -> dict:
    cmd = [sys.executable, __file__, "--child", side, name, case]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} {name} {case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=",".join(CONFIGS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        side, name, case = args.child
        print(json.dumps((run_ours if side == "ours" else run_torch)(name, case)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.2f}; T={T}; peaks in GiB over the post-import baseline")
    sides = ["ours"] + ([] if args.skip_torch else ["torch"])
    rows = []
    for name in args.only.split(","):
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}; choose from {list(CONFIGS)}")
        for case in args.cases.split(","):
            for side in sides:
                r = child(side, name, case)
                rows.append(r)
                print(json.dumps(r), flush=True)
    print("\n| config | case | weights | floor | ours | ours/floor | torch | torch/floor | experts touched |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.only.split(","):
        ours = {r["case"]: r for r in rows if r["config"] == name and r["side"] == "ours"}
        theirs = {r["case"]: r for r in rows if r["config"] == name and r["side"] == "torch"}
        for case, r in ours.items():
            f = floors(CONFIGS[name], r["weights"], r["gate_bytes"], r["touched"])
            floor = f["train_floor"] if case == "train" else f["weights"]
            t = theirs.get(case)
            tf = f"{t['peak'] / GIB:.2f} | {t['peak'] / floor:.2f}" if t else "- | -"
            print(f"| {name} | {case} | {r['weights'] / GIB:.2f} | {floor / GIB:.2f} | {r['peak'] / GIB:.2f} | "
                  f"{r['peak'] / floor:.2f} | {tf} | {r['touched']:,} |")


if __name__ == "__main__":
    main()

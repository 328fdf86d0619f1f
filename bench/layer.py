"""MoE layer step: ours against the strongest torch peer and against this machine's floor.

    python bench/layer.py [--E 8,64,512,4096] [--reps 5] [--no-numpy] [--pypi]
                          [--peer-grads keep|drop] [--json FILE]

T = 8192 examples, d = 256, h = 512, k = 2, float32, dropless, forward + backward. Each E runs
in its own process (so its peak RSS is its own); inside it every contender is alternated step
by step (A B C A B C ...) after one warm-up round, with the machine's limits (sgemm peak, copy
bandwidth) probed right before and right after; a row whose two probes differ by more than
10% is marked NOISY. Threads: our OpenMP/BLAS and torch's intra-op pool all use every core
this process may run on.

Ours (one expert bank shared by the three, so one copy of the weights):
  ours         MoELayer, softmax top-k gate, no balance loss (the peers' computation)
  ours-noisy   MoELayer, noisy top-k gate, importance + load losses 0.1 (our default; two
               router matrices, noise draws, the smooth load)
  ours-infer   the noisy layer's forward(train=False): clean logits, no loss (inference)
  numpy        `ours` on the numpy oracle path (a reference, not a peer; --no-numpy skips it)
Peers, all torch on the same weights (so the same routing; outputs and dx are checked equal to
ours before timing), softmax router, no balance loss:
  torch-loop     Hugging Face Mixtral's sparse block: one-hot mask, a loop over experts, index_add_
  torch-sort     stable argsort of the k choices, the gathered rows split per expert, one FFN
                 call each, weighted index_add_ (written here)
  torch-grouped  the same sort, then torch.nn.functional.grouped_mm for both expert matmuls
                 (torch 2.13's grouped GEMM, which runs float32 on the CPU, forward and backward)
  torch-sort-infer, torch-grouped-infer: their forward under torch.inference_mode
  moe-pypi       (--pypi, E <= 512) the `mixture-of-experts` package: GShard dispatch tensors,
                 capacity 1.25 (it drops assignments), own weights; a reference, not a peer
Peers' gradients: `keep` (default) is what a torch user does (zero_grad(set_to_none=True),
then backward materialises every gradient); `drop` frees each parameter's gradient as soon as
it is accumulated (register_post_accumulate_grad_hook), which lets E = 4096 fit beside ours in
~10 GiB and spares the peers the page faults and memory writes of fresh gradients: it can only
flatter them.

bound: the floor of bench/_bound.py (phases in data-flow order, each max(FLOPs / sgemm, bytes /
copy), bytes read + written at the copy rate counted the same way), from the faster of the two
probes; experts with rows and dispatched rows from ours' routing. The softmax and noisy rows
train (the noisy one with two router matrices); ours-infer has the forward-only floor.
torch and mixture-of-experts are bench-only dependencies (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import _timing  # noqa: F401  (first: thread settings before numpy loads)
import numpy as np
from _bound import floor_seconds, moe_phases
from _timing import machine_line, measure_row

from moe import bindings
from moe.experts.ffn import FFNExperts
from moe.layer import MoELayer

T, D, H, K = 8192, 256, 512, 2
TORCH_PEERS = ("torch-loop", "torch-sort", "torch-grouped")
INFER_PEERS = ("torch-sort-infer", "torch-grouped-infer")
LAYER_GEMMS = ((T, H, D), (T, D, H), (D, H, T))  # x W1, dh W1^T, x^T dh


# ---------------------------------------------------------------------------- ours
class Ours:
    """The three MoELayers of the benchmark over one expert bank (weights and grads shared)."""

    def __init__(self, E: int, rng: np.random.Generator) -> None:
        self.bank = FFNExperts(E, D, H, rng=rng)
        self.softmax = MoELayer(D, E, H, K, gate="softmax_topk", w_importance=0.0, w_load=0.0,
                                rng=rng, experts=self.bank)
        self.noisy = MoELayer(D, E, H, K, gate="noisy_topk", rng=rng, experts=self.bank)
        # a router that has learnt something: the softmax layer's random W_g (W_noise stays 0,
        # noise std softplus(0)); with W_g = 0 the inference forward would tie every row
        self.noisy.params["gate.w_gate"][...] = self.softmax.params["gate.w_gate"]
        self.x = rng.standard_normal((T, D), dtype=np.float32)  # [T, d]
        self.dy = rng.standard_normal((T, D), dtype=np.float32)  # [T, d]
        self.rng = np.random.default_rng(1)  # the noise

    def step(self, layer: MoELayer):
        def run():
            _, routing = layer.forward(self.x, rng=self.rng)
            return layer.backward(self.dy), routing  # [T, d]
        return run

    def infer(self):
        return self.noisy.forward(self.x, train=False)  # ([T, d], Routing)

    def contenders(self, numpy_too: bool) -> dict:
        fns = {"ours": self.step(self.softmax), "ours-noisy": self.step(self.noisy), "ours-infer": self.infer}
        if numpy_too:
            softmax_step = self.step(self.softmax)

            def numpy_step():
                with bindings.use_backend("numpy"):
                    softmax_step()
            fns["numpy"] = numpy_step
        return fns


# ---------------------------------------------------------------------------- torch peers
def torch_peers(ours: Ours, grads: str) -> tuple[dict, dict]:
    """{name: step} for the torch peers on ours' weights, and {name: (y, dx)} of one step each."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    E = ours.bank.n_experts
    p = ours.bank.params

    def leaf(a: np.ndarray):
        return torch.from_numpy(a).requires_grad_()

    w_gate = leaf(ours.softmax.params["gate.w_gate"])  # [d, E], the same memory as ours
    per_expert = [[leaf(p[n][e]) for n in ("w1", "b1", "w2", "b2")] for e in range(E)]
    stacked = [leaf(p[n]) for n in ("w1", "b1", "w2", "b2")]  # [E, d, h], [E, h], [E, h, d], [E, d]
    params = [w_gate, *stacked, *(t for ex in per_expert for t in ex)]
    if grads == "drop":
        for t in params:
            t.register_post_accumulate_grad_hook(lambda t: setattr(t, "grad", None))
    x = torch.from_numpy(ours.x).requires_grad_()
    dy = torch.from_numpy(ours.dy)

    def route(x):
        probs = torch.softmax(x @ w_gate, dim=-1)  # [T, E]
        weight, chosen = torch.topk(probs, K, dim=-1)  # [T, k]
        return weight / weight.sum(dim=-1, keepdim=True), chosen

    def ffn(e: int, rows):
        w1, b1, w2, b2 = per_expert[e]
        return torch.addmm(b2, torch.relu(torch.addmm(b1, rows, w1)), w2)  # [n, d]

    def loop(x):  # Mixtral's sparse block
        weight, chosen = route(x)
        out = torch.zeros_like(x)
        mask = F.one_hot(chosen, num_classes=E).permute(2, 1, 0)  # [E, k, T]
        for e in range(E):
            slot, rows = torch.where(mask[e])
            if rows.numel():
                out.index_add_(0, rows, ffn(e, x[rows]) * weight[rows, slot, None])
        return out

    def sort(x):
        weight, chosen = route(x)
        flat = chosen.reshape(-1)  # [T k]
        order = torch.argsort(flat, stable=True)  # [N] slots grouped by expert
        rows = order // K  # [N] example of each slot
        counts = torch.bincount(flat, minlength=E)  # [E]
        pieces = x[rows].split(counts.tolist())  # per expert [n_e, d]
        y = torch.cat([ffn(e, piece) for e, piece in enumerate(pieces) if piece.shape[0]])  # [N, d]
        return torch.zeros_like(x).index_add_(0, rows, y * weight.reshape(-1)[order, None])

    def grouped(x):
        weight, chosen = route(x)
        flat = chosen.reshape(-1)  # [T k]
        order = torch.argsort(flat, stable=True)  # [N]
        rows, expert = order // K, flat[order]  # [N], [N]
        offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)  # [E]
        w1, b1, w2, b2 = stacked
        hidden = torch.relu(F.grouped_mm(x[rows], w1, offs=offs) + b1[expert])  # [N, h]
        y = F.grouped_mm(hidden, w2, offs=offs) + b2[expert]  # [N, d]
        return torch.zeros_like(x).index_add_(0, rows, y * weight.reshape(-1)[order, None])

    def train_step(block):
        def run():
            for t in params:
                t.grad = None
            x.grad = None
            y = block(x)
            y.backward(dy)
            return y, x.grad
        return run

    def infer_step(block):
        def run():
            with torch.inference_mode():
                return block(x), None
        return run

    fns = {"torch-loop": train_step(loop), "torch-sort": train_step(sort), "torch-grouped": train_step(grouped),
           "torch-sort-infer": infer_step(sort), "torch-grouped-infer": infer_step(grouped)}
    return fns


def pypi_peer(E: int):
    import torch
    from mixture_of_experts import MoE

    torch.manual_seed(0)
    moe = MoE(dim=D, num_experts=E, hidden_dim=H, second_policy_train="all", capacity_factor_train=1.25)
    x = torch.randn(1, T, D, requires_grad=True)
    dy = torch.randn(1, T, D)

    def step():
        moe.zero_grad(set_to_none=True)
        out, _aux = moe(x)  # its balance loss is computed but not back-propagated
        out.backward(dy)
    return step


# ---------------------------------------------------------------------------- one E
def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def worker(E: int, reps: int, numpy_too: bool, pypi: bool, grads: str) -> dict:
    ours = Ours(E, np.random.default_rng(0))
    fns = ours.contenders(numpy_too)
    dx_ours, routing = fns["ours"]()
    y_ours = ours.softmax.forward(ours.x, rng=ours.rng)[0]
    ours.softmax.backward(ours.dy)
    active = {"ours": int(np.count_nonzero(routing.counts)),
              "ours-noisy": int(np.count_nonzero(fns["ours-noisy"]()[1].counts)),
              "ours-infer": int(np.count_nonzero(ours.infer()[1].counts))}
    errors = {"ours-infer": rel_err(ours.infer()[0], y_ours)}  # same W_g: the same output
    peers = torch_peers(ours, grads)
    for name, fn in peers.items():
        y, dx = fn()
        errors[name] = rel_err(y.detach().numpy(), y_ours)
        if dx is not None:
            errors[name + " dx"] = rel_err(dx.numpy(), dx_ours)
    fns.update(peers)
    if pypi:
        fns["moe-pypi"] = pypi_peer(E)
    row = measure_row(fns, reps, gemm_shapes=LAYER_GEMMS)
    return {
        "E": E, "reps": reps, "peer_grads": grads,
        "median_s": {n: t.median for n, t in row.timings.items()},
        "times_s": {n: list(t.times) for n, t in row.timings.items()},
        "start": [row.start.sgemm, row.start.copy], "end": [row.end.sgemm, row.end.copy],
        "sgemm": row.limits.sgemm, "copy": row.limits.copy, "noisy": row.noisy,
        "load": [row.load_before, row.load_after], "active": active, "errors": errors,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def bounds(r: dict) -> dict[str, float]:
    E, a, s, c = r["E"], r["active"], r["sgemm"], r["copy"]
    return {
        "ours": floor_seconds(moe_phases(T, D, H, E, T * K, a["ours"]), s, c),
        "ours-noisy": floor_seconds(moe_phases(T, D, H, E, T * K, a["ours-noisy"], gate_matrices=2), s, c),
        "ours-infer": floor_seconds(moe_phases(T, D, H, E, T * K, a["ours-infer"], train=False), s, c),
    }


# ---------------------------------------------------------------------------- table
def ms(t: float | None) -> str:
    return "-" if t is None else f"{t * 1e3:,.0f}"


def print_table(results: list[dict]) -> None:
    print("| E | row | ours ms | strongest peer | peer ms | ours/peer | bound ms | ours/bound | "
          "torch-loop | torch-sort | torch-grouped | other | limits (start -> end) | load before/after |")
    print("|--:|---|--:|---|--:|--:|--:|--:|--:|--:|--:|---|---|---|")
    for r in results:
        m, b = r["median_s"], bounds(r)
        lim = (f"{r['start'][0] / 1e9:.0f}->{r['end'][0] / 1e9:.0f} GF, "
               f"{r['start'][1] / 1e9:.1f}->{r['end'][1] / 1e9:.1f} GB/s" + (" **NOISY**" if r["noisy"] else ""))
        load = f"{r['load'][0]:.2f} / {r['load'][1]:.2f}"
        train_peer = min(TORCH_PEERS, key=lambda n: m[n])
        infer_peer = min(INFER_PEERS, key=lambda n: m[n])
        other = "; ".join(f"{n} {ms(m[n])}" for n in ("numpy", "moe-pypi") if n in m)
        for row, peer, peers in (("ours", train_peer, TORCH_PEERS), ("ours-noisy", train_peer, TORCH_PEERS),
                                 ("ours-infer", infer_peer, INFER_PEERS)):
            cells = [ms(m[n]) for n in peers] if row != "ours-infer" else ["", *(ms(m[n]) for n in peers)]
            print(f"| {r['E']} | {row} | {ms(m[row])} | {peer} | {ms(m[peer])} | {m[row] / m[peer]:.2f} | "
                  f"{ms(b[row])} | {m[row] / b[row]:.2f} | {' | '.join(cells)} | "
                  f"{other if row == 'ours' else ''} | {lim} | {load} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--E", default="8,64,512,4096")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--no-numpy", action="store_true", help="skip the numpy oracle path")
    p.add_argument("--pypi", action="store_true", help="add the mixture-of-experts package (E <= 512)")
    p.add_argument("--peer-grads", choices=("keep", "drop"), default="keep")
    p.add_argument("--json", help="also write the raw results here")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        r = worker(args.worker, args.reps, not args.no_numpy, args.pypi and args.worker <= 512, args.peer_grads)
        print(json.dumps(r))
        return
    import torch

    print(f"machine: {machine_line()}, torch {torch.__version__} ({torch.get_num_threads()} threads); "
          f"compiled kernels: {bindings.HAVE_COMPILED}")
    print(f"T={T} d={D} h={H} k={K} float32 dropless, forward+backward, contenders alternated, "
          f"median of {args.reps} after 1 warm-up round; peer gradients: {args.peer_grads}\n")
    results = []
    for E in (int(e) for e in args.E.split(",")):
        cmd = [sys.executable, __file__, "--worker", str(E), "--reps", str(args.reps),
               "--peer-grads", args.peer_grads] + (["--no-numpy"] if args.no_numpy else []) + \
              (["--pypi"] if args.pypi else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"E={E} failed:\n{done.stderr[-3000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        bad = {n: e for n, e in r["errors"].items() if not e < 1e-4}
        print(f"E={E}: peak RSS {r['peak_rss_gib']:.1f} GiB; experts with rows {r['active']}; "
              f"largest relative difference to ours {max(r['errors'].values()):.1e}"
              + (f"  WRONG: {bad}" if bad else ""), flush=True)
        results.append(r)
    print()
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

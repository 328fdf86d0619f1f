"""Train one MoE layer on a problem that needs several experts, and show the loss fall.

The data: a mixture of K linear maps, the map chosen by which of K clusters the input
came from. No single linear map fits it; a gate that learns the clusters can.
Run: python -m moe.demo_layer
"""

from __future__ import annotations

import numpy as np

from moe.layer import MoELayer
from moe.optim import Adam, AdamConfig


def make_mixture(rng: np.random.Generator, n: int, d: int = 16, n_maps: int = 4):
    centers = rng.normal(size=(n_maps, d)).astype(np.float32) * 3
    maps = rng.normal(size=(n_maps, d, d)).astype(np.float32) / np.sqrt(d)
    cluster = rng.integers(0, n_maps, size=n)
    x = (centers[cluster] + rng.normal(size=(n, d))).astype(np.float32)
    y = np.einsum("nd,nde->ne", x, maps[cluster]).astype(np.float32)
    return x, y, cluster


def main(steps: int = 400, batch: int = 256, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    d = 16
    x, y, _ = make_mixture(rng, 8192, d)
    x_val, y_val = x[-1024:], y[-1024:]
    layer = MoELayer(d, n_experts=8, d_hidden=64, k=2, rng=rng)
    gate_params = {n: layer.params[n] for n in layer.gate_param_names}
    gate_grads = {n: layer.grads[n] for n in layer.gate_param_names}
    gate_opt = Adam(gate_params, AdamConfig())
    best_linear = np.linalg.lstsq(x[:-1024], y[:-1024], rcond=None)[0]
    linear_mse = float(np.mean((x_val @ best_linear - y_val) ** 2))
    print(f"mixture of 4 linear maps, d={d}; best single linear map: val MSE {linear_mse:.4f}")
    print(f"{'step':>5} {'train MSE':>10} {'val MSE':>9} {'aux':>7}")
    for step in range(steps + 1):
        idx = rng.integers(0, len(x) - 1024, size=batch)
        out, routing = layer.forward(x[idx], rng=rng)
        err = out - y[idx]  # [B, d]
        mse = float(np.mean(err**2))
        layer.backward((2.0 / err.size) * err)
        lr = 3e-3
        gate_opt.step(gate_grads, lr)
        layer.experts.apply_update(lr)
        if step % 50 == 0:
            pred, _ = layer.forward(x_val, train=False)
            val = float(np.mean((pred - y_val) ** 2))
            print(f"{step:5d} {mse:10.4f} {val:9.4f} {routing.aux_loss:7.4f}")
    _, routing = layer.forward(x_val, train=False)
    share = routing.counts / routing.counts.sum()
    print("per-expert share of val assignments:", " ".join(f"{s:.2f}" for s in share))


if __name__ == "__main__":
    main()

"""`moe plan`: lay one multitask MoE (from a training config) out on an accelerator pod."""

from __future__ import annotations

from typing import Any

import numpy as np

from moe.accel.devices import get_pod, list_targets
from moe.accel.layout import Layout, layout_of_report, model_shape, write_plan
from moe.accel.planner import format_plan, plan, read_profile_loads
from moe.accel.shape import MoEShape
from moe.config import Config


def shape_from_config(config: Config, tokens: int, tasks: list[Any] | None = None) -> MoEShape:
    """The planner's view of a training config; tasks (TaskSpecs) give the mean adapter and head widths."""
    m = config.model
    gates = set(m.gates)
    d_in = float(np.mean([t.n_inputs for t in tasks])) if tasks else 64.0
    n_out = float(np.mean([t.n_outputs for t in tasks])) if tasks else 10.0
    return MoEShape(
        d_model=m.d_model, d_hidden=m.d_hidden, n_experts=m.n_experts, k=m.k, n_layers=m.n_layers,
        tokens=tokens, capacity_factor=m.capacity_factor, d_in=d_in, n_out=n_out,
        n_tasks=len(tasks) if tasks else 1,
        d_task_emb=m.d_task_emb if m.route_by != "example" else 0,
        gate="noisy_topk" if "noisy_topk" in gates else sorted(gates)[0],
    )


def cmd_plan(args) -> dict[str, Any]:
    from moe.config import load_config
    from moe.datasets import load_source, source_of

    if args.target not in list_targets() and not args.target.startswith("cpu:"):
        raise ValueError(f"unknown target {args.target!r}; known: {', '.join(list_targets())}, cpu:N")
    config = load_config(args.config, args.overrides)
    tasks = [d.spec for d in load_source(source_of(config.data))]
    shape = shape_from_config(config, args.tokens, tasks)
    loads = read_profile_loads(args.profile) if args.profile else None
    cfs = tuple(None if c == "none" else float(c) for c in args.capacity_factors.split(","))
    per_device = None if args.tokens_per_device is None else [int(t) for t in args.tokens_per_device.split(",")]
    result = plan(shape, get_pod(args.target), profile_loads=loads, capacity_factors=cfs,
                  per_device_batches=per_device, top=args.top, max_drop_rate=args.max_drop_rate)
    out = {"text": format_plan(result), "result": result, "layout": None}
    if getattr(args, "out", None):
        out["layout"] = executable_layout(result, args.target, model_shape(config.model))
        write_plan(args.out, out["layout"])
        out["text"] += f"\n\nwrote {args.out}: {out['layout'].describe()} (run it: moe train --backend jax --plan {args.out})"
    return out


def executable_layout(result, target: str, model: dict[str, int]) -> Layout:
    """The best ranked layout the JAX backend can run (EP must divide the experts evenly)."""
    if result.best is None:
        raise ValueError(f"no layout fits on {target}: nothing to write")
    for report in result.ranked:
        if model["n_experts"] % report.ep == 0:
            bal = result.balance.get(report.ep)
            return layout_of_report(report, None if bal is None else bal.placement, target, model)
    raise ValueError(f"none of the {len(result.ranked)} best layouts on {target} splits the "
                     f"{model['n_experts']} experts evenly over EP, which the JAX backend needs")

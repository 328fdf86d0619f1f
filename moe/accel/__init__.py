"""moe.accel: device and pod specs, an analytic cost model and a layout planner.

Pure numpy: nothing here imports jax (the JAX backend lives in moe.accel.jax_backend and is
optional). The core never imports this package.

First, before any module here imports jax: the XLA flags moe sets (moe.accel.xla_flags).
"""

from moe.accel import xla_flags as _xla_flags  # noqa: F401 (applies them on import)
from moe.accel.cost import CostReport, format_report, predict, predict_layer_step
from moe.accel.devices import (
    DeviceSpec,
    PodSpec,
    all_reduce_time,
    all_to_all_time,
    calibrate_cpu,
    get_device,
    get_pod,
    list_targets,
)
from moe.accel.planner import PlanResult, format_plan, plan, read_profile_loads
from moe.accel.shape import MoEShape

__all__ = [
    "CostReport",
    "DeviceSpec",
    "MoEShape",
    "PlanResult",
    "PodSpec",
    "all_reduce_time",
    "all_to_all_time",
    "calibrate_cpu",
    "format_plan",
    "format_report",
    "get_device",
    "get_pod",
    "list_targets",
    "plan",
    "predict",
    "predict_layer_step",
    "read_profile_loads",
]

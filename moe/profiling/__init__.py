"""Load-balance statistics, reports (JSON, PNG, HTML) and placement advice.

Reads `Routing` records only; never reaches into layers and never imports moe.accel.
"""

from moe.profiling.placement import (
    contiguous_placement,
    load_placement,
    lpt_placement,
    placement_stats,
    save_placement,
)
from moe.profiling.report import aggregate_expert_columns, format_summary, write_report
from moe.profiling.stats import LoadProfile, ModelProfile, cv, max_over_mean

__all__ = [
    "LoadProfile",
    "ModelProfile",
    "aggregate_expert_columns",
    "contiguous_placement",
    "cv",
    "format_summary",
    "load_placement",
    "lpt_placement",
    "max_over_mean",
    "placement_stats",
    "save_placement",
    "write_report",
]

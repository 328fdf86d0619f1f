"""moe.tasks: what a task is, its data (built-in, generated or user tables), losses and metrics.

Knows nothing of where experts run.
"""

from moe.tasks.builtin import builtin_tasks, heldout_task
from moe.tasks.family import FamilyStructure, make_family, make_structure
from moe.tasks.losses import loss_and_grad, predict
from moe.tasks.metrics import evaluate, primary_metric
from moe.tasks.spec import METRIC_BY_KIND, TASK_KINDS, TaskData, TaskRegistry, TaskSpec
from moe.tasks.splits import fit_standardizer, make_task_data, split_indices, standardize
from moe.tasks.userdata import load_table, load_task_file

__all__ = [
    "METRIC_BY_KIND",
    "TASK_KINDS",
    "FamilyStructure",
    "TaskData",
    "TaskRegistry",
    "TaskSpec",
    "builtin_tasks",
    "evaluate",
    "fit_standardizer",
    "heldout_task",
    "load_table",
    "load_task_file",
    "loss_and_grad",
    "make_family",
    "make_structure",
    "make_task_data",
    "predict",
    "primary_metric",
    "split_indices",
    "standardize",
]

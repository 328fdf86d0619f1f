"""moe: one sparse mixture-of-experts model across many tasks.

The public API, re-exported explicitly. Importing moe never imports JAX (moe.accel is
optional and imported only by name).
"""

# First: thread settings for shared machines, read by OpenBLAS and OpenMP when they start.
from moe import threads as _threads  # noqa: F401
from moe.api import load, profile, save_model
from moe.config import Config, DataConfig, ModelConfig, ShardConfig, TrainConfig, load_config
from moe.experts.local import LocalExperts
from moe.experts.protocol import ExpertGroup, ExpertGroupFailure
from moe.hierarchical import HierarchicalMoELayer
from moe.layer import MoELayer
from moe.model import Chunk, MultiTaskMoE
from moe.routing import Routing
from moe.tasks.spec import TaskData, TaskRegistry, TaskSpec
from moe.train import Trainer

__all__ = [
    "Chunk",
    "Config",
    "DataConfig",
    "ExpertGroup",
    "ExpertGroupFailure",
    "HierarchicalMoELayer",
    "LocalExperts",
    "ModelConfig",
    "MoELayer",
    "MultiTaskMoE",
    "Routing",
    "ShardConfig",
    "TaskData",
    "TaskRegistry",
    "TaskSpec",
    "TrainConfig",
    "Trainer",
    "load",
    "load_config",
    "profile",
    "save_model",
]
__version__ = "0.1.0"

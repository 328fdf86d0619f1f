"""Experts sharded across processes and hosts over ZeroMQ (spec: docs/PROTOCOL.md).

`RemoteExperts` is the ExpertGroup the trainer uses; `ShardLinks` its connections
(`moe.sharding.links`); the shard server is `moe.sharding.server` with its compute in
`moe.sharding.host` (`python -m moe.sharding.serve` / `moe shard serve`); `open_expert_groups`
(`moe.sharding.coordinator`) wires both into `moe train` (local launch or running endpoints).
Names are imported on first use, so `python -m moe.sharding.serve` does not import itself twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LocalShards": "moe.sharding.launch",
    "Access": "moe.sharding.links",
    "RemoteExperts": "moe.sharding.remote",
    "ShardError": "moe.sharding.links",
    "ShardFailure": "moe.sharding.links",
    "ShardLinks": "moe.sharding.links",
    "ShardSetupError": "moe.sharding.coordinator",
    "contiguous_placement": "moe.sharding.remote",
    "SecurityError": "moe.sharding.security",
    "generate_keys": "moe.sharding.security",
    "open_expert_groups": "moe.sharding.coordinator",
    "register": "moe.sharding.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe.sharding' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

"""Experts sharded across processes and hosts over ZeroMQ (spec: docs/PROTOCOL.md).

`RemoteExperts` is the ExpertGroup the trainer uses; `ShardLinks` its connections; the shard
server lives in `moe.sharding.server` (`python -m moe.sharding.server` / `moe shard serve`);
`open_expert_groups` wires both into `moe train` (local launch or running endpoints).
Names are imported on first use, so `python -m moe.sharding.server` does not import itself twice.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LocalShards": "moe.sharding.launch",
    "RemoteExperts": "moe.sharding.remote",
    "ShardError": "moe.sharding.remote",
    "ShardFailure": "moe.sharding.remote",
    "ShardLinks": "moe.sharding.remote",
    "contiguous_placement": "moe.sharding.remote",
    "SecurityError": "moe.sharding.security",
    "generate_keys": "moe.sharding.security",
    "open_expert_groups": "moe.sharding.cli",
    "register": "moe.sharding.cli",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe.sharding' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)

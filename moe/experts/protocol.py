"""The ExpertGroup protocol: what MoELayer needs from its experts, wherever they run."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


class ExpertGroupFailure(RuntimeError):
    """Experts became unreachable or stalled mid-step (e.g. a dead shard). The step is void;
    the trainer rolls back to the last committed checkpoint and carries on."""


@runtime_checkable
class ExpertGroup(Protocol):
    """E experts mapping packed rows [N, d] to outputs [N, d], with their own optimizer.

    `offsets[e]:offsets[e+1]` are expert e's rows. `forward(..., keep=False)` says no
    backward follows (an inference forward), so nothing need be kept for one. `backward`
    returns the gradient for the packed rows and keeps the weight gradients where the
    weights live; `apply_update` applies the optimizer there. `save_part` writes the group's experts into a checkpoint
    folder being assembled (phase one; the manifest is the commit) and returns the manifest
    entries; `load_part` reads them back from any set of part files. `grad_sq_norm` must be
    the float64 sum, in ascending expert id, of each touched expert's squared gradient norm,
    so the clipping factor has the same bits wherever the experts run.
    Implemented by LocalExperts and RemoteExperts.
    """

    n_experts: int
    d_model: int

    def forward(self, packed: np.ndarray, offsets: np.ndarray, keep: bool = True) -> np.ndarray: ...

    def backward(self, grad_out: np.ndarray) -> np.ndarray: ...

    def grad_sq_norm(self) -> float: ...

    def apply_update(self, lr: float, grad_scale: float = 1.0) -> None: ...

    def save_part(self, folder: Path, layer: int) -> dict[str, dict]: ...

    def load_part(self, folder: Path, entries: dict[str, dict], layer: int) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...

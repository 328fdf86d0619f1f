"""The ExpertGroup protocol: what MoELayer needs from its experts, wherever they run."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ExpertGroup(Protocol):
    """E experts mapping packed rows [N, d] to outputs [N, d], with their own optimizer.

    `offsets[e]:offsets[e+1]` are expert e's rows. `backward` returns the gradient for the
    packed rows and keeps the weight gradients where the weights live; `apply_update`
    applies the optimizer there. Implemented by LocalExperts and RemoteExperts.
    """

    n_experts: int
    d_model: int

    def forward(self, packed: np.ndarray, offsets: np.ndarray) -> np.ndarray: ...

    def backward(self, grad_out: np.ndarray) -> np.ndarray: ...

    def grad_sq_norm(self) -> float: ...

    def apply_update(self, lr: float, grad_scale: float = 1.0) -> None: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None: ...

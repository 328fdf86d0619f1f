"""Gates, capacity and balance losses. Knows nothing of tasks, sockets or files."""

from moe.routing.types import Routing

__all__ = ["Routing"]

"""moe: one sparse mixture-of-experts model across many tasks."""

from moe.routing import Routing

__all__ = ["Routing"]
__version__ = "0.1.0"

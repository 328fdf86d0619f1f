"""Thread settings for a machine shared with other work, applied when `moe` is imported.

Our kernels run OpenMP teams (libgomp) and call the BLAS of scipy, numpy calls its own
OpenBLAS; each keeps worker threads. By default those workers spin after each parallel
region or BLAS call, waiting for the next one (libgomp up to GOMP_SPINCOUNT = 300,000 spins,
OpenBLAS for 2^28 cycles, about 0.1 s). On an idle machine that only burns idle cores; on a
busy one the spinning workers take the cores from the threads doing the work, and from the
other users' processes. The defaults below make idle workers sleep (measured in
bench/RESULTS.md, "The whole step on a busy machine").

Each setting is an environment variable read once, when its library starts: OpenBLAS when
numpy (or scipy.linalg) is first imported, libgomp when the first kernel loads. So `apply()`
runs first thing in `moe/__init__.py`; a variable the user's environment already sets is kept
(theirs wins), e.g. `OMP_WAIT_POLICY=active moe train ...`. Child processes (shards) inherit
the settings through the environment.
"""

from __future__ import annotations

import os
import sys

# name -> (value, variables any of which, set by the user, mean they chose this already)
DEFAULTS: dict[str, tuple[str, tuple[str, ...]]] = {
    # idle OpenMP workers sleep on a futex at once instead of spinning 300,000 times
    "OMP_WAIT_POLICY": ("PASSIVE", ("GOMP_SPINCOUNT",)),
    # idle OpenBLAS workers sleep after 2^4 cycles instead of 2^28 (numpy's and scipy's OpenBLAS)
    "OPENBLAS_THREAD_TIMEOUT": ("4", ()),
}

_applied: dict[str, str] = {}  # what moe set
_late: set[str] = set()  # set after the library that reads it had started


def apply() -> None:
    """Set each default the environment does not choose yet (idempotent)."""
    started = {  # a library reads its variable once, when it loads
        "OPENBLAS_THREAD_TIMEOUT": "numpy" in sys.modules or "scipy.linalg" in sys.modules,
        "OMP_WAIT_POLICY": "moe.bindings" in sys.modules,  # our kernels load libgomp
    }
    for key, (value, chosen_by) in DEFAULTS.items():
        if key in os.environ or any(c in os.environ for c in chosen_by):
            continue
        os.environ[key] = value
        _applied[key] = value
        if started.get(key):
            _late.add(key)


def describe() -> str:
    """One line for reports: each setting in force and who set it."""
    parts = []
    for key, (_, chosen_by) in DEFAULTS.items():
        for k in (key, *chosen_by):
            if k in os.environ:
                who = "moe" if k in _applied else "user"
                late = ", set after its library started: not in force" if k in _late else ""
                parts.append(f"{k}={os.environ[k]} ({who}{late})")
    return ", ".join(parts) or "library defaults"


apply()

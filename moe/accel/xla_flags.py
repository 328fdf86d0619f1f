"""XLA settings applied when moe.accel is imported, before JAX starts its backend.

XLA:CPU generates each fusion's code with one of two emitters. With its default ("fusion
emitters"), compiling the JAX training step of the default model left the process about
370 MB larger than with the older loop emitters and took more CPU: at 200 tasks, five
alternated runs each (bench/jax_tasks.py; bench/RESULTS.md), a peak of 890-920 against
527-542 MB, the first step's CPU 10.3-13.2 against 8.0-9.2 s, the step itself about the
same (medians 50.6 and 52.4 ms), and the same mean test score after a 300-step run, to
every digit. So moe selects the loop emitters. The price: elementwise work over large
arrays is slower with them (an Adam update of 4.3 M parameters 7-10 against 3-4 ms). Only
XLA:CPU reads the flag: GPU and TPU are unchanged.

XLA reads XLA_FLAGS once, when the first backend starts (the first jax.devices(), jit or
device_put), not at `import jax`. moe.accel's modules that use JAX import this one first
(through the package), so a run through moe gets it; a program that started JAX itself
before importing moe.accel keeps XLA's defaults. A flag XLA_FLAGS already names is the
user's choice and is kept, e.g. `XLA_FLAGS=--xla_cpu_use_fusion_emitters=true`. XLA aborts
the process on a flag it does not know, so the default is added only for the jaxlib
releases it was measured on (KNOWN); a newer jaxlib runs with XLA's own defaults.
"""

from __future__ import annotations

import importlib.util
import os

# flag -> value moe sets
DEFAULTS: dict[str, str] = {"--xla_cpu_use_fusion_emitters": "false"}
KNOWN = ((0, 10),)  # jaxlib (major, minor) releases the flags were measured on

_applied: set[str] = set()  # the flags moe added to XLA_FLAGS


def jaxlib_release() -> tuple[int, int] | None:
    """(major, minor) of the installed jaxlib without loading XLA, or None without one."""
    if importlib.util.find_spec("jaxlib") is None:
        return None
    from jaxlib.version import __version__

    major, minor = __version__.split(".")[:2]
    return int(major), int(minor)


def apply(known: tuple[tuple[int, int], ...] = KNOWN) -> None:
    """Add each default flag XLA_FLAGS does not name yet (idempotent), if the installed
    jaxlib is one of `known`."""
    if jaxlib_release() not in known:
        return
    flags = os.environ.get("XLA_FLAGS", "").split()
    named = {f.split("=", 1)[0] for f in flags}
    for flag, value in DEFAULTS.items():
        if flag not in named:
            flags.append(f"{flag}={value}")
            _applied.add(flag)
        elif f"{flag}={value}" not in flags:  # the user's own value
            _applied.discard(flag)
    os.environ["XLA_FLAGS"] = " ".join(flags)


def describe() -> str:
    """One line for reports: each flag moe has a default for, its value in force and who set it."""
    given = dict(f.split("=", 1) if "=" in f else (f, "") for f in os.environ.get("XLA_FLAGS", "").split())
    parts = [f"{flag}={given[flag]} ({'moe' if flag in _applied else 'user'})" if flag in given
             else f"{flag} (XLA's default)" for flag in DEFAULTS]
    return ", ".join(parts)


apply()

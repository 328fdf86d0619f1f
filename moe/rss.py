"""This process's resident memory, as the kernel counts it (Linux /proc/self/status)."""

from __future__ import annotations

import resource


def resident() -> dict[str, int]:
    """{"rss_bytes": now, "peak_rss_bytes": the high-water mark}; from getrusage where
    /proc is missing (then rss_bytes is the peak too)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {"rss_bytes": _kib(fields["VmRSS"]), "peak_rss_bytes": _kib(fields["VmHWM"])}
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"rss_bytes": peak, "peak_rss_bytes": peak}


def _kib(text: str) -> int:
    value, unit = text.split()
    if unit != "kB":
        raise ValueError(f"unexpected unit {unit!r}")
    return int(value) * 1024

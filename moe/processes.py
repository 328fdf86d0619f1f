"""Small process-table helpers shared by checkpoints (stale writers) and the shard launcher."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether a process with this id is running (it may belong to another user). A zombie,
    exited but not yet reaped by its parent, is not: it will never act again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return not os.path.isdir("/proc/self")  # gone meanwhile; without /proc, kill(0) is all we know
    except OSError:
        return True

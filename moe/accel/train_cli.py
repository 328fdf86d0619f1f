"""`moe train --backend jax`: one process, a local launcher (`--processes N`), or one host's
process of a multi-host run (`--coordinator`), see moe.accel.distributed."""

from __future__ import annotations

import os
from pathlib import Path

from moe.accel.distributed import (
    EXIT_LOST_PEER,
    Distributed,
    force_cpu_devices,
    initialize,
    isolate_native_output,
    launch_local,
    shutdown,
    supervise,
)
from moe.accel.layout import read_plan

JAX_ONLY = ("plan", "processes", "cpu_devices", "coordinator", "num_processes", "process_id")


def distributed_of(args) -> Distributed:
    return Distributed(args.coordinator, args.num_processes, args.process_id, args.heartbeat_timeout)


def check_flags(args) -> None:
    """The JAX-only flags need --backend jax; several processes need a named run folder."""
    if args.backend != "jax":
        used = [f"--{n.replace('_', '-')}" for n in JAX_ONLY if getattr(args, n, None) is not None]
        if used:
            raise ValueError(f"{', '.join(used)} need(s) --backend jax")
        return
    if args.processes is not None and args.processes < 1:
        raise ValueError(f"--processes must be >= 1, got {args.processes}")
    if args.processes is not None and args.processes > 1 and args.coordinator is not None and args.worker is None:
        raise ValueError("--processes starts its own processes on this machine; do not combine it with --coordinator")
    many = (args.processes or 1) > 1 or args.coordinator is not None
    if many and args.out is None:
        raise ValueError("a run of several processes needs --out (the same folder for every process)")


def launch(args) -> int | None:
    """The parent's job, if this process is one: the local launcher or a host's supervisor.
    None: this process trains (a single-process run or a worker)."""
    check_flags(args)
    if args.backend != "jax" or args.worker is not None:
        return None
    out = Path(args.out) if args.out is not None else None
    if (args.processes or 1) > 1:
        return launch_local(args.argv, args.processes, out, args.heartbeat_timeout)
    d = distributed_of(args)
    if d.enabled:
        return supervise(args.argv, d, out)
    return None


def train(args, config, data, source, out: Path, header: str, *, say, report) -> int:
    """Train in this process with JAX (joining the run first when it is a worker)."""
    d = distributed_of(args)
    layout = read_plan(args.plan) if args.plan else None
    force_cpu_devices(args.cpu_devices)
    if args.worker is not None:
        isolate_native_output(Path(args.worker))
    try:
        import jax

        from moe.accel.jax_train import train_with_jax
    except ImportError as e:
        raise ValueError(f"--backend jax needs JAX: pip install 'moe[accel]' ({e})") from None
    if d.enabled:
        initialize(d)
    main = jax.process_index() == 0
    echo = (lambda m: say(args, m)) if main else (lambda m: None)
    echo(header)
    try:
        result, trainer = train_with_jax(config, data, out, data_source=source, resume=args.resume,
                                         stop_at=args.stop_at, echo=echo, layout=layout)
        if jax.process_count() > 1:
            echo(share_line(trainer))
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() > 1:
            lost_peer(e)
        raise
    shutdown()  # every process leaves the run here; process 0 alone reports
    if not main:
        return 0
    return report(args, trainer.config, data, result, trainer.model)


def lost_peer(error: Exception) -> None:
    """A collective failed because another process is gone: say so in the native log (the
    parent reads it and prints the one line) and leave at once, without JAX's shutdown
    barrier, which would wait for the dead process."""
    os.write(2, f"moe: a collective failed: {error}\n".encode(errors="replace"))
    os._exit(EXIT_LOST_PEER)


def share_line(trainer) -> str:
    """How many training examples each process read (a collective): its share of every batch."""
    import numpy as np
    from jax.experimental import multihost_utils

    rows = np.asarray(multihost_utils.process_allgather(np.asarray(trainer.rows_read, np.int64)))
    total = trainer.steps_run * trainer.config.train.batch_size * trainer.n_micro
    return (f"{rows.size} processes read {', '.join(map(str, rows.tolist()))} of the {total} training "
            f"examples in the {trainer.steps_run} steps they ran (each only its own devices' rows)")

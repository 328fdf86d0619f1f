"""`moe shard serve` (also `python -m moe.sharding.serve`): one shard server from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import re
import sys
from typing import Any

from moe.sharding import session, wire
from moe.sharding.server import FAULT_OPS, ServerOptions, run_server


def parse_experts(text: str) -> tuple[int, ...]:
    """'0-31', '0,5,7' or '0-3,8' -> sorted distinct expert ids."""
    ids: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"experts must look like '0-31' or '0,5,7', got {text!r}")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"expert range {part!r} is empty (end before start)")
        ids.update(range(lo, hi + 1))
    if not ids:
        raise ValueError(f"experts must name at least one expert, got {text!r}")
    return tuple(sorted(ids))


def format_experts(ids: Any) -> str:
    """The shortest '0-3,8' spelling of a set of expert ids (for command lines)."""
    ids = sorted(int(i) for i in ids)
    runs, start = [], None
    for a, b in itertools.zip_longest(ids, ids[1:]):
        start = a if start is None else start
        if b != a + 1:
            runs.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ",".join(runs)


def parse_fault(text: str) -> tuple[str, int, int | None]:
    """'forward@7' -> ('forward', 7, 0); 'load@10:*' -> any generation; 'start@0' -> before READY
    on the launcher's first attempt. A testing aid, see ServerOptions.faults."""
    m = re.fullmatch(rf"({'|'.join(FAULT_OPS)})@(\d+)(?::(\d+|\*))?", text)
    if not m:
        raise ValueError(f"a fault must look like 'forward@7' or 'forward@7:*' (op@step[:generation]), got {text!r}")
    gen = m.group(3)
    return m.group(1), int(m.group(2)), None if gen == "*" else int(gen or 0)


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", default="tcp://127.0.0.1:5701",
                   help="address to listen on (default tcp://127.0.0.1:5701); anything but loopback/ipc "
                        "needs --curve-dir")
    p.add_argument("--experts", required=True, help="global expert ids hosted here: '0-31' or '0,5,7'")
    p.add_argument("--layers", type=int, required=True, help="number of MoE layers (one bank per layer)")
    p.add_argument("--d-model", type=int, required=True, help="model width d of the experts' rows")
    p.add_argument("--d-hidden", type=int, required=True, help="hidden width of each expert's FFN")
    p.add_argument("--activation", default="relu", choices=["relu", "gelu"], help="the experts' activation")
    p.add_argument("--secret-file", required=True, metavar="FILE",
                   help="the run secret (hex, mode 0600; `moe keys secret FILE` makes one); the coordinator "
                        "names the same file in shards.secret_file. '-' reads it from standard input")
    p.add_argument("--run", default=None,
                   help="run id to serve (default: adopt the run of the first 'load' the coordinator sends)")
    p.add_argument("--gen", type=int, default=0, help="starting generation (a restarted shard gets the new one)")
    p.add_argument("--index", type=int, default=0, help="this shard's number, used in its checkpoint file names")
    p.add_argument("--heartbeat", type=float, default=wire.HEARTBEAT_INTERVAL_S, metavar="S",
                   help="heartbeat interval; a peer is dead after 5 intervals of silence")
    p.add_argument("--root", default=None, help="refuse to save/load outside this folder")
    p.add_argument("--curve-dir", default=None, help="key folder from `moe keys generate` (turns CURVE on)")
    p.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--attempt", type=int, default=0, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--idle-exit", type=float, default=None, metavar="S",
                   help="exit after S seconds without any message from the coordinator")
    p.add_argument("--cpus", default=None, help="pin this process to these CPUs, e.g. '0' or '0,1'")
    p.add_argument("--fault", action="append", default=[], metavar="OP@STEP[:GEN]",
                   help="TESTING AID: SIGKILL this shard when it receives OP at STEP in generation GEN "
                        "(default 0, '*' any; OP 'start' dies before READY at launch attempt STEP); never "
                        "use in production")
    p.add_argument("--max-message-bytes", type=int, default=wire.DEFAULT_LIMITS.max_message_bytes, metavar="N",
                   help="largest message accepted (frames above it are dropped by ZeroMQ); default 512 MiB")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="what the shard logs to stderr")


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    for name in ("layers", "d_model", "d_hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heartbeat <= 0:
        raise ValueError(f"--heartbeat must be > 0, got {args.heartbeat}")
    return ServerOptions(
        bind=args.bind, experts=parse_experts(args.experts), n_layers=args.layers, d_model=args.d_model,
        d_hidden=args.d_hidden, secret=session.read_secret(args.secret_file), activation=args.activation,
        run=args.run, gen=args.gen, index=args.index, heartbeat_s=args.heartbeat, parent_pid=args.parent,
        idle_exit_s=args.idle_exit, root=args.root, curve_dir=args.curve_dir,
        faults=tuple(parse_fault(f) for f in args.fault), attempt=args.attempt,
        limits=dataclasses.replace(wire.DEFAULT_LIMITS, max_message_bytes=args.max_message_bytes),
    )


def cmd_shard_serve(args: argparse.Namespace) -> int:
    """Serve until shutdown/SIGTERM; exit 2 on a configuration the shard refuses."""
    logging.basicConfig(level=getattr(logging, args.log_level), stream=sys.stderr,
                        format=f"%(asctime)s shard[{args.index}] %(levelname)s %(message)s")
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    try:
        options = options_from_args(args)
        return run_server(options, ready=lambda line: print(line, flush=True))
    except ValueError as e:  # SecurityError and SecretError included
        print(f"moe shard serve: error: {e}", file=sys.stderr)
        return 2


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m moe.sharding.serve`."""
    p = argparse.ArgumentParser(prog="python -m moe.sharding.serve", description="moe expert shard server")
    add_serve_arguments(p)
    return cmd_shard_serve(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(serve_main())

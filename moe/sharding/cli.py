"""Command-line and trainer wiring: `moe shard serve`, `moe keys generate`, open_expert_groups."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import re
import secrets
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from moe.sharding import security, wire
from moe.sharding.launch import LocalShards
from moe.sharding.remote import (
    RemoteExperts,
    ShardFailure,
    ShardLinks,
    contiguous_placement,
    load_placement_file,
)
from moe.sharding.server import ServerOptions, parse_experts, parse_fault, run_server

READY_PING_S = 30.0


# ----------------------------------------------------------------------------- argparse
def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bind", default="tcp://127.0.0.1:5701",
                   help="address to listen on (default tcp://127.0.0.1:5701); anything but loopback/ipc "
                        "needs --curve-dir")
    p.add_argument("--experts", required=True, help="global expert ids hosted here: '0-31' or '0,5,7'")
    p.add_argument("--layers", type=int, required=True, help="number of MoE layers (one bank per layer)")
    p.add_argument("--d-model", type=int, required=True, help="model width (the coordinator's model.d_model)")
    p.add_argument("--d-hidden", type=int, required=True, help="expert hidden width (the coordinator's model.d_hidden)")
    p.add_argument("--activation", default="relu", choices=["relu", "gelu"], help="expert activation (default relu)")
    p.add_argument("--run", default=None,
                   help="run id to serve (default: adopt the run of the first 'load' the coordinator sends)")
    p.add_argument("--gen", type=int, default=0, help="starting generation (a restarted shard gets the new one)")
    p.add_argument("--index", type=int, default=0, help="this shard's number, used in its checkpoint file names")
    p.add_argument("--heartbeat", type=float, default=wire.HEARTBEAT_INTERVAL_S, metavar="S",
                   help="heartbeat interval; a peer is dead after 5 intervals of silence")
    p.add_argument("--root", default=None, help="refuse to save/load outside this folder")
    p.add_argument("--curve-dir", default=None, help="key folder from `moe keys generate` (turns CURVE on)")
    p.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)  # set by the launcher
    p.add_argument("--idle-exit", type=float, default=None, metavar="S",
                   help="exit after S seconds without any client message")
    p.add_argument("--cpus", default=None, help="pin this process to these CPUs, e.g. '0' or '0,1'")
    p.add_argument("--fault", action="append", default=[], metavar="OP@STEP",
                   help="TESTING AID: SIGKILL this shard when it receives OP at STEP in generation 0 "
                        "(e.g. forward@7); never use in production")
    p.add_argument("--max-message-bytes", type=int, default=wire.DEFAULT_LIMITS.max_message_bytes, metavar="N",
                   help="largest message accepted (frames above it are dropped by ZeroMQ); default 512 MiB")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log verbosity on stderr (default INFO)")


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    for name in ("layers", "d_model", "d_hidden"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.heartbeat <= 0:
        raise ValueError(f"--heartbeat must be > 0, got {args.heartbeat}")
    return ServerOptions(
        bind=args.bind, experts=parse_experts(args.experts), n_layers=args.layers, d_model=args.d_model,
        d_hidden=args.d_hidden, activation=args.activation, run=args.run, gen=args.gen, index=args.index,
        heartbeat_s=args.heartbeat, parent_pid=args.parent, idle_exit_s=args.idle_exit, root=args.root,
        curve_dir=args.curve_dir, faults=tuple(parse_fault(f) for f in args.fault),
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
    except ValueError as e:  # SecurityError included
        print(f"moe shard serve: error: {e}", file=sys.stderr)
        return 2


def cmd_keys_generate(args: argparse.Namespace) -> int:
    try:
        made = security.generate_keys(args.dir, tuple(args.client or ("client",)))
    except ValueError as e:
        print(f"moe keys generate: error: {e}", file=sys.stderr)
        return 2
    for name, path in made.items():
        print(f"{name}: {path} (public key {path.with_suffix('.key')})")
    print(f"allowed client keys: {Path(args.dir) / 'authorized'}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `shard serve` and `keys generate` to the `moe` parser (handlers return an exit code)."""
    shard = subparsers.add_parser("shard", help="run an expert shard server", description=(
        "Expert shards: processes that hold some experts of every MoE block for a coordinator "
        "(`moe train` with shards.endpoints). See `moe shard serve --help`."))
    ss = shard.add_subparsers(dest="shard_command", required=True, metavar="SUBCOMMAND")
    serve = ss.add_parser("serve", help="host experts for a coordinator (`moe train` with shards.endpoints)",
                          description="Serve a set of experts of every MoE layer over ZeroMQ (docs/PROTOCOL.md). "
                                      "Checkpoint parts are written into the folder the coordinator names, so "
                                      "with several hosts that folder must be on a shared file system.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_shard_serve)
    keys = subparsers.add_parser("keys", help="CURVE keys for shard servers", description=(
        "CURVE key pairs that authenticate and encrypt coordinator <-> shard traffic; required to bind "
        "a shard to anything but loopback or ipc. See `moe keys generate --help`."))
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    gen = ks.add_parser("generate", help="make a server keypair, client keypairs and the allowlist in DIR",
                        description="Write a server key pair, one key pair per --client and the allowlist of "
                                    "client public keys into DIR (pass it as --curve-dir / shards.curve_dir).")
    gen.add_argument("dir", help="folder to write the keys into")
    gen.add_argument("--client", action="append", default=None, metavar="NAME",
                     help="client key name (repeatable; default: client)")
    gen.set_defaults(func=cmd_keys_generate)


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m moe.sharding.server`."""
    p = argparse.ArgumentParser(prog="python -m moe.sharding.server", description="moe expert shard server")
    add_serve_arguments(p)
    return cmd_shard_serve(p.parse_args(argv))


# ----------------------------------------------------------------------------- trainer wiring
def _run_id(run_dir: str | Path) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(run_dir).resolve().name)[:40] or "run"
    return f"{name}-{secrets.token_hex(4)}"


def _placement(config, n_shards: int) -> np.ndarray:
    E, path = config.model.n_experts, config.shards.placement
    return load_placement_file(path, E, n_shards) if path else contiguous_placement(E, n_shards)


@contextlib.contextmanager
def open_expert_groups(
    config, run_dir: str | Path, echo: Callable[[str], None] = print, *, extra_args=None, env=None, cpus=None,
) -> Iterator[tuple[list[RemoteExperts], Callable[[Exception], None]]]:
    """One RemoteExperts per MoE block and the on_failure hook for Trainer.

    shards.local = N: start N shard processes (stopped on exit, whatever happens); on_failure
    restarts dead or stalled ones. shards.endpoints: use running shards (their hosted experts
    are asked with 'stats'); on_failure waits for them to answer again.
    """
    m, s = config.model, config.shards
    n_layers, E = len(m.gates), m.n_experts
    run = _run_id(run_dir)
    curve = security.ClientCurve.from_dir(s.curve_dir) if s.curve_dir else None
    with contextlib.ExitStack() as stack:
        shards = None
        if s.local:
            placement = _placement(config, s.local)
            lists = [np.flatnonzero(placement == i).tolist() for i in range(s.local)]
            shards = stack.enter_context(LocalShards(
                lists, n_layers=n_layers, d_model=m.d_model, d_hidden=m.d_hidden, activation=m.activation,
                run=run, transport=s.transport, log_dir=Path(run_dir) / "shards", root=Path(run_dir).resolve(),
                heartbeat_s=s.heartbeat_s, curve_dir=s.curve_dir, extra_args=extra_args, env=env, cpus=cpus,
                echo=echo))
            endpoints = shards.endpoints
        else:
            endpoints = list(s.endpoints)
        links = stack.enter_context(ShardLinks(
            endpoints, run=run, deadline_s=s.deadline_s, retries=s.retries, heartbeat_s=s.heartbeat_s,
            curve=curve, liveness=shards.alive if shards is not None else None))
        links.launcher = shards
        links.ping_all(READY_PING_S)
        if shards is None:
            placement = _discover_placement(links, E, config)
        groups = [RemoteExperts(links, layer, E, m.d_model, placement) for layer in range(n_layers)]

        def on_failure(err: Exception) -> None:
            bad = getattr(err, "shard", None)
            gen = links.gen + 1
            if shards is not None:
                for i in range(shards.n):
                    if shards.alive(i) is not None or i == bad:
                        echo(f"restarting shard {i} (generation {gen})")
                        shards.restart(i, gen)
            links.bump_generation()
            try:
                links.ping_all(READY_PING_S)
            except ShardFailure as e:
                raise ShardFailure(f"shards did not come back after a failure: {e}", shard=e.shard, op="ping",
                                   waited_s=e.waited_s) from err

        yield groups, on_failure


def _discover_placement(links: ShardLinks, n_experts: int, config) -> np.ndarray:
    """Expert -> shard from what each running shard hosts; every expert exactly once."""
    placement = np.full(n_experts, -1, dtype=np.int64)
    for i, ids in enumerate(links.hosted()):
        if ids.size and (ids.min() < 0 or ids.max() >= n_experts):
            raise ValueError(f"shard {i} ({links.endpoints[i]}) hosts experts up to {ids.max()}, "
                             f"the model has {n_experts}")
        twice = ids[placement[ids] >= 0]
        if twice.size:
            raise ValueError(f"experts {twice[:8].tolist()} are hosted by shard {i} and shard {placement[twice[0]]}")
        placement[ids] = i
    missing = np.flatnonzero(placement < 0)
    if missing.size:
        raise ValueError(f"no shard hosts experts {missing[:8].tolist()} (of {n_experts})")
    if config.shards.placement:
        want = load_placement_file(config.shards.placement, n_experts, links.n_shards)
        if not np.array_equal(want, placement):
            raise ValueError(f"the running shards do not host experts as {config.shards.placement} places them")
    return placement.astype(np.int32)

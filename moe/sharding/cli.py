"""The sharding commands of `moe`: `moe shard serve`, `moe keys generate`, `moe keys secret`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe.sharding import security, session
from moe.sharding.serve import add_serve_arguments, cmd_shard_serve


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


def cmd_keys_secret(args: argparse.Namespace) -> int:
    try:
        path = session.write_secret(args.file, session.new_secret())
    except (ValueError, OSError) as e:
        print(f"moe keys secret: error: {e}", file=sys.stderr)
        return 2
    print(f"run secret: {path} (mode 0600): give it to every `moe shard serve --secret-file` and to "
          f"shards.secret_file")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `shard serve` and `keys generate|secret` to the `moe` parser (handlers return an exit code)."""
    shard = subparsers.add_parser("shard", help="run an expert shard server", description=(
        "Expert shards: processes that hold some experts of every MoE block for a coordinator "
        "(`moe train` with shards.endpoints; docs/PROTOCOL.md). See `moe shard serve --help`."))
    ss = shard.add_subparsers(dest="shard_command", required=True, metavar="SUBCOMMAND")
    serve = ss.add_parser("serve", help="host experts for a coordinator (`moe train` with shards.endpoints)",
                          description="Serve a set of experts of every MoE layer over ZeroMQ (docs/PROTOCOL.md) "
                                      "to the one coordinator that proves the run secret. Checkpoint parts are "
                                      "written into the folder the coordinator names, so with several hosts that "
                                      "folder must be on a shared file system.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_shard_serve)
    keys = subparsers.add_parser("keys", help="CURVE keys and run secrets for shard servers", description=(
        "The keys shard servers and coordinators authenticate with: CURVE key pairs that authenticate "
        "and encrypt coordinator <-> shard traffic (required to bind a shard to anything but loopback "
        "or ipc), and run secrets. See `moe keys generate --help` and `moe keys secret --help`."))
    ks = keys.add_subparsers(dest="keys_command", required=True, metavar="SUBCOMMAND")
    gen = ks.add_parser("generate", help="make a server keypair, client keypairs and the allowlist in DIR",
                        description="Write a server key pair, one key pair per --client and the allowlist of "
                                    "client public keys into DIR (pass it as --curve-dir / shards.curve_dir).")
    gen.add_argument("dir", help="folder to write the keys into")
    gen.add_argument("--client", action="append", default=None, metavar="NAME",
                     help="client key name (repeatable; default: client)")
    gen.set_defaults(func=cmd_keys_generate)
    sec = ks.add_parser("secret", help="make a run secret file (mode 0600) for shards started by hand",
                        description="A random 32-byte secret, hex, in a new file only its owner can read.")
    sec.add_argument("file", help="the file to create (never overwritten)")
    sec.set_defaults(func=cmd_keys_secret)

"""The trainer's side of sharding: open the shards of a run and repair them after a failure.

`open_expert_groups(config, run_dir)` yields one RemoteExperts per MoE block and the
`on_failure` hook the Trainer calls before it rolls back. With `shards.local = N` it starts N
shard processes with a fresh per-run secret (stopped on exit, whatever happens) and restarts
dead or stalled ones; with `shards.endpoints` it uses running shards (`moe shard serve`),
proves `shards.secret_file` to them and learns what each hosts with 'stats'.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from moe.sharding import security, session
from moe.sharding.launch import START_ATTEMPTS, LaunchError, LocalShards
from moe.sharding.links import Access, ShardError, ShardFailure, ShardLinks
from moe.sharding.remote import RemoteExperts, contiguous_placement, load_placement_file

READY_PING_S = 30.0  # how long a repaired shard may take to answer again


class ShardSetupError(ValueError):
    """The shards of a run could not be reached or started (a one-line user-facing error)."""


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

    Raises ShardSetupError (one line) when the shards cannot be started or reached within
    `shards.deadline_s` of being asked, or refuse the secret.
    """
    m, s = config.model, config.shards
    n_layers, E = len(m.gates), m.n_experts
    run = _run_id(run_dir)
    curve = security.ClientCurve.from_dir(s.curve_dir) if s.curve_dir else None
    if s.local:
        secret = session.new_secret()
    elif s.secret_file:
        secret = session.read_secret(s.secret_file)
    else:
        raise ShardSetupError("shards.endpoints needs shards.secret_file (the file each `moe shard serve "
                              "--secret-file` reads; `moe keys secret FILE` makes one)")
    with contextlib.ExitStack() as stack:
        shards = None
        try:
            if s.local:
                placement = _placement(config, s.local)
                lists = [np.flatnonzero(placement == i).tolist() for i in range(s.local)]
                shards = stack.enter_context(LocalShards(
                    lists, n_layers=n_layers, d_model=m.d_model, d_hidden=m.d_hidden, activation=m.activation,
                    run=run, secret=secret, transport=s.transport, log_dir=Path(run_dir) / "shards",
                    root=Path(run_dir).resolve(), heartbeat_s=s.heartbeat_s, curve_dir=s.curve_dir,
                    extra_args=extra_args, env=env, cpus=cpus, echo=echo))
                endpoints = shards.endpoints
            else:
                endpoints = list(s.endpoints)

            def connect() -> ShardLinks:
                return ShardLinks(endpoints, run=run, access=Access(secret, curve), deadline_s=s.deadline_s,
                                  retries=s.retries, heartbeat_s=s.heartbeat_s,
                                  liveness=shards.alive if shards is not None else None)

            links = stack.enter_context(_connect(connect, shards, echo))
        except (LaunchError, ShardFailure, ShardError) as e:
            raise ShardSetupError(f"could not start the shards: {e}") from None
        links.launcher = shards
        if shards is None:
            placement = _discover_placement(links, E, config)
        groups = [RemoteExperts(links, layer, E, m.d_model, placement) for layer in range(n_layers)]

        def on_failure(err: Exception) -> None:
            """Restart dead or stalled launched shards, then readmit every link in a new generation."""
            bad = getattr(err, "shard", None)
            gen = links.gen + 1
            restarted = []
            try:
                if shards is not None:
                    for i in range(shards.n):
                        if shards.alive(i) is not None or i == bad:
                            echo(f"restarting shard {i} (generation {gen})")
                            shards.restart(i, gen)
                            restarted.append(i)
                links.bump_generation(restarted)
                links.ping_all(READY_PING_S)
            except (ShardFailure, LaunchError) as e:  # failed again while repairing: the caller retries
                raise ShardFailure(f"shards did not come back after a failure: {e}", shard=getattr(e, "shard", bad),
                                   op="restart", waited_s=getattr(e, "waited_s", 0.0)) from err

        yield groups, on_failure


def _connect(connect: Callable[[], ShardLinks], shards: LocalShards | None, echo: Callable[[str], None]) -> ShardLinks:
    """Admitted links to every shard. A launched shard that dies or stalls after its READY line
    but before its links are admitted (nothing has run yet) is started again, like one killed
    before READY (START_ATTEMPTS in all); shards we did not launch are not ours to restart."""
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            return connect()
        except ShardFailure as e:
            if shards is None or attempt == START_ATTEMPTS:
                raise
            echo(f"shard {e.shard} failed before the run began ({e}); starting it again")
            shards.restart(e.shard, gen=0)
    raise AssertionError("unreachable")  # pragma: no cover


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

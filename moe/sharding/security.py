"""Who may connect to a shard: loopback/ipc with the run's PLAIN password, CURVE with a
client-key allowlist for anything else (both checked by a ZAP handler before any message).

Key folder layout (`moe keys generate DIR`, made with zmq.auth.create_certificates):

    DIR/server.key, DIR/server.key_secret     the shards' keypair (public key given to clients)
    DIR/client.key, DIR/client.key_secret     the coordinator's keypair
    DIR/authorized/client.key                 public keys a shard accepts (its ZAP allowlist)

Copy only the files each side needs: shards need server.key_secret and authorized/, the
coordinator needs client.key_secret and server.key. Certificate files are ZPL text, parsed by
zmq.auth.load_certificate (no object deserialisation).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from moe.sharding.session import PLAIN_USER

MIN_LIBZMQ = (4, 3, 5)
LOCAL_HOSTS = ("localhost",)


class SecurityError(ValueError):
    """A configuration that would expose a shard, or a libzmq that cannot protect it."""


def check_curve_support() -> None:
    """Refuse CURVE on libzmq older than 4.3.5 (known CVEs) or built without CURVE."""
    have = zmq.zmq_version_info()
    if tuple(have) < MIN_LIBZMQ:
        raise SecurityError(
            f"authentication needs libzmq >= {'.'.join(map(str, MIN_LIBZMQ))}, got {zmq.zmq_version()}"
        )
    if not zmq.has("curve"):
        raise SecurityError(f"authentication needs libzmq built with CURVE; libzmq {zmq.zmq_version()} has none")


def is_local_endpoint(endpoint: str) -> bool:
    """ipc://, inproc:// and tcp on a loopback address stay on this machine."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:/]+):(\d+|\*)", endpoint)
    if m is None:
        return False
    host = m.group(1).strip("[]")
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a host name: not provably local


def check_bind(endpoint: str, *, curve: bool) -> None:
    """A non-local bind is allowed only with CURVE and a client allowlist."""
    if not isinstance(endpoint, str) or "://" not in endpoint:
        raise SecurityError(f"bind address must look like tcp://127.0.0.1:5701 or ipc:///path, got {endpoint!r}")
    if not is_local_endpoint(endpoint) and not curve:
        raise SecurityError(
            f"refusing to bind {endpoint}: a non-loopback address needs CURVE keys "
            f"(--curve-dir, made by `moe keys generate DIR`); use tcp://127.0.0.1:PORT or ipc:// otherwise"
        )
    if curve:
        check_curve_support()


def generate_keys(folder: str | Path, clients: tuple[str, ...] = ("client",)) -> dict[str, Path]:
    """Make the server keypair, one keypair per client name, and the allowlist of client keys."""
    check_curve_support()
    folder = Path(folder)
    allowed = folder / "authorized"
    allowed.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in ("server", *clients):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
            raise ValueError(f"key names must be letters, digits, '_' or '-', got {name!r}")
        if (folder / f"{name}.key_secret").exists():
            raise ValueError(f"{folder / (name + '.key_secret')} exists; refusing to overwrite a key")
        public, secret = zmq.auth.create_certificates(str(folder), name)
        Path(secret).chmod(0o600)
        out[name] = Path(secret)
        if name != "server":
            shutil.copy(public, allowed / Path(public).name)
    return out


def _load_secret(path: Path) -> tuple[bytes, bytes]:
    if not path.is_file():
        raise SecurityError(f"key file {str(path)!r} does not exist (make keys with `moe keys generate DIR`)")
    public, secret = zmq.auth.load_certificate(str(path))
    if secret is None:
        raise SecurityError(f"{str(path)!r} holds no secret key")
    return public, secret


@dataclass(frozen=True)
class ServerCurve:
    """The shard's keypair and the public keys of the clients it accepts."""

    public: bytes
    secret: bytes
    allowed: frozenset[bytes]

    @classmethod
    def from_dir(cls, folder: str | Path) -> ServerCurve:
        check_curve_support()
        folder = Path(folder)
        public, secret = _load_secret(folder / "server.key_secret")
        allowed_dir = folder / "authorized"
        keys = set()
        for f in sorted(allowed_dir.glob("*.key")) if allowed_dir.is_dir() else ():
            keys.add(zmq.auth.load_certificate(str(f))[0])
        if not keys:
            raise SecurityError(f"no allowed client keys in {str(allowed_dir)!r}: every client would be refused")
        return cls(public, secret, frozenset(keys))

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_server = True


@dataclass(frozen=True)
class ClientCurve:
    """The coordinator's keypair and the shards' public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    @classmethod
    def from_dir(cls, folder: str | Path, name: str = "client") -> ClientCurve:
        check_curve_support()
        folder = Path(folder)
        public, secret = _load_secret(folder / f"{name}.key_secret")
        server_file = folder / "server.key"
        if not server_file.is_file():
            raise SecurityError(f"the shards' public key {str(server_file)!r} does not exist")
        server_public = zmq.auth.load_certificate(str(server_file))[0]
        return cls(public, secret, server_public)

    def apply(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


class _AllowList:
    """ZAP credentials callback: accept listed client keys, log every refusal."""

    def __init__(self, allowed: frozenset[bytes], log: logging.Logger) -> None:
        self.allowed, self.log = allowed, log

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.allowed
        if not ok:
            self.log.warning("refused a client with unknown CURVE key %s", key.decode("ascii", "replace"))
        return ok


def start_authenticator(ctx: zmq.Context, log: logging.Logger, *, curve: ServerCurve | None = None,
                        password: bytes | None = None) -> Any:
    """A ZAP handler thread for ctx: CURVE accepting only curve.allowed, or PLAIN accepting only
    user "moe" with `password` (the run's transport password). stop() it when done."""
    from zmq.auth.thread import ThreadAuthenticator

    class _Authenticator(ThreadAuthenticator):
        def _authenticate_plain(self, domain: str, username: str, pw: str) -> tuple[bool, bytes]:
            # Constant-time, and never logs the password (the stock handler does at DEBUG).
            ok = password is not None and username == PLAIN_USER.decode() and hmac.compare_digest(
                pw.encode(), password)
            if not ok:
                log.warning("refused a connection: wrong transport password (PLAIN)")
            return ok, b"OK" if ok else b"Invalid credentials"

    auth = _Authenticator(ctx, log=log.getChild("zap"))
    auth.start()
    if curve is not None:
        auth.configure_curve_callback("*", credentials_provider=_AllowList(curve.allowed, log))
    else:
        auth.configure_plain("*", {PLAIN_USER.decode(): "unused"})  # turns PLAIN checks on
    return auth


def apply_plain_server(sock: zmq.Socket) -> None:
    sock.plain_server = True


def apply_plain_client(sock: zmq.Socket, password: bytes) -> None:
    sock.plain_username = PLAIN_USER
    sock.plain_password = password

"""One coordinator session per shard: a per-run secret, proven before any other op.

The launcher makes a 32-byte secret for each run (`new_secret`) and hands it to its shards on
their standard input, never on a command line or in the environment; on other hosts
`moe shard serve --secret-file FILE` reads it from a file only its owner can read. The secret
is proven twice (docs/PROTOCOL.md §7):

- transport: every bind without CURVE uses ZeroMQ's PLAIN mechanism with user "moe" and the
  password `transport_password(secret)`, checked by the shard's ZAP handler, so a peer
  without it cannot deliver a single message (nothing of it is buffered or parsed);
- session: an HMAC-SHA256 challenge and response in both directions on every link

      client -> hello  meta.nonce = C                        (64 hex digits: 32 random bytes)
      shard  -> ok     meta.nonce = S
      client -> auth   meta.proof = HMAC(secret, "moe-shard-auth/2\\nclient\\n" run "\\n" S "\\n" C),
                       meta.session = the session to join (absent: start a new one)
      shard  -> ok     meta.session = K (32 hex digits),
                       meta.proof = HMAC(secret, "moe-shard-auth/2\\nshard\\n" run "\\n" C "\\n" S "\\n" K)

  so the client also knows it talks to the real shard. Anything else from a link that has not
  been admitted, and any failed proof, gets the same refusal, which reveals nothing.

`Admission` is the shard's record of admitted links (ZeroMQ routing ids) and sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import sys
from collections import OrderedDict
from pathlib import Path

SECRET_BYTES = 32
PLAIN_USER = b"moe"
REFUSAL = "unauthorized: prove the run secret with 'hello' and 'auth' first"
NO_SESSION = "no_session"  # error meta 'reason' for a right proof that asked to join: there is none
OTHER_SESSION = "other_session"  # ... or another coordinator's session is current
_DOMAIN = "moe-shard-auth/2"


class SecretError(ValueError):
    """A secret file that is missing, malformed or readable by others."""


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def new_nonce() -> str:
    return secrets.token_hex(32)


def new_routing_id() -> bytes:
    """A random 16-byte ZeroMQ routing id (libzmq reserves ids that start with a zero byte)."""
    rid = bytearray(secrets.token_bytes(16))
    rid[0] |= 0x80
    return bytes(rid)


def transport_password(secret: bytes) -> bytes:
    """The PLAIN password: derived from the secret, so the secret itself never crosses the wire."""
    return hmac.new(secret, b"moe-shard-transport/2", hashlib.sha256).hexdigest().encode()


def client_proof(secret: bytes, run: str, shard_nonce: str, client_nonce: str) -> str:
    return _mac(secret, "client", run, shard_nonce, client_nonce)


def shard_proof(secret: bytes, run: str, client_nonce: str, shard_nonce: str, session: str) -> str:
    return _mac(secret, "shard", run, client_nonce, shard_nonce, session)


def _mac(secret: bytes, role: str, *fields: str) -> str:
    message = "\n".join((_DOMAIN, role, *fields)).encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# ----------------------------------------------------------------------------- secret files


def parse_secret(text: str, where: str) -> bytes:
    text = text.strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise SecretError(f"{where} must hold the run secret as hex digits, got {len(text)} other characters") from None
    if len(secret) < SECRET_BYTES:
        raise SecretError(f"{where} must hold at least {SECRET_BYTES} bytes ({2 * SECRET_BYTES} hex digits), "
                          f"got {len(secret)}")
    return secret


def read_secret(path: str) -> bytes:
    """The run secret from a file only its owner can read, or from standard input for '-'."""
    if path == "-":
        return parse_secret(sys.stdin.readline(), "standard input")
    p = Path(path)
    try:
        info = p.stat()
    except OSError:
        raise SecretError(f"secret file {path!r} does not exist (make one with `moe keys secret FILE`)") from None
    if not stat.S_ISREG(info.st_mode):
        raise SecretError(f"secret file {path!r} is not a regular file")
    if info.st_mode & 0o077:
        raise SecretError(f"secret file {path!r} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
                          f"chmod 600 it")
    return parse_secret(p.read_text(errors="replace"), f"secret file {path!r}")


def write_secret(path: str | Path, secret: bytes) -> Path:
    """Create a new 0600 secret file (never overwrites one)."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretError(f"{str(p)!r} exists; refusing to overwrite a secret") from None
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    return p


# ----------------------------------------------------------------------------- the shard side


class Admission:
    """Links (routing ids) admitted to the current coordinator session, and pending challenges.

    A successful `auth` with `new` (or the first one) starts a new session: every other link
    loses its admission and the caller empties the replay cache. Both tables are bounded, so
    a flood of handshakes cannot grow memory.
    """

    MAX_PENDING = 256
    MAX_LINKS = 64

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) < SECRET_BYTES:
            raise SecretError(f"a shard needs the run secret ({SECRET_BYTES} bytes or more); give it with --secret-file")
        self._secret = secret
        self.pending: OrderedDict[bytes, tuple[str, str]] = OrderedDict()  # ident -> (client, shard nonce)
        self.links: OrderedDict[bytes, None] = OrderedDict()
        self.session: str | None = None  # id of the current session
        self.sessions = 0

    def admitted(self, ident: bytes) -> bool:
        return ident in self.links

    def hello(self, ident: bytes, client_nonce: str) -> str:
        """A fresh challenge for this link (replacing an earlier one)."""
        nonce = new_nonce()
        self.pending.pop(ident, None)
        self.pending[ident] = (client_nonce, nonce)
        while len(self.pending) > self.MAX_PENDING:
            self.pending.popitem(last=False)
        return nonce

    def auth(self, ident: bytes, run: str, proof: str, join: str | None) -> tuple[str, str] | str | None:
        """(the shard's proof, the session id) when admitted; else None (the generic refusal),
        or, for a client whose proof was right, why it may not join: NO_SESSION (this shard
        has none, e.g. it was restarted: start one) or OTHER_SESSION (another coordinator's
        session is current: a displaced coordinator cannot come back). `join` None starts a
        new session: every other link loses its admission. One try per challenge."""
        challenge = self.pending.pop(ident, None)
        if challenge is None or not same(proof, client_proof(self._secret, run, challenge[1], challenge[0])):
            return None
        if join is not None and self.session is None:
            return NO_SESSION
        if join is not None and not same(join, self.session):
            return OTHER_SESSION
        if join is None:
            self.links.clear()
            self.session = secrets.token_hex(16)
            self.sessions += 1
        self.links.pop(ident, None)
        self.links[ident] = None
        while len(self.links) > self.MAX_LINKS:
            self.links.popitem(last=False)
        return shard_proof(self._secret, run, challenge[0], challenge[1], self.session), self.session

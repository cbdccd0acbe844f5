"""CURVE keys and the gatekeeper of a run's remote endpoints (ZeroMQ CURVE + a ZAP handler).

A key directory, made by `flux keys DIR [--client NAME ...]`:

    DIR/server.key            the run's public key: copy it to every remote generator machine
    DIR/server.key_secret     the run's key pair: stays on the training machine
    DIR/authorized/NAME.key   public keys the run lets in (add or delete files at any time, no restart)
    DIR/NAME.key_secret       a client key pair: copy it (with server.key) to the remote machine

Every remote endpoint of a run (controller ROUTER and PUB, buffer PULL, weight server) is a CURVE
server socket, and each process that binds one runs a `Gatekeeper` (the ZAP handler of its ZeroMQ
context): a client whose public key is not in DIR/authorized never completes the handshake, so it
gets no message at all (no prompts, no weights), and the refusal is logged with its address and key.
Local actors of the run keep their own 127.0.0.1 endpoints, without CURVE (docs/remote.md).
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

SERVER = "server"
AUTHORIZED = "authorized"


class KeysError(ValueError):
    """A missing or unreadable key file; the message says which and how to make one."""


def make_keys(key_dir: str | Path, clients: list[str] | tuple[str, ...] = ("client",)) -> dict[str, Path]:
    """Create (or complete) a key directory: the server pair once, and a pair per client name.

    Existing keys are kept, so `flux keys DIR --client another` adds a client to a live run's keys.
    Returns {"server": public key file, NAME: client secret file, ...}.
    """
    key_dir = Path(key_dir)
    (key_dir / AUTHORIZED).mkdir(parents=True, exist_ok=True)
    out = {}
    for name in [SERVER, *clients]:
        if not name or "/" in name or name.startswith(".") or (name == SERVER and name in clients):
            raise KeysError(f"bad key name {name!r}")
        secret = key_dir / f"{name}.key_secret"
        if not secret.exists():
            public, secret_file = zmq.auth.create_certificates(key_dir, name)
            os.chmod(secret_file, 0o600)
            if name != SERVER:  # a client's public key is what the run lets in
                os.replace(public, key_dir / AUTHORIZED / f"{name}.key")
        out[name] = key_dir / (f"{name}.key" if name == SERVER else f"{name}.key_secret")
    return out


def load_pair(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a `.key_secret` file."""
    path = Path(path)
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeysError(f"{path}: not a readable key pair ({e}); make keys with `flux keys DIR`") from None
    if not secret:
        raise KeysError(f"{path}: holds no secret key (pass the .key_secret file)")
    return public, secret


def load_public(path: str | Path) -> bytes:
    """The public z85 key of a `.key` (or `.key_secret`) file."""
    path = Path(path)
    try:
        return zmq.auth.load_certificate(path)[0]
    except (OSError, ValueError) as e:
        raise KeysError(f"{path}: not a readable public key ({e})") from None


def check_key_dir(key_dir: str | Path) -> Path:
    """The key directory of a run with remote endpoints: it must hold the server pair."""
    if not str(key_dir):
        raise KeysError("net.remote needs net.keys, a key directory made by `flux keys DIR`")
    key_dir = Path(key_dir).resolve()
    load_pair(key_dir / f"{SERVER}.key_secret")
    if not (key_dir / AUTHORIZED).is_dir():
        raise KeysError(f"{key_dir}: no {AUTHORIZED}/ directory of client keys; make one with `flux keys DIR`")
    return key_dir


def client_keys(key_file: str | Path, server_key: str | Path | None = None) -> dict:
    """What a remote generator's sockets need: its pair and the run's public key (default: server.key
    next to `key_file`)."""
    public, secret = load_pair(key_file)
    server = load_public(server_key or Path(key_file).parent / f"{SERVER}.key")
    return {"public": public.decode(), "secret": secret.decode(), "server": server.decode()}


def secure_client(sock: zmq.Socket, curve: dict) -> None:
    """Make `sock` a CURVE client with the keys of `client_keys`; a no-op for an empty dict (local)."""
    if curve:
        sock.curve_publickey = curve["public"].encode()
        sock.curve_secretkey = curve["secret"].encode()
        sock.curve_serverkey = curve["server"].encode()


def curve_socket(ctx: zmq.Context, kind: int, key_dir: str | Path) -> zmq.Socket:
    """A socket of `kind` that accepts only CURVE clients (the context's Gatekeeper says which)."""
    public, secret = load_pair(Path(key_dir) / f"{SERVER}.key_secret")
    sock = ctx.socket(kind)
    sock.curve_server = True
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.zap_domain = b"flux"
    return sock


class Gatekeeper(ThreadAuthenticator):
    """The ZAP handler of one process: lets in the keys of DIR/authorized, logs every refusal.

    The directory is read again at every handshake, so a key added to (or deleted from) it counts from
    the next connection on. A connection made before a key was deleted stays open at the ZeroMQ level:
    the actors that own CURVE sockets ask `allowed(key)` of every message's sender (its ZAP User-Id) and
    cut off a removed key (docs/remote.md). Start it before binding CURVE sockets, stop it before
    `ctx.term()`.
    """

    def __init__(self, ctx: zmq.Context, key_dir: str | Path, log: logging.Logger):
        super().__init__(ctx, log=logging.getLogger("flux.zap"))
        self.authorized = Path(key_dir) / AUTHORIZED
        self.flux_log = log
        self.refused = 0
        self._keys: set[bytes] = set()
        self._read_at = -math.inf
        self._seen: set[bytes] = set()
        self._address = "?"

    def start(self) -> None:
        super().start()
        self.configure_curve_callback("flux", credentials_provider=self)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        # One ZAP request at a time: remember who is asking, for the refusal line.
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    def reload(self) -> set[bytes]:
        """The keys in DIR/authorized now."""
        try:
            self._keys = set(zmq.auth.load_certificates(self.authorized))
        except OSError:
            self._keys = set()
        self._read_at = time.monotonic()
        return self._keys

    def allowed(self, key: str, max_age_s: float = 0.5) -> bool:
        """Is the z85 public key `key` still authorized? (The directory is read at most every max_age_s.)"""
        keys = self._keys if time.monotonic() - self._read_at < max_age_s else self.reload()
        return key.encode() in keys

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP credentials check of one CURVE client (z85 public key)."""
        if key in self.reload():
            if key not in self._seen:  # once per key: a generator opens several connections
                self._seen.add(key)
                self.flux_log.info("CURVE client %s let in (key %s)", self._address, key.decode())
            return True
        self.refused += 1
        self.flux_log.warning("refused a CURVE client at %s: its key %s is not in %s (no prompts, no weights)",
                              self._address, key.decode(), self.authorized)
        return False

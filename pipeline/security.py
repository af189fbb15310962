"""Authenticated, encrypted links between stages on other hosts: ZeroMQ CURVE (zmq.auth).

`lineguard keys DIR` writes one key pair per role (producer, worker, postprocess, sink, client):
``<role>.key`` (public, shareable) and ``<role>.key_secret`` (keep it on the host of that role).
A stage started with ``--keys DIR`` then

- on every socket it binds, is a CURVE server with its own key pair, and accepts only clients
  whose public key lies in DIR (zmq.auth ThreadAuthenticator); every refused handshake is
  counted and logged (a socket monitor's HANDSHAKE_FAILED_AUTH / _PROTOCOL events);
- on every socket it connects, is a CURVE client with its own key pair, and talks only to a
  server whose public key is DIR/<that server's role>.key.

So a stage without a known key is refused, and a stage cannot be impersonated without its
secret key. `lineguard run` keeps its own stages on ipc in a private folder and needs none of it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import zmq

from engines.errors import ConfigError

ROLES = ("producer", "worker", "postprocess", "sink", "client")
log = logging.getLogger("lineguard.security")


def write_keys(folder: str | Path, roles: tuple[str, ...] = ROLES) -> list[Path]:
    """One CURVE key pair per role in `folder`; returns the public key files."""
    import zmq.auth

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for role in roles:
        for old in (folder / f"{role}.key", folder / f"{role}.key_secret"):
            old.unlink(missing_ok=True)
        public, secret = zmq.auth.create_certificates(str(folder), role)
        Path(secret).chmod(0o600)
        out.append(Path(public))
    return out


@dataclasses.dataclass
class Refusals:
    """Handshakes a stage refused, by reason (shared by its sockets' monitors)."""

    counts: dict = dataclasses.field(default_factory=dict)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, reason: str) -> None:
        with self.lock:
            self.counts[reason] = self.counts.get(reason, 0) + 1


class Curve:
    """The CURVE settings of one stage: its role's key pair and the folder of known public keys."""

    def __init__(self, folder: str | Path, role: str):
        import zmq.auth

        self.folder = Path(folder)
        if role not in ROLES:
            raise ConfigError(f"unknown key role {role!r}; valid: {', '.join(ROLES)}")
        secret = self.folder / f"{role}.key_secret"
        if not secret.is_file():
            raise ConfigError(f"{secret} not found: --keys needs this stage's secret key; write the keys with "
                              f"lineguard keys {self.folder}")
        self.public, self.secret = zmq.auth.load_certificate(str(secret))
        self.role = role
        self.refusals = Refusals()
        self._auth = None
        self._watched: list[tuple[zmq.Socket, threading.Thread]] = []

    def server_key(self, role: str) -> bytes:
        path = self.folder / f"{role}.key"
        if not path.is_file():
            raise ConfigError(f"{path} not found: connecting to a {role} needs its public key in --keys")
        import zmq.auth

        return zmq.auth.load_certificate(str(path))[0]

    def serve(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        """Make a socket (before bind) a CURVE server accepting the known public keys only."""
        if self._auth is None:
            from zmq.auth.thread import ThreadAuthenticator

            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(self.folder))
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = self.secret, self.public, True
        self._watch(ctx, sock)

    def connect_to(self, sock: zmq.Socket, server_role: str) -> None:
        """Make a socket (before connect) a CURVE client of a server of `server_role`."""
        sock.curve_secretkey, sock.curve_publickey = self.secret, self.public
        sock.curve_serverkey = self.server_key(server_role)

    def _watch(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message

        events = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        monitor = sock.get_monitor_socket(events)
        refusals = self.refusals

        def watch():
            try:
                while True:
                    event = recv_monitor_message(monitor)
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:
                        return
                    reason = "unauthorised" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "bad_handshake"
                    refusals.add(reason)
                    log.warning("refused a connection to %s (%s)", event.get("endpoint", b"?"), reason)
            except zmq.ZMQError:
                return
            finally:
                monitor.close(linger=0)

        thread = threading.Thread(target=watch, name="curve-monitor", daemon=True)
        thread.start()
        self._watched.append((sock, thread))

    def close(self) -> None:
        """Stop the monitors and the authenticator (before the stage closes its sockets and context)."""
        for sock, thread in self._watched:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
            thread.join(timeout=5)
        self._watched.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None


def curve_for(keys: str | Path | None, role: str) -> Curve | None:
    return None if keys is None else Curve(keys, role)

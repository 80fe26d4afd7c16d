"""How every Parallax process connects to NATS: :class:`NatsOptions` (servers, credentials, TLS, the
JetStream domain of the registry), :func:`connect` (a bounded first connect, endless reconnects
after, one-line logs) and :func:`on_reconnect` (what a process does when its connection is back). The
command-line flags that build the options are in :mod:`.cli`."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NATS

from .errors import NatsUnreachable, UsageError

log = logging.getLogger(__name__)
FIRST_CONNECT_S = 10.0
DEFAULT_URL = "nats://127.0.0.1:4222"
SCHEMES = ("nats", "tls", "ws", "wss")
REFUSED = (nats.errors.AuthorizationError, nats.errors.SecureConnRequiredError, nats.errors.SecureConnWantedError,
           nats.errors.SecureConnFailedError, ssl.SSLError)  # retrying will not help
_DOMAIN = re.compile(r"^[A-Za-z0-9_-]+$")  # a JetStream domain is one subject token
_RECONNECT_CALLBACKS: weakref.WeakKeyDictionary[NATS, list[Callable[[], None]]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class NatsOptions:
    """Where and as whom to connect. ``servers``: one or more URLs (nats-py tries them all and
    reconnects to another when one goes away); ``creds`` (a JWT creds file) or ``nkey`` (an nkey
    seed file); ``tls_ca`` to verify the server, ``tls_cert``+``tls_key`` for mutual TLS;
    ``js_domain``: the JetStream domain that holds the registry bucket (None: the server's own).
    Bad values raise :class:`UsageError` (exit 2)."""

    servers: tuple[str, ...] | str = (DEFAULT_URL,)  # a str: comma-separated, as --nats takes them
    creds: Path | None = None
    nkey: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    js_domain: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.servers, str):
            object.__setattr__(self, "servers", parse_servers(self.servers))
        if not self.servers:
            raise UsageError("--nats needs at least one server URL")
        for url in self.servers:
            check_url(url)
        for flag in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key"):
            path = getattr(self, flag)
            if path is not None:
                object.__setattr__(self, flag, readable_file(f"--{flag.replace('_', '-')}", path))
        if self.creds is not None and self.nkey is not None:
            raise UsageError("--creds and --nkey are two ways to authenticate: give one")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UsageError("--tls-cert and --tls-key go together (mutual TLS)")
        if self.js_domain is not None and not _DOMAIN.match(self.js_domain):
            raise UsageError(f"--js-domain must be letters, digits, '-' or '_', got {self.js_domain!r}")
        if self.creds is not None:
            check_creds(self.creds)
        if self.nkey is not None:
            check_seed(self.nkey)
        self.tls_context()  # unreadable certificates or keys fail here, not at the first connect

    @property
    def url(self) -> str:
        """The servers as ``--nats`` takes them (comma-separated), for logs and messages."""
        return ",".join(self.servers)

    @property
    def uses_tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    def tls_context(self) -> ssl.SSLContext | None:
        """The client's TLS context (the CA to trust, the client certificate), or None without TLS flags
        (a ``tls://`` URL then uses the system's CAs)."""
        if not self.uses_tls:
            return None
        try:
            context = ssl.create_default_context(cafile=None if self.tls_ca is None else str(self.tls_ca))
            if self.tls_cert is not None:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key))
        except (ssl.SSLError, ValueError) as e:
            raise UsageError(f"cannot use the TLS files ({self._tls_files()}): {e}") from None
        return context

    def _tls_files(self) -> str:
        return ", ".join(str(p) for p in (self.tls_ca, self.tls_cert, self.tls_key) if p is not None)

    def connect_kwargs(self) -> dict:
        """The keyword arguments of ``nats.connect`` these options stand for."""
        kwargs: dict = {"servers": list(self.servers)}
        if self.creds is not None:
            kwargs["user_credentials"] = str(self.creds)
        if self.nkey is not None:
            kwargs["nkeys_seed"] = str(self.nkey)
        if (context := self.tls_context()) is not None:
            kwargs["tls"] = context
        return kwargs

    def cli_args(self) -> list[str]:
        """The same options as flags, for a child process (``parallax up`` passes them on)."""
        args = ["--nats", self.url]
        for flag in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key", "js_domain"):
            value = getattr(self, flag)
            if value is not None:
                args += [f"--{flag.replace('_', '-')}", str(value)]
        return args


def parse_servers(text: str) -> tuple[str, ...]:
    """``"nats://a:4222, nats://b:4222"`` -> the URLs (a comma-separated ``--nats``)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or 0 < parts.port < 65536
    except ValueError:
        parts, port_ok = None, False
    if parts is None or parts.scheme not in SCHEMES or not parts.hostname or not port_ok:
        raise UsageError(f"--nats: {url!r} is not a NATS URL like nats://host:4222 (schemes: {', '.join(SCHEMES)})")


def readable_file(flag: str, path: str | Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UsageError(f"{flag} {path}: no such file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot read it ({e.strerror})") from None
    return path


def check_creds(path: Path) -> None:
    """A creds file holds a user JWT and its nkey seed between ``-----BEGIN ...-----`` lines."""
    text = path.read_text(errors="replace")
    if "BEGIN NATS USER JWT" not in text or "USER NKEY SEED" not in text:
        raise UsageError(f"--creds {path}: not a NATS creds file (no user JWT and nkey seed)")


def check_seed(path: Path) -> None:
    """An nkey seed file holds one user seed (``SU...``)."""
    import nkeys

    seed = path.read_bytes().strip()
    try:
        nkeys.from_seed(bytearray(seed)).wipe()
    except Exception:  # nkeys raises its own errors, and binascii's, for every kind of bad seed
        raise UsageError(f"--nkey {path}: not an nkey seed (expected one line starting with SU)") from None


def refuses(error: BaseException) -> bool:
    """The server refused this client (retrying will not help); nats-py 2.16 raises a plain
    ``Error("nats: 'Authorization Violation'")`` when the first CONNECT is refused."""
    return isinstance(error, REFUSED) or "authorization violation" in str(error).lower()


def error_line(error: BaseException) -> str:
    """An asynchronous error as one log line. A permission violation (the server dropped a publish or
    refused a subscription; the connection stays open) says so first."""
    text = str(error) or type(error).__name__
    if "permissions violation" in text.lower():
        return f"permission denied: {text.removeprefix('nats: ')} (see this role's permissions in auth.conf)"
    return text


def on_reconnect(nc: NATS, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback()`` every time ``nc``, a connection made by :func:`connect`, is back after it was
    lost (on the same server or another of the cluster), once its subscriptions are renewed. What was in
    flight through the lost connection (messages published to it, messages for it) may be gone, and
    nothing else says so. Returns the function that stops the calls."""
    callbacks = _RECONNECT_CALLBACKS.setdefault(nc, [])
    callbacks.append(callback)

    def remove() -> None:
        if callback in callbacks:
            callbacks.remove(callback)

    return remove


async def connect(options: NatsOptions, name: str, first_connect_s: float = FIRST_CONNECT_S, **extra) -> NATS:
    """Connect within ``first_connect_s``; once connected, reconnect forever (stages outlive blips) and
    call the :func:`on_reconnect` callbacks each time. A server that refuses this client (credentials,
    TLS) ends the first connect at once."""
    url = options.url
    nc = NATS()
    refused: asyncio.Future = asyncio.get_running_loop().create_future()
    last: list[BaseException] = []

    async def on_error(e: Exception) -> None:
        last[:] = [e]
        if refuses(e) and not refused.done():
            refused.set_result(e)  # only the first connect waits on it
        log.warning("NATS %s: %s", url, error_line(e))

    async def on_disconnect() -> None:
        if not nc.is_closed:  # nats-py calls this on close() too
            log.warning("NATS %s: disconnected, reconnecting", url)

    async def reconnected() -> None:
        log.info("NATS %s: reconnected to %s", url, nc.connected_url.netloc if nc.connected_url else "?")
        for callback in list(_RECONNECT_CALLBACKS.get(nc, ())):
            try:
                callback()
            except Exception:  # one broken callback must not keep the others from running
                log.exception("NATS %s: a reconnect callback failed", url)

    connecting = asyncio.ensure_future(nc.connect(
        name=name, max_reconnect_attempts=-1, reconnect_time_wait=0.5, error_cb=on_error,
        disconnected_cb=on_disconnect, reconnected_cb=reconnected, **options.connect_kwargs(), **extra,
    ))
    try:
        await asyncio.wait({connecting, refused}, timeout=first_connect_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not connecting.done():
            connecting.cancel()
    if connecting.done() and not connecting.cancelled():
        if (error := connecting.exception()) is None:
            return await _tls_as_asked(nc, options)
        last[:] = [error]
    refusal = refused.result() if refused.done() else last[0] if last and refuses(last[0]) else None
    if refusal is not None:
        raise NatsUnreachable(f"NATS at {url} refused this client ({type(refusal).__name__}: {refusal})")
    reason = "TimeoutError" if not connecting.done() or connecting.cancelled() else type(last[0]).__name__
    raise NatsUnreachable(f"cannot reach NATS at {url} within {first_connect_s:.0f} s ({reason})")


async def _tls_as_asked(nc: NATS, options: NatsOptions) -> NATS:
    """nats-py upgrades to TLS only when the server asks for it, whatever the client holds: with TLS
    flags given, a server that does not ask would get plaintext. Refuse it (``_server_info``: the
    server's INFO, which nats-py 2.16 has no public accessor for)."""
    if options.uses_tls and not nc._server_info.get("tls_required"):
        await nc.close()
        raise NatsUnreachable(f"NATS at {options.url} does not require TLS, but TLS flags were given: "
                              "refusing a plaintext connection")
    return nc

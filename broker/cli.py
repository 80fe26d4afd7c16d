"""What every Parallax command does around its async main: logging and one-line errors."""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Callable, Coroutine

from .connection import DEFAULT_URL, NatsOptions
from .errors import EXIT_USAGE, NatsUnreachable, ParallaxError


def add_nats_args(parser: argparse.ArgumentParser, default_url: str | None = DEFAULT_URL) -> None:
    """The connection flags of every command (one definition): ``--nats URL[,URL...]``, ``--creds``,
    ``--nkey``, ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--js-domain``. ``default_url`` None: no
    ``--nats`` means the command starts its own server (``parallax up``)."""
    g = parser.add_argument_group("NATS connection")
    g.add_argument("--nats", default=default_url, metavar="URL[,URL...]",
                   help="NATS server URL, or several comma-separated (members of one cluster: the client reconnects "
                        "to another when one goes away)" + ("" if default_url is None else " (default %(default)s)"))
    g.add_argument("--creds", default=None, metavar="FILE", help="NATS user credentials file (JWT + nkey seed)")
    g.add_argument("--nkey", default=None, metavar="FILE", help="NATS nkey seed file (an nkey user)")
    g.add_argument("--tls-ca", default=None, metavar="FILE", help="CA certificate that signed the server's (enables TLS)")
    g.add_argument("--tls-cert", default=None, metavar="FILE", help="client certificate, for servers that verify clients")
    g.add_argument("--tls-key", default=None, metavar="FILE", help="private key of --tls-cert")
    g.add_argument("--js-domain", default=None, metavar="NAME",
                   help="JetStream domain that holds the registry bucket, e.g. the hub's from a leaf-node site "
                        "(default: the connected server's own)")


def nats_options(args: argparse.Namespace, servers: str | None = None) -> NatsOptions:
    """The :class:`NatsOptions` of :func:`add_nats_args`'s flags (``servers`` replaces ``--nats``);
    :class:`UsageError` (exit 2, one line) for a bad URL or file."""
    return NatsOptions(servers=servers if servers is not None else args.nats, creds=args.creds,
                       nkey=args.nkey, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                       js_domain=args.js_domain)


def run_command(prog: str, main: Coroutine, nats_url: str, log_level: str = "INFO") -> None:
    """Run ``main``; an error ends with one line on stderr and the exit code of :mod:`.errors`."""
    from nats.errors import Error as NatsError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(main)
    except (ParallaxError, ValueError, OSError) as e:
        sys.exit(fail(prog, e))
    except NatsError as e:
        sys.exit(fail(prog, NatsUnreachable(f"cannot reach NATS at {nats_url}: {e}")))
    except KeyboardInterrupt:
        pass


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop where it is installed (a dependency except on Windows), else asyncio's (None): one SmolLM2
    Q4_1 stream through 2 stages, 95-99 tok/s against 85-90 (2-core AMD EPYC; README, "The hot path of one stream")."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def fail(prog: str, error: Exception) -> int:
    """Print ``error`` as one line and return its exit code: a ParallaxError's own; bad values
    (``ValueError``) and OS refusals (a port in use, a missing file) are input errors."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    return error.exit_code if isinstance(error, ParallaxError) else EXIT_USAGE


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"300KB"``, ``"1.5"`` (a bare number is GiB) -> bytes."""
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"size must look like 8GiB, 512MiB, 300KiB or a number of GiB, got {text!r}")
    value, unit = float(match.group(1)), (match.group(2) or "gib").lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size

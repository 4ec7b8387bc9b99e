"""A real redis-server for the tests, started on a free loopback port (never 6379) in a temporary dir.

Fixtures (registered by `pytest_plugins` in conftest.py):
- `redis_server` (session): one throwaway server without persistence, shared by the tests;
- `redis_url` (function): that server's URL, emptied (FLUSHALL) before each test;
- `redis_process` (function): `RedisProcess` factory for tests that stop, kill and restart a
  server of their own (`persistent=True`: an append-only file, so its data survive a restart).

Where no `redis-server` binary exists the tests skip, or fail when the CI variable is set.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

INSTALL = "apt-get install redis-server"
START_TIMEOUT_S = 10.0


def redis_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    for folder in ("/usr/bin", "/usr/sbin", "/usr/local/bin"):
        candidate = Path(folder) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_redis() -> str:
    """The redis-server binary; skips the test where there is none (fails under CI)."""
    binary = redis_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"redis-server is missing: {INSTALL}")
        pytest.skip(f"redis-server is not installed; to run the Redis tests: {INSTALL}")
    return binary


def free_port() -> int:
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != 6379:
            return port


def ping(port: int, timeout: float = 0.5) -> bool:
    """Whether a server on `port` answers PING with PONG (not LOADING, not refused)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One redis-server on 127.0.0.1:`port` with its files in `dir`; start it again after `stop()`
    or `kill()` (same port, same dir: with `persistent`, the same data)."""

    def __init__(self, port: int, dir: Path, persistent: bool = False) -> None:
        self.port = port
        self.dir = Path(dir)
        self.persistent = persistent
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "redis.log"
        cmd = [
            require_redis(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
            "--save", "", "--appendonly", "yes" if self.persistent else "no", "--daemonize", "no",
            "--logfile", str(log), "--loglevel", "warning",
        ]
        if self.persistent:
            cmd += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ping(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """SIGTERM (a persistent server flushes its append-only file), then wait for the exit."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        self._end(signal.SIGKILL)

    def _end(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def flushall(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            assert sock.recv(64).startswith(b"+OK")


def start_redis(tmp: Path, persistent: bool = False) -> RedisProcess:
    """A started RedisProcess on a free port (a few tries: another process may take the port first)."""
    for attempt in range(5):
        try:
            return RedisProcess(free_port(), tmp, persistent).start()
        except RuntimeError:
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisProcess]:
    require_redis()
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture()
def redis_url(redis_server: RedisProcess) -> str:
    redis_server.flushall()
    return redis_server.url


@pytest.fixture()
def redis_process(tmp_path) -> Iterator[Callable[..., RedisProcess]]:
    """redis_process(persistent=True) -> a started server of the test's own, killed at teardown."""
    require_redis()
    started: list[RedisProcess] = []

    def start(persistent: bool = True) -> RedisProcess:
        server = start_redis(tmp_path / f"redis-{len(started)}", persistent)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()

"""`anchorserve serve` with `api_servers` ≥ 1: one engine-core process behind N HTTP frontends.

The supervisor (this process, which runs no model) binds the public address, then starts:
- the engine core: the whole single-process server (model, tasks, scheduler, jobs, replication,
  admin routes), its HTTP on a unix socket for the frontends to relay to, and a ZeroMQ socket for
  token ids (server/core.py);
- N frontends: uvicorn, each a `server.frontend.Frontend` listening on its own socket of the
  public address's SO_REUSEPORT group, which the kernel spreads new connections over
  (server/serving.py `reserve` and `join`). A frontend joins the group once it is about to serve,
  so a restarting one takes no connection before it can answer it.

Every child writes its metrics under the runtime folder (Prometheus' multiprocess mode), and the
core's /metrics sums them (server/metrics.py).

Supervision: a child that dies is restarted; meanwhile the frontends answer 503 for the core
(within a request, not after a timeout), and the others keep serving for a frontend. A core that
exits with FATAL (its model or state store cannot load) is not restarted: the supervisor stops
everything and exits 1, so the orchestrator sees the failure. SIGTERM/SIGINT stop the frontends
first (each drains its requests in flight, which still reach the core), then the core (which
finishes its queue). Children get SIGTERM if the supervisor itself dies (PR_SET_PDEATHSIG).

Children are `python -m server.supervisor {core|frontend} RUNTIME_DIR [FD] -- SERVE_FLAGS`, with the
supervisor's environment and working folder, so they read the same settings as `anchorserve serve`.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from server.logs import configure_logging
from server.metrics import MULTIPROCESS_ENV
from server.serving import bounded_server, join, serve_app, settings_from_flags
from server.settings import Settings

log = logging.getLogger("server.supervisor")

FATAL = 1  # the core's exit status when its model or state cannot load: not worth restarting
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
POLL_S = 0.1
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    with_libc = ctypes.CDLL(None, use_errno=True)
    with_libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def engine_address(runtime: Path) -> str:
    return f"ipc://{runtime / 'engine.sock'}"


def core_http(runtime: Path) -> str:
    return str(runtime / "core-http.sock")


class Child:
    """One supervised process: how to start it, and when it last started."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], fds: tuple[int, ...] = ()) -> None:
        self.name, self.argv, self.env, self.fds = name, argv, env, fds
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.started = 0.0

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env, pass_fds=self.fds, stdin=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)
        self.started = time.monotonic()
        log.info("started %s (pid %d)", self.name, self.process.pid)

    def backoff(self) -> float:
        """Seconds to wait before a restart: more for a child that keeps dying young."""
        self.restarts = self.restarts + 1 if time.monotonic() - self.started < 10 else 0
        return RESTART_BACKOFF_S[min(self.restarts, len(RESTART_BACKOFF_S) - 1)]

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing it", self.name, timeout)
            self.process.kill()
            self.process.wait()


def supervise(settings: Settings, sock: socket.socket, flags: list[str]) -> int:
    """Run and supervise the children until SIGTERM/SIGINT; `sock`: the address `serving.reserve`
    holds, handed to every frontend; `flags`: `anchorserve serve`'s, passed on."""
    runtime = Path(tempfile.mkdtemp(prefix="anchorserve-"))
    (runtime / "metrics").mkdir()
    env = dict(os.environ) | {MULTIPROCESS_ENV: str(runtime / "metrics")}
    command = [sys.executable, "-m", "server.supervisor"]
    core = Child("engine core", [*command, "core", str(runtime), "--", *flags], env)
    frontends = [Child(f"frontend {i}", [*command, "frontend", str(runtime), str(sock.fileno()), "--", *flags], env,
                       (sock.fileno(),)) for i in range(settings.api_servers)]
    stopping: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _: stopping.append(number))
    log.info("serving on http://%s:%d with %d frontend(s) and one engine core", settings.host, settings.port,
             len(frontends))
    code = 0
    try:
        for child in [core, *frontends]:
            child.start()
        restart_at: dict[Child, float] = {}
        while not stopping:
            time.sleep(POLL_S)
            now = time.monotonic()
            for child in [core, *frontends]:
                status = child.process.poll()
                if status is None or child in restart_at:
                    continue
                if child is core and status == FATAL:
                    log.error("the engine core could not load its model or state; stopping (its log says why)")
                    stopping.append(0)
                    code = 1
                    break
                mark_process_dead(child.process.pid, str(runtime / "metrics"))
                restart_at[child] = now + child.backoff()
                log.warning("%s exited (%s); restarting in %.1fs", child.name,
                            f"signal {-status}" if status < 0 else f"status {status}", restart_at[child] - now)
            for child, when in list(restart_at.items()):
                if when <= now and not stopping:
                    child.start()
                    del restart_at[child]
    finally:
        # First the doors, so no new request arrives while in-flight ones drain; then the core. All
        # within shutdown_timeout_s (each child bounds its own exit the same way).
        deadline = time.monotonic() + settings.shutdown_timeout_s
        for child in frontends:
            child.signal(signal.SIGTERM)
        for child in frontends:
            child.wait(max(0.0, deadline - time.monotonic()))
        core.signal(signal.SIGTERM)
        core.wait(max(1.0, deadline - time.monotonic()))
        sock.close()
        shutil.rmtree(runtime, ignore_errors=True)
    log.info("stopped")
    return code


def _core(runtime: Path, settings: Settings) -> int:
    error = serve_app(settings, engine_address=engine_address(runtime), uds=core_http(runtime))
    return FATAL if error else 0


def _frontend(runtime: Path, fd: int, settings: Settings) -> int:
    from server.frontend import Frontend

    app = Frontend(settings, engine_address(runtime), core_http(runtime))
    with socket.socket(fileno=fd) as reserved:  # joined only now, with everything imported and built
        listening = join(reserved)
    bounded_server(app, settings).run(sockets=[listening])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.supervisor",
                                     description="A child of `anchorserve serve --api-servers N` (not for direct use).")
    parser.add_argument("role", choices=["core", "frontend"])
    parser.add_argument("runtime", type=Path, help="the supervisor's runtime folder (sockets)")
    parser.add_argument("fd", type=int, nargs="?", help="frontend: the inherited socket holding the public address")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # then the flags `anchorserve serve` was given
    args = parser.parse_args(argv[:split])
    settings = settings_from_flags(argv[split + 1:])
    configure_logging(settings.log_format)
    return _core(args.runtime, settings) if args.role == "core" else _frontend(args.runtime, args.fd, settings)


if __name__ == "__main__":
    sys.exit(main())

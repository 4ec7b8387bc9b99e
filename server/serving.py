"""Serving the app: the settings `anchorserve serve` reads (its flags, generated from the Settings
fields, over the environment and the settings file), and uvicorn with a bounded exit. Shared by the
command line (server/cli.py) and the children of a split server (server/supervisor.py)."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import threading
import time

from pydantic_settings import CliSettingsSource

from anchor_cache import cli as engine_cli
from server.settings import CONFIG_ENV, Settings

SERVE_DESCRIPTION = (
    "Serve the configured tasks over HTTP (uvicorn). Every setting is a flag below, an ANCHORSERVE_<NAME> "
    f"environment variable, and a key of the YAML/JSON settings file (--config, or {CONFIG_ENV}); flags win over "
    "the environment, which wins over the file. Prefer the environment or the file for keys: a flag shows in the "
    "process list. server/settings.py and the README describe every setting."
)

SettingsFlags = CliSettingsSource[Settings]


def add_serve_args(p: argparse.ArgumentParser) -> SettingsFlags:
    """Every Settings field as a flag of `p`, generated from the fields (so none can be missing):
    --max-batch-size N, --access-log/--no-access-log, --tasks JSON, --config FILE, ..."""
    return CliSettingsSource(Settings, root_parser=p, cli_kebab_case=True, cli_implicit_flags=True,
                             cli_show_env_vars=True, cli_hide_none_type=True)


def load_settings(args: argparse.Namespace, flags: SettingsFlags) -> Settings:
    """Defaults < the settings file < the environment < the flags in `args` (parsed with `flags`)."""
    return Settings(_cli_settings_source=flags(parsed_args=args))


def serve_parser(prog: str) -> tuple[argparse.ArgumentParser, SettingsFlags]:
    """A parser of `anchorserve serve`'s flags alone (`python -m server`, a split server's children)."""
    parser = engine_cli.CommandLineParser(prog=prog, description=SERVE_DESCRIPTION)
    return parser, add_serve_args(parser)


def settings_from_flags(argv: list[str]) -> Settings:
    """The settings `anchorserve serve` builds from these flags (and the environment and file)."""
    parser, flags = serve_parser("anchorserve serve")
    return load_settings(parser.parse_args(argv), flags)


def event_loop_and_parser() -> tuple[str, str]:
    """uvloop and httptools (dependencies) where importable, else the standard library's asyncio and
    the pure-Python h11."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


LISTEN_BACKLOG = 4096


def listen(settings: Settings) -> socket.socket:
    """The public listening socket of a single-process server."""
    return socket.create_server((settings.host, settings.port), backlog=LISTEN_BACKLOG)


def reserve(settings: Settings) -> socket.socket:
    """The public address held for a split server's frontends, each listening on its own socket of
    the address's SO_REUSEPORT group (`join`). This one is bound but never listens, so it takes no
    connection: it keeps the port while frontends restart. A plain bind comes first, so a port that
    another process listens on, another split server's frontends included, fails here as it does
    for one process."""
    with socket.create_server((settings.host, settings.port)) as probe:
        address = probe.getsockname()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as create_server's: a restart is not "busy"
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def join(reserved: socket.socket) -> socket.socket:
    """A frontend's listening socket in the group `reserved` holds. The kernel spreads
    new connections over the group's listening sockets by their addresses. One socket shared by
    every frontend leaves them to whichever accepts first, and asyncio and libuv accept all waiting
    connections at once, so a burst of new connections lands on one frontend. A frontend's socket
    closes with it, leaving the group, so new connections go to the others until it is back."""
    return socket.create_server(reserved.getsockname(), backlog=LISTEN_BACKLOG, reuse_port=True)


def serve_app(settings: Settings, engine_address: str | None = None, sockets: list[socket.socket] | None = None,
              **bind: object) -> str | None:
    """Serve the whole app (one process, or the engine core behind frontends with
    `engine_address`) until SIGTERM/SIGINT; the start-up error when the model or state could not load."""
    from server.app import build_app
    from server.inprocess import fit_threads

    server = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(settings, on_fatal=fatal, engine_address=engine_address, thread_fit=fit_threads(settings))
    server = bounded_server(app, settings, **bind)
    server.run(sockets=sockets)
    return app.state.anchor.engine.startup_error


def bounded_server(app: object, settings: Settings, **bind: object):  # -> uvicorn.Server, imported lazily
    """uvicorn with the settings' options, whose process exits within `shutdown_timeout_s` of the
    first SIGTERM/SIGINT: requests in flight drain meanwhile, and whatever still runs then (a
    job's thread that does not hear its cancel, a cache build) is cut short, with a log line."""
    # The web stack is imported only to serve: `anchorserve eval --help` stays quick.
    import uvicorn

    loop, http = event_loop_and_parser()

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            arm_exit_watchdog(settings.shutdown_timeout_s)
            super().handle_exit(sig, frame)

    return Server(uvicorn.Config(app, log_level="info", log_config=None, loop=loop, http=http,
                                 access_log=settings.access_log,
                                 timeout_graceful_shutdown=settings.shutdown_timeout_s, **bind))


_watchdog = threading.Lock()


def arm_exit_watchdog(timeout_s: float) -> None:
    """From now on, the process exits within `timeout_s` (status 1 if it has to be cut short); a
    daemon thread, so it never holds the exit itself. Armed once; later calls do nothing."""
    if not _watchdog.acquire(blocking=False):
        return

    def cut_short() -> None:
        time.sleep(timeout_s)
        logging.getLogger("server").error("still stopping %.0f s after the signal (shutdown_timeout_s): exiting "
                                          "now", timeout_s)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=cut_short, name="anchorserve-exit-watchdog", daemon=True).start()

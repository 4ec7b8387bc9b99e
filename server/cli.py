"""`anchorserve`: one command line for the server and the engine.

    anchorserve serve                                   # the HTTP server on 127.0.0.1:8000
    anchorserve serve --host 0.0.0.0 --port 9000 --config config.yaml
    anchorserve classify --preset sst2 "a joyous film" "a dull mess"
    anchorserve eval --preset sst2 --methods vanilla,hidden_anchor --limit 200 --out results.json
    anchorserve reweight --preset sst2 --out beta/
    anchorserve analyze saliency --preset trec --limit 100 --out runs/trec-saliency

`anchorserve COMMAND --help` describes each command. `serve` is also `python -m server`; the
engine commands are also `python -m anchor_cache`. The client is `anchorserve-client`.

`serve` validates its settings and the model setting, then serves with uvicorn. A bad setting, or a
model that cannot be found or loaded, ends the process with one clear line on stderr and a non-zero
exit (2 for a setting, 1 for a failed load), so Docker or Kubernetes restarts it instead of leaving
a replica that is never ready. SIGTERM/SIGINT shut down gracefully: queued requests finish first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from asgi_correlation_id import CorrelationIdFilter
from pydantic import ValidationError

from anchor_cache import cli as engine_cli
from anchor_cache.errors import AnchorServeError
from server.settings import CONFIG_ENV, Settings

PROG = "anchorserve"
FLAG_SETTINGS = ("host", "port", "api_servers")  # settings `serve` also takes as flags
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"
SERVE_DESCRIPTION = (
    "Serve the configured tasks over HTTP (uvicorn). Settings come from ANCHORSERVE_<NAME> environment "
    f"variables and a YAML/JSON settings file (--config, or {CONFIG_ENV}); the environment wins over the file, "
    "and these flags win over both. server/settings.py and the README list every setting."
)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="address to listen on (default: ANCHORSERVE_HOST or HOST, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default: ANCHORSERVE_PORT or PORT, else 8000)")
    p.add_argument("--api-servers", type=int, metavar="N",
                   help="HTTP frontend processes in front of one engine-core process; 0: one process does "
                        "everything (default: ANCHORSERVE_API_SERVERS, else 0 on up to 2 usable CPUs, one per 8 "
                        "beyond)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=f"YAML or JSON settings file (default: {CONFIG_ENV}, if set)")


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """`os.environ[name] = value` for the duration (nothing changes for None)."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if value is not None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def load_settings(args: argparse.Namespace) -> Settings:
    """Defaults < the settings file < the environment < --host/--port/--api-servers."""
    if args.config is not None and not args.config.is_file():
        raise AnchorServeError(f"--config {args.config}: no such file")
    overrides = {name: getattr(args, name) for name in FLAG_SETTINGS if getattr(args, name) is not None}
    with _environ(CONFIG_ENV, str(args.config) if args.config is not None else None):
        try:
            return Settings(**overrides)
        except yaml.YAMLError as exc:
            raise AnchorServeError(f"the settings file {os.environ[CONFIG_ENV]} is not valid YAML or JSON: "
                                   f"{engine_cli.one_line(exc)}") from None


def event_loop_and_parser() -> tuple[str, str]:
    """uvloop and httptools (dependencies) where importable, else the standard library's asyncio and
    the pure-Python h11."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return loop, http


def configure_logging() -> None:
    """Every log line carries the request id it was written for ("-" outside requests)."""
    handler = logging.StreamHandler()
    handler.addFilter(CorrelationIdFilter(default_value="-"))
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def serve(args: argparse.Namespace, prog: str = PROG) -> int:
    """Validate the settings and the model setting, then serve until SIGTERM/SIGINT."""
    configure_logging()
    engine_cli.quiet_progress_bars()
    try:
        settings = load_settings(args)
        from anchor_cache.commands import check_model  # the engine, only once serving is certain

        check_model(settings.model, settings.device, settings.dtype)
    except (ValidationError, ValueError, AnchorServeError) as exc:
        sys.stderr.write(f"{prog}: error: not starting: {engine_cli.one_line(exc)}\n")
        return 2
    try:
        sock = listen(settings)  # before anything loads, so a busy port fails at once
    except OSError as exc:
        sys.stderr.write(f"{prog}: error: not starting: cannot listen on {settings.host}:{settings.port}: "
                         f"{exc.strerror}\n")
        return 2
    if settings.api_servers:
        return _serve_split(settings, args, sock)
    loop, http = event_loop_and_parser()
    logging.getLogger("server").info("serving with the %s event loop and the %s HTTP parser", loop, http)
    error = serve_app(settings, sockets=[sock])
    if error:
        sys.stderr.write(f"{prog}: {error}\n")
        return 1
    return 0


def listen(settings: Settings) -> socket.socket:
    """The public listening socket (inheritable: the supervisor hands it to its frontends)."""
    sock = socket.create_server((settings.host, settings.port), backlog=4096)
    sock.set_inheritable(True)
    return sock


def serve_app(settings: Settings, engine_address: str | None = None, sockets: list[socket.socket] | None = None,
              **bind: object) -> str | None:
    """Serve the whole app (one process, or the engine core behind frontends with
    `engine_address`) until SIGTERM/SIGINT; the start-up error when the model or state could not load."""
    from server.app import build_app
    from server.engine import fit_threads

    server = None

    def fatal() -> None:
        if server is not None:
            server.should_exit = True

    fit_threads(settings)
    app = build_app(settings, on_fatal=fatal, engine_address=engine_address)
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


def _serve_split(settings: Settings, args: argparse.Namespace, sock: socket.socket) -> int:
    """One engine core behind `api_servers` frontends (server/supervisor.py) on the listening
    socket; the children read the same settings from this process's environment."""
    from server import supervisor

    if args.config is not None:
        os.environ[CONFIG_ENV] = str(args.config.resolve())
    for name in FLAG_SETTINGS:
        if getattr(args, name) is not None:
            os.environ[f"ANCHORSERVE_{name.upper()}"] = str(getattr(args, name))
    return supervisor.supervise(settings, sock)


def build_parser() -> argparse.ArgumentParser:
    head, examples, note = __doc__.split("\n\n", 3)[:3]
    parser = engine_cli.CommandLineParser(prog=PROG, description=head, epilog=f"{examples}\n\n{note}",
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="engine commands: log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sv = sub.add_parser("serve", help="serve the configured tasks over HTTP (also `python -m server`)",
                        description=SERVE_DESCRIPTION)
    add_serve_args(sv)
    engine_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The `anchorserve` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return engine_cli.run_command(args, PROG)


def serve_main(argv: list[str] | None = None) -> int:
    """`python -m server`: the same as `anchorserve serve`."""
    parser = engine_cli.CommandLineParser(prog="python -m server", description=SERVE_DESCRIPTION)
    add_serve_args(parser)
    return serve(parser.parse_args(argv), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())

"""`anchorserve`: one command line for the server and the engine.

    anchorserve serve                                   # the HTTP server on 127.0.0.1:8000
    anchorserve serve --host 0.0.0.0 --port 9000 --config config.yaml --log-format json
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
import logging
import sys

from pydantic import ValidationError

from anchor_cache import cli as engine_cli
from anchor_cache.errors import AnchorServeError
from server.logs import configure_logging
from server.serving import (
    SERVE_DESCRIPTION,
    SettingsFlags,
    add_serve_args,
    event_loop_and_parser,
    listen,
    load_settings,
    reserve,
    serve_app,
    serve_parser,
)

PROG = "anchorserve"


def serve(flags: SettingsFlags, argv: list[str], prog: str = PROG) -> int:
    """Validate the settings `argv` gives (serve's flags, parsed by the parser of `flags`) and the model
    setting, then serve until SIGTERM/SIGINT. The children of a split server read the same `argv`."""
    try:
        settings = load_settings(flags.root_parser.parse_args(argv), flags)
        configure_logging(settings.log_format)
        from anchor_cache.commands import check_model  # the engine, only once serving is certain

        check_model(settings.model, settings.device, settings.dtype)
    except (ValidationError, ValueError, AnchorServeError) as exc:
        sys.stderr.write(f"{prog}: error: not starting: {engine_cli.one_line(exc)}\n")
        return 2
    try:
        sock = reserve(settings) if settings.api_servers else listen(settings)  # a busy port fails before any load
    except OSError as exc:
        sys.stderr.write(f"{prog}: error: not starting: cannot listen on {settings.host}:{settings.port}: "
                         f"{exc.strerror}\n")
        return 2
    if settings.api_servers:
        from server import supervisor

        return supervisor.supervise(settings, sock, argv)
    loop, http = event_loop_and_parser()
    logging.getLogger("server").info("serving with the %s event loop and the %s HTTP parser", loop, http)
    error = serve_app(settings, sockets=[sock])
    if error:
        sys.stderr.write(f"{prog}: {error}\n")
        return 1
    return 0


def build_parser() -> tuple[argparse.ArgumentParser, SettingsFlags]:
    """`anchorserve`'s parser, and the flags its `serve` command takes."""
    head, examples, note = __doc__.split("\n\n", 3)[:3]
    parser = engine_cli.CommandLineParser(prog=PROG, description=head, epilog=f"{examples}\n\n{note}",
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="engine commands: log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sv = sub.add_parser("serve", help="serve the configured tasks over HTTP (also `python -m server`)",
                        description=SERVE_DESCRIPTION)
    flags = add_serve_args(sv)
    engine_cli.add_commands(sub)
    return parser, flags


def main(argv: list[str] | None = None) -> int:
    """The `anchorserve` console script."""
    argv = sys.argv[1:] if argv is None else argv
    parser, flags = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        # Only -v/--verbose, which takes no value, may come before the command: serve's flags follow it.
        return serve(flags, argv[argv.index("serve") + 1:])
    return engine_cli.run_command(args, PROG)


def serve_main(argv: list[str] | None = None) -> int:
    """`python -m server`: the same as `anchorserve serve`."""
    argv = sys.argv[1:] if argv is None else argv
    _, flags = serve_parser("python -m server")
    return serve(flags, argv)


if __name__ == "__main__":
    sys.exit(main())

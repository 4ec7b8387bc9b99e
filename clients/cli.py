"""`anchorserve-client`: classify texts against a running server, or run an analysis job on it.

    anchorserve-client classify --task sentiment "a wonderful film" "a dull mess"
    anchorserve-client classify --task sentiment --file inputs.jsonl --out predictions.jsonl
    anchorserve-client tasks
    anchorserve-client --admin-key KEY analyze saliency --task sentiment --path sst2 --params '{"limit": 50}' --out run/

environment:
  ANCHORSERVE_URL            the server's URL (default http://127.0.0.1:8000); --url overrides it
  ANCHORSERVE_API_KEY        bearer key for /v1/* (the server's api_key); --api-key overrides it
  ANCHORSERVE_ADMIN_API_KEY  bearer key for analyses (the server's admin_api_key); --admin-key overrides it

A mistake (an unreadable --file, a server that cannot be reached, an error answer) is one line on
stderr: exit status 2 for a usage error, 1 for a failure on the way to or at the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import httpx
from tqdm import tqdm

from clients.client import AnchorServeClient, AnchorServeError

PROG = "anchorserve-client"
URL_ENV = "ANCHORSERVE_URL"
DEFAULT_URL = "http://127.0.0.1:8000"


class UsageError(Exception):
    """A mistake in the arguments or the input files: one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`prog: error: message (see prog --help)`), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return path


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _lines(path: Path) -> list[tuple[int, str]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} ({exc})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_inputs(path: Path) -> list[str]:
    """JSONL rows of {"text": ...} (or bare JSON strings), or plain text lines. In a .jsonl file, or
    on a line that starts like JSON, a line that does not parse is an error, not a text."""
    texts = []
    strict = path.suffix.lower() in (".jsonl", ".json")
    for line_no, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if strict or line.lstrip().startswith(("{", "[", '"')):
                raise UsageError(f"{path}:{line_no}: not valid JSON ({exc})") from None
            row = line
        if isinstance(row, dict):
            if not isinstance(row.get("text"), str):
                raise UsageError(f'{path}:{line_no}: a JSON object needs a string "text" field')
            row = row["text"]
        texts.append(str(row))
    return texts


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """JSONL rows of {"text", "label"} for an analysis."""
    rows = []
    for line_no, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{line_no}: not valid JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or "label" not in row:
            raise UsageError(f'{path}:{line_no}: expected a JSON object with a string "text" and a "label"')
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    head, rest = __doc__.split("\n\n", 1)
    parser = _Parser(prog=PROG, description=head, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get(URL_ENV, DEFAULT_URL),
                        help=f"the server's URL (default: {URL_ENV}, else {DEFAULT_URL})")
    parser.add_argument("--api-key", default=os.environ.get("ANCHORSERVE_API_KEY"),
                        help="bearer key for /v1/* (default: ANCHORSERVE_API_KEY)")
    parser.add_argument("--admin-key", default=os.environ.get("ANCHORSERVE_ADMIN_API_KEY"),
                        help="bearer key for analyze (default: ANCHORSERVE_ADMIN_API_KEY)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cl = sub.add_parser("classify", help="classify texts (arguments or --file), one JSON line per text",
                        description="Classify texts with a served task; prints (or writes to --out) one JSON line "
                                    "per text: {text, label, probs}.")
    cl.add_argument("--task", required=True, help="a served task's name (see `anchorserve-client tasks`)")
    cl.add_argument("--method", help="override the task's method, e.g. vanilla")
    cl.add_argument("--file", type=_existing_file, help="JSONL of {\"text\": ...} rows, or plain text lines")
    cl.add_argument("--batch", type=int, default=16, help="texts per request (default 16)")
    cl.add_argument("--out", type=Path, help="write predictions here instead of stdout")
    cl.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify (after those, --file's)")
    sub.add_parser("tasks", help="list served tasks", description="List the served tasks, one JSON line each.")
    an = sub.add_parser("analyze", help="run an analysis job on the server; save results.json and plots in --out",
                        description="Run one of the paper's analyses on the server (needs the admin key), show "
                                    "its progress, and save results.json and the PNG plots into --out.")
    an.add_argument("kind", choices=["saliency", "isolation", "deep_layers", "error_diagnosis"])
    an.add_argument("--task", required=True, help="a served task's name")
    rows = an.add_mutually_exclusive_group(required=True)
    rows.add_argument("--file", type=_existing_file, help="JSONL of {\"text\", \"label\"} rows to analyse")
    rows.add_argument("--path", help="a dataset under the server's data_root")
    an.add_argument("--drawn", action="store_true", help="draw demonstrations from the dataset's train.jsonl per seed")
    an.add_argument("--params", type=_json_object, default={}, help="analysis parameters as JSON")
    an.add_argument("--out", type=Path, required=True, help="folder for results.json and the plots")
    return parser


def _analyze(client: AnchorServeClient, args: argparse.Namespace, examples: list[dict[str, Any]] | None) -> int:
    job = client.start_analysis(args.kind, args.task, examples=examples, path=args.path, params=args.params,
                                demonstrations="drawn" if args.drawn else "task")
    with tqdm(desc=args.kind, unit="step", file=sys.stderr) as bar:

        def progress(status: dict) -> None:
            done = status.get("progress") or {}
            bar.total = int(done.get("total", 0)) or None
            bar.update(int(done.get("done", 0)) - bar.n)

        try:
            job = client.wait_analysis(job["id"], on_progress=progress)
        except KeyboardInterrupt:
            client.cancel_analysis(job["id"])
            raise
    if job["status"] != "succeeded":
        sys.stderr.write(f"{PROG}: error: analysis {job['status']}: {job.get('error')}\n")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(job["results"], indent=1))
    for name in job["plots"]:
        (args.out / f"{name}.png").write_bytes(client.analysis_plot(job["id"], name))
    for warning in job["results"].get("warnings", []):
        sys.stderr.write(f"{PROG}: warning: {warning}\n")
    sys.stdout.write(f"wrote {args.out / 'results.json'} and {len(job['plots'])} plot(s)\n")
    return 0


def _classify(client: AnchorServeClient, args: argparse.Namespace, texts: list[str]) -> int:
    out = args.out.open("w", encoding="utf-8") if args.out else sys.stdout
    try:
        with tqdm(total=len(texts), unit="text", disable=len(texts) <= args.batch, file=sys.stderr) as bar:
            for start in range(0, len(texts), args.batch):
                part = texts[start : start + args.batch]
                for text, item in zip(part, client.classify(args.task, part, args.method).data, strict=True):
                    out.write(json.dumps({"text": text, "label": item.label, "probs": item.label_probs}) + "\n")
                bar.update(len(part))
    finally:
        if args.out:
            out.close()
    return 0


def _transport_error(url: str, exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return (f"cannot connect to the server at {url} ({exc or 'connection refused'}); start it with "
                f"`anchorserve serve`, or point --url or {URL_ENV} at it")
    if isinstance(exc, httpx.TimeoutException):
        return f"the server at {url} did not answer in time ({type(exc).__name__})"
    return f"request to the server at {url} failed ({type(exc).__name__}: {exc})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # inputs are read before the first request
        texts = examples = None
        if args.command == "classify":
            texts = list(args.texts) + (_read_inputs(args.file) if args.file else [])
            if not texts:
                raise UsageError("give texts as arguments or --file")
            if args.batch < 1:
                raise UsageError(f"--batch must be at least 1, got {args.batch}")
        elif args.command == "analyze" and args.file:
            examples = _read_rows(args.file)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    with AnchorServeClient(args.url, api_key=args.api_key, admin_key=args.admin_key) as client:
        try:
            if args.command == "analyze":
                return _analyze(client, args, examples)
            if args.command == "tasks":
                for task in client.tasks():
                    sys.stdout.write(task.model_dump_json() + "\n")
                return 0
            return _classify(client, args, texts)
        except AnchorServeError as exc:
            sys.stderr.write(f"{PROG}: error: {exc}\n")
            return 1
        except httpx.TransportError as exc:
            sys.stderr.write(f"{PROG}: error: {_transport_error(args.url, exc)}\n")
            return 1

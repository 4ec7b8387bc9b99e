"""`anchorserve-client`: classify texts against a running server, or run an analysis job on it.

    anchorserve-client classify --task sentiment "a wonderful film" "a dull mess"
    anchorserve-client classify --task sentiment --file inputs.jsonl --out predictions.jsonl
    anchorserve-client tasks
    anchorserve-client --admin-key KEY analyze saliency --task sentiment --path sst2 --params '{"limit": 50}' --out run/
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from clients.client import AnchorServeClient, AnchorServeError


def _read_inputs(path: Path) -> list[str]:
    """JSONL rows of {"text": ...} (or bare JSON strings), or plain text lines."""
    texts = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = line
        texts.append(row["text"] if isinstance(row, dict) else str(row))
    return texts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anchorserve-client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("ANCHORSERVE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("ANCHORSERVE_API_KEY"), help="or ANCHORSERVE_API_KEY")
    sub = parser.add_subparsers(dest="command", required=True)
    cl = sub.add_parser("classify", help="classify texts (arguments or --file), one JSON line per text")
    cl.add_argument("--task", required=True)
    cl.add_argument("--method", help="override the task's method, e.g. vanilla")
    cl.add_argument("--file", type=Path, help="JSONL of {'text': ...} or plain lines")
    cl.add_argument("--batch", type=int, default=16, help="texts per request")
    cl.add_argument("--out", type=Path, help="write predictions here instead of stdout")
    cl.add_argument("texts", nargs="*")
    sub.add_parser("tasks", help="list served tasks")
    parser.add_argument("--admin-key", default=os.environ.get("ANCHORSERVE_ADMIN_API_KEY"),
                        help="for analyze; or ANCHORSERVE_ADMIN_API_KEY")
    an = sub.add_parser("analyze", help="run an analysis job on the server; save results.json and plots in --out")
    an.add_argument("kind", choices=["saliency", "isolation", "deep_layers", "error_diagnosis"])
    an.add_argument("--task", required=True)
    rows = an.add_mutually_exclusive_group(required=True)
    rows.add_argument("--file", type=Path, help="JSONL of {'text', 'label'} rows to analyse")
    rows.add_argument("--path", help="a dataset under the server's data_root")
    an.add_argument("--drawn", action="store_true", help="draw demonstrations from the dataset's train.jsonl per seed")
    an.add_argument("--params", type=json.loads, default={}, help="analysis parameters as JSON")
    an.add_argument("--out", type=Path, required=True)
    return parser


def _analyze(client: AnchorServeClient, args: argparse.Namespace) -> int:
    examples = None
    if args.file:
        examples = [json.loads(line) for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
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
        sys.stderr.write(f"error: analysis {job['status']}: {job.get('error')}\n")
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(job["results"], indent=1))
    for name in job["plots"]:
        (args.out / f"{name}.png").write_bytes(client.analysis_plot(job["id"], name))
    sys.stdout.write(f"wrote {args.out / 'results.json'} and {len(job['plots'])} plot(s)\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with AnchorServeClient(args.url, api_key=args.api_key, admin_key=args.admin_key) as client:
        try:
            if args.command == "analyze":
                return _analyze(client, args)
            if args.command == "tasks":
                for task in client.tasks():
                    sys.stdout.write(task.model_dump_json() + "\n")
                return 0
            texts = list(args.texts) + (_read_inputs(args.file) if args.file else [])
            if not texts:
                sys.stderr.write("error: give texts as arguments or --file\n")
                return 2
            out = args.out.open("w", encoding="utf-8") if args.out else sys.stdout
            with tqdm(total=len(texts), unit="text", disable=len(texts) <= args.batch, file=sys.stderr) as bar:
                for start in range(0, len(texts), args.batch):
                    part = texts[start : start + args.batch]
                    for text, item in zip(part, client.classify(args.task, part, args.method).data, strict=True):
                        out.write(json.dumps({"text": text, "label": item.label, "probs": item.probs}) + "\n")
                    bar.update(len(part))
            if args.out:
                out.close()
        except AnchorServeError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 1
    return 0

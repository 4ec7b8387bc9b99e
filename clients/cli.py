"""`anchorserve-client`: classify texts against a running server.

    anchorserve-client classify --task sentiment "a wonderful film" "a dull mess"
    anchorserve-client classify --task sentiment --file inputs.jsonl --out predictions.jsonl
    anchorserve-client tasks
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with AnchorServeClient(args.url, api_key=args.api_key) as client:
        try:
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

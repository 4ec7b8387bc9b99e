"""The engine stays free of HTTP code (TEI's core/router split)."""

from __future__ import annotations

import subprocess
import sys


def test_engine_imports_no_web_framework():
    code = "import sys, anchor_cache.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "{'fastapi', 'starlette', 'uvicorn', 'httpx'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_clients_do_not_need_torch():
    code = "import sys, clients, clients.cli; print([m for m in ('torch', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

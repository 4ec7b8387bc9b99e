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


def test_imports_run_engine_then_server_then_clients():
    """No back-arrows: every engine module loads without the server or the clients, and no server
    module needs the clients."""
    code = (
        "import importlib, pkgutil, sys, anchor_cache\n"
        "for m in pkgutil.walk_packages(anchor_cache.__path__, 'anchor_cache.'):\n"
        "    if m.name != 'anchor_cache.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "engine = sorted(m for m in sys.modules if m.split('.')[0] in {'server', 'clients'})\n"
        "import server\n"
        "for m in pkgutil.walk_packages(server.__path__, 'server.'):\n"
        "    if m.name != 'server.__main__':\n"
        "        importlib.import_module(m.name)\n"
        "print(engine, sorted(m for m in sys.modules if m.split('.')[0] == 'clients'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []", out.stdout

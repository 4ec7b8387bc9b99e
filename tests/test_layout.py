"""The engine stays free of HTTP code (TEI's core/router split), imports run one way, and the engine
knows of the state store only its blobs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


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


def test_the_state_store_loads_without_torch():
    code = ("import sys, server.store.local, server.store.redis; "
            "print([m for m in ('torch', 'transformers', 'anchor_cache.blobs') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """`node` and the nodes under it, less `if TYPE_CHECKING:` blocks."""
    yield node
    for child in ast.iter_child_nodes(node):
        if not (isinstance(child, ast.If) and isinstance(child.test, ast.Name) and child.test.id == "TYPE_CHECKING"):
            yield from runtime_nodes(child)


def module_imports(root: Path) -> dict[str, set[str]]:
    """Each module of the project's packages -> the project modules it imports, anywhere in it (an
    import inside a function closes a circle as surely, only later), except under TYPE_CHECKING."""
    packages = ("anchor_cache", "server", "clients")
    modules = {}
    for package in packages:
        for path in (root / package).rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_import_graph_has_no_circle():
    graph = module_imports(Path(__file__).resolve().parents[1])
    assert len(graph) > 60  # the walk found the project
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join((*path[path.index(name):], name)))
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_engine_knows_blobs_only():
    """The engine's store is a BlobStore: no engine module names the server's records, jobs or plots."""
    root = Path(__file__).resolve().parents[1] / "anchor_cache"
    words = re.compile(r"\b(TaskRecord|StateStore|put_job|get_job|put_plot|get_plot|request_cancel|"
                       r"cancel_requested|wait_for_change|records\(\))")
    found = {str(p.relative_to(root)): words.findall(p.read_text()) for p in root.rglob("*.py")}
    assert {name: hits for name, hits in found.items() if hits} == {}

"""Packaging: licence metadata, pins against ranges, the client-only distribution, the Docker build context.

Wheels are built offline from copies of the sources in a temporary folder (pip without build
isolation, so with this environment's setuptools), which keeps build output out of the tree.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("anchor_cache", "server", "clients")
ENGINE_AND_SERVER = ("anchor_cache", "server", "torch", "transformers")


def pyproject(path: Path = ROOT / "pyproject.toml") -> dict:
    return tomllib.loads(path.read_text())


def require_setuptools() -> None:
    """Skip unless this environment can build offline (what pyproject's build-system asks for)."""
    try:
        import setuptools
    except ImportError:
        pytest.skip("setuptools is not installed, so no wheel can be built offline")
    if Version(setuptools.__version__) < Version("77"):
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX licences (77); building needs the network")


def build_wheel(source: Path, out: Path) -> Path:
    """A wheel of `source`, offline, with pip and this environment's setuptools."""
    require_setuptools()
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out),
         str(source)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return next(out.glob("*.whl"))


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build", "*.egg-info"))


def metadata(wheel: Path) -> tuple[list[str], dict]:
    """The wheel's file names and its METADATA headers (Requires-Dist and License-File as lists)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        text = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    msg = Parser().parsestr(text)
    return names, {k: msg.get_all(k) or [] for k in ("Requires-Dist", "License-File")} | {
        k: msg[k] for k in ("Name", "Version", "License-Expression", "License")}


# The licence and the main distribution


def test_licence_is_an_spdx_expression_with_its_file():
    project = pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the anchorserve authors" in text
    requires = pyproject()["build-system"]["requires"]
    assert any(Requirement(r).name == "setuptools" and Version("77") in Requirement(r).specifier for r in requires)


def test_main_wheel_builds_without_licence_warnings_and_carries_every_package_file(tmp_path):
    require_setuptools()
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for package in PACKAGES:
        copy_tree(ROOT / package, src / package)
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c",
         "import sys; from setuptools import build_meta as b; b.build_wheel(sys.argv[1])", str(tmp_path / "out")],
        cwd=src, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert not re.search(r"licen[cs]e.*deprecated|deprecated.*licen[cs]e", done.stdout + done.stderr, re.I | re.S), \
        done.stderr
    names, meta = metadata(next((tmp_path / "out").glob("*.whl")))
    assert meta["License-Expression"] == "MIT" and meta["License-File"] == ["LICENSE"] and not meta["License"]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # Data files (a built-in task's pool, say) must reach the wheel, or `pip install .` serves without them:
    # list them under [tool.setuptools.package-data].
    expected = {p.relative_to(src).as_posix() for package in PACKAGES for p in (src / package).rglob("*")
                if p.is_file() and p.name != "pyproject.toml"}  # clients/pyproject.toml builds anchorserve-client
    assert expected - set(names) == set()


def test_make_setup_installs_the_setuptools_the_editable_build_needs():
    """`make setup` builds without isolation, with the venv's setuptools: Python 3.11's venv brings 65.5."""
    recipe = (ROOT / "Makefile").read_text()
    upgrade = re.search(r"pip install [^\n]*'(setuptools[^']*)'", recipe)
    assert upgrade and upgrade.start() < recipe.index("--no-build-isolation"), "setuptools must be upgraded first"
    needed = next(Requirement(r) for r in pyproject()["build-system"]["requires"] if r.startswith("setuptools"))
    floor = Version(next(s.version for s in needed.specifier if s.operator == ">="))
    given = Requirement(upgrade.group(1)).specifier
    assert any(s.operator in (">=", "==") and Version(s.version) >= floor for s in given), (given, floor)


def test_requirements_pin_versions_the_pyproject_ranges_allow():
    """requirements.txt pins what the tests ran; pyproject's ranges must admit those pins."""
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements.txt must pin exactly: {line}"
            pins[canonicalize_name(req.name)] = Version(spec.version)
    for line in pyproject()["project"]["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but requirements.txt does not pin it"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {line}"


# The client-only distribution (clients/pyproject.toml): an application that calls the server installs no torch


def client_project() -> dict:
    return pyproject(ROOT / "clients" / "pyproject.toml")


def test_client_distribution_matches_the_main_one():
    client, main = client_project()["project"], pyproject()["project"]
    assert client["version"] == main["version"] and client["license"] == main["license"]
    assert client["scripts"]["anchorserve-client"] == main["scripts"]["anchorserve-client"]
    pins = {canonicalize_name(Requirement(r).name): r for r in (ROOT / "requirements.txt").read_text().splitlines()
            if r.strip() and not r.startswith("#")}
    for line in client["dependencies"]:
        req = Requirement(line)
        pinned = Requirement(pins[canonicalize_name(req.name)])
        assert req.specifier.contains(next(iter(pinned.specifier)).version), f"{line} excludes the tested {pinned}"


def tree_files(folder: Path) -> set[Path]:
    return {p.relative_to(folder) for p in folder.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    """Built from the clients folder itself, as `pip install ./clients` builds it: the tree must stay
    as it was (no build/, no egg-info)."""
    before = tree_files(ROOT / "clients")
    wheel = build_wheel(ROOT / "clients", tmp_path_factory.mktemp("client-wheel"))
    assert tree_files(ROOT / "clients") == before, tree_files(ROOT / "clients") ^ before
    return wheel


def test_client_wheel_holds_only_the_client_and_needs_no_torch(client_wheel):
    names, meta = metadata(client_wheel)
    assert meta["Name"] == "anchorserve-client" and meta["License-Expression"] == "MIT"
    assert {n.split("/")[0] for n in names} == {"clients", "anchorserve_client-0.1.0.dist-info"}
    needed = {canonicalize_name(Requirement(r).name) for r in meta["Requires-Dist"]}
    assert needed == {"httpx", "pydantic", "tenacity", "tqdm"}, needed
    with zipfile.ZipFile(client_wheel) as z:
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "anchorserve-client = clients.cli:main" in entry_points


def third_party_imports(package: Path) -> set[str]:
    """Top-level modules a package's files import, less the standard library and the package itself."""
    found = set()
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {package.name, "__future__"}


def test_client_imports_without_the_engine_the_server_or_torch(client_wheel, tmp_path):
    """The import graph runs engine → server → clients: the installed client must not reach back."""
    declared = {canonicalize_name(Requirement(r).name) for r in client_project()["project"]["dependencies"]}
    assert third_party_imports(ROOT / "clients") <= declared
    site = tmp_path / "site"
    with zipfile.ZipFile(client_wheel) as z:
        z.extractall(site)
    code = (
        "import sys\n"
        f"for name in {ENGINE_AND_SERVER!r}:\n"
        "    sys.modules[name] = None  # any import of them raises ImportError\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "import clients, clients.client, clients.cli\n"
        f"assert clients.__file__.startswith({str(site)!r}), clients.__file__\n"
        "clients.cli.build_parser().parse_args(['tasks'])\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# The Docker build context


def dockerignore_rules(lines: list[str] | None = None) -> list[tuple[bool, re.Pattern[str]]]:
    """(is_exception, regex) per .dockerignore line, with Docker's semantics: `**` spans folders, `*`
    and `?` stay within one, a leading `/` is dropped, `!` re-includes, and the last match wins."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines() if lines is None else lines:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate, line = line.startswith("!"), line.lstrip("!").strip().lstrip("/").rstrip("/")
        regex, i = "", 0
        while i < len(line):
            if line.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif line.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif line[i] in "*?":
                regex, i = regex + ("[^/]*" if line[i] == "*" else "[^/]"), i + 1
            elif line[i] == "[" and "]" in line[i + 2 :]:  # a character class, copied as it is ([!x] negates)
                end = line.index("]", i + 2)
                body = line[i + 1 : end]
                regex, i = regex + "[" + ("^" + body[1:] if body.startswith("!") else body) + "]", end + 1
            else:
                regex, i = regex + re.escape(line[i]), i + 1
        rules.append((negate, re.compile(regex + r"\Z")))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether `path` stays out of the context: a rule that matches it or a folder above it decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    verdict = False
    for negate, regex in rules:
        if any(regex.match(p) for p in prefixes):
            verdict = not negate
    return verdict


def dockerfile_sources() -> list[str]:
    """The context paths every COPY/ADD names (not those copied from another stage)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    sources = []
    for line in text.splitlines():
        words = line.strip().split(None, 1)
        if len(words) < 2 or words[0].upper() not in ("COPY", "ADD"):
            continue
        args = json.loads(words[1]) if words[1].lstrip().startswith("[") else shlex.split(words[1])
        if any(a.startswith("--from") for a in args):
            continue
        sources += [a for a in args if not a.startswith("--")][:-1]
    return sources


def test_dockerignore_keeps_everything_the_dockerfile_copies():
    rules, sources = dockerignore_rules(), dockerfile_sources()
    assert {"requirements.txt", "anchor_cache", "server", "clients"} <= {s.rstrip("/") for s in sources}
    for source in sources:
        matches = list(ROOT.glob(source.rstrip("/")))
        assert matches, f"COPY {source}: no such path"
        for match in matches:
            files = [match] if match.is_file() else [p for p in match.rglob("*") if p.is_file()]
            kept = [p for p in files if "__pycache__" not in p.parts and p.suffix != ".pyc"]
            for path in kept:
                rel = path.relative_to(ROOT).as_posix()
                assert not ignored(rel, rules), f"{rel} is COPYed by the Dockerfile but .dockerignore drops it"


@pytest.mark.parametrize("path", [
    ".venv", ".venv/bin/python", ".git", ".git/HEAD", ".gpuA/whl/torch.whl", ".gpuB/gguf.part.ab",
    "anchor_cache/__pycache__/cli.cpython-311.pyc", ".pytest_cache/v/cache", ".hypothesis/examples",
    ".ruff_cache/x", "tests/test_server.py", "docs/analyses/saliency-trec.png", "bench/results/load.json",
    "clients/build/lib/clients/cli.py", "anchorserve.egg-info/PKG-INFO", ".env",
])
def test_dockerignore_drops_environments_caches_and_what_the_image_does_not_use(path):
    assert ignored(path, dockerignore_rules())


def test_dockerignore_matcher_follows_docker_semantics():
    """The matcher above, on the cases that differ between Docker and shell globbing."""
    def rules_of(*lines: str) -> list:
        return dockerignore_rules(list(lines))

    assert ignored("a/b/c.pyc", rules_of("**/*.pyc")) and ignored("c.pyc", rules_of("**/*.pyc"))
    assert not ignored("a/c.pyc", rules_of("*.pyc"))  # a single * stays in the top folder
    assert ignored("docs/x/y.png", rules_of("docs"))  # a folder takes its contents with it
    assert not ignored("docs/keep.md", rules_of("docs/*", "!docs/keep.md"))  # the last match wins
    assert ignored("build", rules_of("/build/")) and not ignored("a/build", rules_of("/build"))
    assert ignored("a/b.pyc", rules_of("**/*.py[cod]")) and not ignored("a/b.py", rules_of("**/*.py[cod]"))
    assert ignored("a.txt", rules_of("a.[!p]*")) and not ignored("a.py", rules_of("a.[!p]*"))


# The results document: its paper tables come from the stored JSON, with their spreads, and show every figure


def test_results_tables_match_the_stored_json_with_their_spreads():
    from bench import tables

    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    for name, section in tables.SECTIONS.items():
        lines = section().splitlines()
        rows = [line for line in lines if line.startswith("|")]
        missing = [row for row in rows if row not in doc]
        assert not missing, f"docs/RESULTS.md lacks rows of `python -m bench.tables {name}`: {missing[:3]}"
        body = [line for line, after in zip(lines, [*lines[1:], ""], strict=True)
                if line.startswith("| ") and not after.startswith("|---")]  # neither a header nor a rule
        assert body and all(" ± " in row for row in body), name


def test_results_embed_every_figure_and_every_link_resolves():
    docs = ROOT / "docs"
    doc = (docs / "RESULTS.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", doc)
    assert all((docs / link).is_file() for link in linked), [link for link in linked if not (docs / link).is_file()]
    figures = {p.relative_to(docs).as_posix() for p in docs.rglob("*.png")}
    assert figures - set(linked) == set(), "figures under docs/ that RESULTS.md does not show"

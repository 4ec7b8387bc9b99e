"""No Docker engine runs here: check what can be checked without one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_files_parse_and_wire_nginx_to_replicas():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["anchorserve"]["deploy"]["replicas"] >= 2
    assert "anchorserve-state:/data" in services["anchorserve"]["volumes"]
    assert "8000:8000" in services["nginx"]["ports"]
    nginx = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "server anchorserve:8000" in nginx
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    devices = gpu["services"]["anchorserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_dockerfile_matches_the_readme_and_the_code():
    dockerfile = (ROOT / "Dockerfile").read_text()
    readme = (ROOT / "README.md").read_text()
    assert 'CMD ["python", "-m", "server"]' in dockerfile and (ROOT / "server" / "__main__.py").is_file()
    assert "USER anchorserve" in dockerfile and "/ready" in dockerfile
    args = set(re.findall(r"^ARG (\w+)", dockerfile, flags=re.M))
    for line in readme.splitlines():
        if line.strip().startswith("docker build"):
            assert set(re.findall(r"--build-arg (\w+)=", line)) <= args, line
    for path in re.findall(r"^COPY (\S+) ", dockerfile, flags=re.M):
        assert (ROOT / path).exists(), path
    assert "docker compose up" in readme and "docker build" in readme


# ------------------------------------------------------------------ deploy/nginx.conf, parsed
# tests/test_nginx.py runs the same file in a real nginx; these checks need no binary.


def parse_nginx(text: str) -> list[tuple[str, list[str], list | None]]:
    """nginx's config syntax as (directive, args, block-or-None); quotes unescaped like nginx does."""
    tokens = re.findall(r"""'((?:[^'\\]|\\.)*)'|"((?:[^"\\]|\\.)*)"|(#[^\n]*)|([{};])|([^\s{};'"#]+)""", text)
    unescape = {"n": "\n", "t": "\t", "r": "\r"}
    stack: list[list] = [[]]
    words: list[str] = []
    for single, double, comment, punct, bare in tokens:
        if comment:
            continue
        if punct == ";":
            stack[-1].append((words[0], words[1:], None))
            words = []
        elif punct == "{":
            block: list = []
            stack[-1].append((words[0], words[1:], block))
            stack.append(block)
            words = []
        elif punct == "}":
            assert not words, words
            stack.pop()
        else:
            word = single or double or bare
            words.append(re.sub(r"\\(.)", lambda m: unescape.get(m.group(1), m.group(1)), word))
    assert len(stack) == 1 and not words, "unbalanced nginx.conf"
    return stack[0]


def directives(block: list, name: str) -> list[list[str]]:
    return [args for directive, args, _ in block if directive == name]


def blocks(block: list, name: str) -> dict[str, list]:
    return {" ".join(args): body for directive, args, body in block if directive == name}


NGINX_CONF = parse_nginx((ROOT / "deploy" / "nginx.conf").read_text())
SERVER = blocks(NGINX_CONF, "server")[""]
LOCATIONS = blocks(SERVER, "location")


def nginx_size(value: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([kKmMgG]?)", value).groups()
    return int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def test_nginx_body_limit_equals_the_server_default():
    from server.settings import Settings

    (limit,) = directives(SERVER, "client_max_body_size")
    default = Settings.model_fields["max_payload_bytes"].default
    assert nginx_size(limit[0]) == default
    assert not any(directives(body, "client_max_body_size") for body in LOCATIONS.values())
    # nginx's own 413 names the same limit as the app's (server/limits.py).
    (page,) = directives(LOCATIONS["@nginx_413"], "return")
    assert f"payload exceeds {default} bytes" in json.loads(page[1])["error"]


def test_nginx_request_id_is_kept_or_generated_sent_upstream_returned_and_logged():
    (source, var), table = next((args, body) for d, args, body in NGINX_CONF if d == "map")
    assert source == "$http_x_request_id" and var.startswith("$")
    entries = {key: args[0] for key, args, _ in table}
    assert entries["default"] == "$request_id" and "$http_x_request_id" in entries.values()
    assert ["X-Request-Id", var] in directives(SERVER, "proxy_set_header")
    assert ["X-Request-Id", var, "always"] in directives(SERVER, "add_header")
    assert ["X-Request-Id"] in directives(SERVER, "proxy_hide_header")  # the app's echo is not doubled
    # A location with its own proxy_set_header/add_header would silently drop the server-level ones.
    for name, body in LOCATIONS.items():
        assert not directives(body, "proxy_set_header") and not directives(body, "add_header"), name
    (log,) = directives(SERVER, "access_log")
    formats = {args[0]: "".join(args[1:]) for args in directives(NGINX_CONF, "log_format")}
    assert var in formats[log[1]]


def test_nginx_retries_posts_only_on_classify():
    classify = LOCATIONS["= /v1/classify"]
    (retry,) = directives(classify, "proxy_next_upstream")
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry)
    (tries,) = directives(classify, "proxy_next_upstream_tries")
    assert 1 < int(tries[0]) <= 3
    assert directives(classify, "proxy_next_upstream_timeout")
    for name, body in LOCATIONS.items():
        if name != "= /v1/classify":
            assert all("non_idempotent" not in args for args in directives(body, "proxy_next_upstream")), name
    assert not any("non_idempotent" in args for args in directives(SERVER, "proxy_next_upstream"))
    # PUT and DELETE count as idempotent to nginx: admin writes need retries switched off outright.
    assert directives(LOCATIONS["/admin/"], "proxy_next_upstream") == [["off"]]
    for name, body in LOCATIONS.items():
        if not name.startswith("@"):
            assert directives(body, "proxy_pass") == [["http://anchorserve"]], name


def test_nginx_own_errors_are_json_envelopes_and_app_errors_pass_through():
    kinds = {"413": "payload_too_large", "502": "unavailable", "503": "unavailable", "504": "timeout"}
    pages = {args[0]: args[-1] for args in directives(SERVER, "error_page")}
    assert set(pages) == set(kinds)
    for code, kind in kinds.items():
        body = LOCATIONS[pages[code]]
        assert directives(body, "default_type") == [["application/json"]]
        assert blocks(body, "types") == {"": []}  # no extension turns it back into text/html
        ((status, text),) = directives(body, "return")
        payload = json.loads(text)
        assert status == code and set(payload) == {"error", "type"} and payload["type"] == kind
    # The app answers its own errors in JSON already: nginx must not replace them.
    every = [SERVER, *LOCATIONS.values()]
    assert all(args == ["off"] for b in every for args in directives(b, "proxy_intercept_errors"))


def test_nginx_and_the_app_keep_the_same_client_request_ids():
    from server.app import acceptable_request_id

    _, table = next((args, body) for d, args, body in NGINX_CONF if d == "map")
    (pattern,) = [key[1:] for key, _, _ in table if key.startswith("~")]
    samples = [
        "client-id-123",
        "0" * 32,
        "3f2b9c1e-7d4a-4e8b-9f00-1a2b3c4d5e6f",
        "a" * 128,
        "a" * 129,
        "bad id",
        "",
        "x/y",
        'q"uote',
        "tab\tid",
        "ünïcode",
    ]
    for sample in samples:
        # nginx's $request_id (32 hex digits) and every id nginx passes through are kept by the app as is.
        assert (re.search(pattern, sample) is not None) == acceptable_request_id(sample), sample

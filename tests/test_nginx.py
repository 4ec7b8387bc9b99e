"""The shipped deploy/nginx.conf in a real nginx, in front of two stand-in replicas on loopback.

Only the upstream addresses, the listen port and the access-log path are rewritten (each must match
exactly once, so a drifting config fails here instead of being tested half); every other byte is the
shipped file. The stand-ins are stdlib HTTP servers: one answers 503 JSON like a replica whose model
is still loading, the other answers 200 and reports what it received.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "deploy" / "nginx.conf"
DEADLINE_S = 10.0
LOADING_BODY = b'{"error": "model is still loading", "type": "unavailable"}'
ENVELOPE_KEYS = {"error", "type"}


def find_nginx() -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin"])
    return shutil.which("nginx", path=path)


NGINX = find_nginx()
if NGINX is None:
    message = "nginx not installed: `apt-get install nginx` (or your OS's nginx package) to run these tests"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message + " (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


def nginx_modules_missing(binary: str) -> set[str]:
    out = subprocess.run([binary, "-V"], capture_output=True, text=True, timeout=10)
    return set(re.findall(r"--without-http_(\w+?)_module", out.stderr + out.stdout))


# ------------------------------------------------------------------------------------------ stand-ins
@dataclass
class Upstream:
    name: str
    status: int  # what it answers to every request
    received: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def requests(self, path: str | None = None) -> list[dict]:
        with self.lock:
            return [r for r in self.received if path is None or r["path"] == path]


def start_upstream(name: str, status: int) -> Upstream:
    upstream = Upstream(name, status)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as nginx's `keepalive 32` expects

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            request_id = self.headers.get("X-Request-Id")
            with upstream.lock:
                upstream.received.append(
                    {"method": self.command, "path": self.path, "request_id": request_id, "bytes": len(body)}
                )
            if upstream.status == 200:
                payload = json.dumps({"upstream": upstream.name, "bytes": len(body), "request_id": request_id})
                out = payload.encode()
            else:
                out = LOADING_BODY
            self.send_response(upstream.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            if request_id:
                self.send_header("X-Request-ID", request_id)  # as asgi-correlation-id echoes it
            self.end_headers()
            self.wfile.write(out)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.block_on_close = False  # nginx's idle keep-alive connections must not hold the teardown
    upstream.server = server
    threading.Thread(target=server.serve_forever, name=f"upstream-{name}", daemon=True).start()
    return upstream


def stop_upstream(upstream: Upstream) -> None:
    upstream.server.shutdown()
    upstream.server.server_close()


# ------------------------------------------------------------------------------------------ nginx
def derived_config(upstream_ports: list[int], listen_port: int, access_log: Path) -> str:
    """deploy/nginx.conf with only the upstream servers, the listen port and the log path replaced."""
    text = SHIPPED.read_text()
    replacements = {
        "    server anchorserve:8000;\n": "".join(f"    server 127.0.0.1:{p};\n" for p in upstream_ports),
        "    listen 8000;\n": f"    listen 127.0.0.1:{listen_port};\n",
        "access_log /var/log/nginx/access.log anchorserve;": f"access_log {access_log} anchorserve;",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"deploy/nginx.conf no longer contains {old!r} exactly once"
        text = text.replace(old, new)
    return text


def main_config(tmp: Path, site: Path) -> str:
    """The `http {}` context the nginx image gives conf.d/*.conf, with every path inside tmp."""
    missing = nginx_modules_missing(NGINX)
    temp = [f"client_body_temp_path {tmp / 'client_body'};", f"proxy_temp_path {tmp / 'proxy'};"]
    temp += [f"{m}_temp_path {tmp / m};" for m in ("fastcgi", "uwsgi", "scgi") if m not in missing]
    mime = "include /etc/nginx/mime.types;" if Path("/etc/nginx/mime.types").is_file() else ""
    # One process (master_process off): no `user` switch when run as root, so the temp dirs stay writable.
    return "\n".join(
        [
            "daemon off;",
            "master_process off;",
            f"pid {tmp / 'nginx.pid'};",
            f"error_log {tmp / 'error.log'} info;",
            "events { worker_connections 64; }",
            "http {",
            f"    {mime}",
            "    default_type application/octet-stream;",
            *(f"    {line}" for line in temp),
            f"    access_log {tmp / 'default-access.log'};",
            f"    include {site};",
            "}",
            "",
        ]
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Nginx:
    port: int
    access_log: Path
    process: subprocess.Popen

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=DEADLINE_S)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response, response.read()
        finally:
            conn.close()

    def wait_for_log(self, needle: str) -> str:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            text = self.access_log.read_text() if self.access_log.exists() else ""
            if needle in text:
                return text
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in the access log within {DEADLINE_S}s:\n{text}")


def start_nginx(tmp: Path, upstream_ports: list[int]) -> Nginx:
    port = free_port()
    access_log = tmp / "access.log"
    site = tmp / "default.conf"
    site.write_text(derived_config(upstream_ports, port, access_log))
    conf = tmp / "nginx.conf"
    conf.write_text(main_config(tmp, site))
    command = [NGINX, "-p", str(tmp), "-c", str(conf)]
    if nginx_version(NGINX) >= (1, 19, 5):
        command += ["-e", str(tmp / "error.log")]  # else the built-in error log is opened before the config
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        if process.poll() is not None:
            log = (tmp / "error.log").read_text() if (tmp / "error.log").exists() else ""
            raise AssertionError(f"nginx exited ({process.returncode}): {process.stdout.read().decode()}\n{log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return Nginx(port, access_log, process)
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"nginx did not listen on {port} within {DEADLINE_S}s") from None
            time.sleep(0.02)


def stop_nginx(nginx: Nginx) -> None:
    nginx.process.terminate()
    try:
        nginx.process.wait(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        nginx.process.kill()
        nginx.process.wait(timeout=DEADLINE_S)
    nginx.process.stdout.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Nginx, Upstream, Upstream]]:
    """nginx over a loading replica (listed first, so round-robin reaches it first) and a healthy one."""
    loading, healthy = start_upstream("loading", 503), start_upstream("healthy", 200)
    nginx = start_nginx(tmp_path, [loading.port, healthy.port])
    yield nginx, loading, healthy
    stop_nginx(nginx)
    stop_upstream(loading)
    stop_upstream(healthy)


def assert_json_envelope(response, body: bytes, kind: str) -> dict:
    assert response.getheader("Content-Type", "").split(";")[0] == "application/json", response.getheaders()
    payload = json.loads(body)
    assert set(payload) == ENVELOPE_KEYS and payload["type"] == kind and payload["error"], payload
    return payload


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("path", ["/v1/classify", "/classify", "/predict", "/", "/invocations"])
def test_classify_post_is_retried_on_the_healthy_replica(cluster, path):
    """Every classification route (this server's, vLLM's, TEI's, Hugging Face's) is retried."""
    nginx, loading, healthy = cluster
    body = json.dumps({"task": "sentiment", "inputs": ["a fine film"]}).encode()
    for _ in range(4):
        response, out = nginx.request("POST", path, body, {"Content-Type": "application/json"})
        assert response.status == 200, out
        got = json.loads(out)
        assert got["upstream"] == "healthy" and got["bytes"] == len(body), got
    tried = loading.requests(path)
    assert tried, "round-robin never reached the loading replica, so no retry was exercised"
    # The retry carried the same body and the same request id as the first attempt.
    retried_ids = {r["request_id"] for r in healthy.requests(path)}
    assert all(r["bytes"] == len(body) and r["request_id"] in retried_ids for r in tried)
    assert len(healthy.requests(path)) == 4


def test_admin_post_answering_503_is_not_retried(cluster):
    nginx, loading, healthy = cluster
    statuses = []
    for i in range(4):
        response, out = nginx.request("POST", "/admin/tasks", json.dumps({"name": f"t{i}"}).encode())
        statuses.append(response.status)
        if response.status == 503:
            assert out == LOADING_BODY  # the app's own JSON, not replaced by nginx
    # Every write reached exactly one replica: nothing was sent twice.
    assert len(loading.requests("/admin/tasks")) + len(healthy.requests("/admin/tasks")) == 4
    assert statuses.count(503) == len(loading.requests("/admin/tasks")) >= 1, statuses
    for method in ("PUT", "DELETE"):  # nginx deems these idempotent; admin writes must still go once
        before = len(loading.received) + len(healthy.received)
        for _ in range(2):
            nginx.request(method, "/admin/tasks/t0", b"{}")
        assert len(loading.received) + len(healthy.received) == before + 2


def test_classify_with_every_replica_loading_passes_the_apps_503_through(tmp_path):
    first, second = start_upstream("a", 503), start_upstream("b", 503)
    nginx = start_nginx(tmp_path, [first.port, second.port])
    try:
        response, out = nginx.request("POST", "/v1/classify", b"{}")
        assert response.status == 503 and out == LOADING_BODY
        assert len(first.received) + len(second.received) == 2  # proxy_next_upstream_tries 2
    finally:
        stop_nginx(nginx)
        stop_upstream(first)
        stop_upstream(second)


def test_body_size_limit_is_the_apps_and_answers_json(cluster):
    from server.settings import Settings

    nginx, loading, healthy = cluster
    limit = Settings.model_fields["max_payload_bytes"].default
    ok, out = nginx.request("POST", "/v1/classify", b"x" * limit)
    assert ok.status == 200 and json.loads(out)["bytes"] == limit
    seen = len(loading.received) + len(healthy.received)
    response, out = nginx.request("POST", "/v1/classify", b"x" * (limit + 1))
    assert response.status == 413
    payload = assert_json_envelope(response, out, "payload_too_large")
    assert str(limit) in payload["error"]
    assert response.getheader("X-Request-Id")
    assert len(loading.received) + len(healthy.received) == seen  # refused by nginx, never forwarded


def test_replicas_down_give_json_unavailable(tmp_path):
    # Bound but not listening: connecting is refused at once, and no other process can take the port.
    holders = [socket.socket() for _ in range(2)]
    try:
        for s in holders:
            s.bind(("127.0.0.1", 0))
        nginx = start_nginx(tmp_path, [s.getsockname()[1] for s in holders])
        try:
            for method, path, body in [
                ("POST", "/v1/classify", b"{}"),
                ("GET", "/v1/tasks", None),
                ("GET", "/page.html", None),
                ("POST", "/admin/tasks", b"{}"),
            ]:
                response, out = nginx.request(method, path, body)
                assert response.status in (502, 503), (path, response.status, out)
                assert_json_envelope(response, out, "unavailable")
                assert response.getheader("X-Request-Id")
        finally:
            stop_nginx(nginx)
    finally:
        for s in holders:
            s.close()


def test_request_id_is_passed_through_generated_returned_and_logged(cluster):
    nginx, _, healthy = cluster
    response, out = nginx.request("GET", "/v1/tasks", headers={"X-Request-Id": "client-id-123"})
    assert response.status == 200
    assert response.msg.get_all("X-Request-Id") == ["client-id-123"]  # one header, though the app echoes it
    assert json.loads(out)["request_id"] == "client-id-123"
    nginx.wait_for_log("request_id=client-id-123 ")

    response, out = nginx.request("GET", "/v1/tasks")
    generated = response.msg.get_all("X-Request-Id")
    assert len(generated) == 1 and re.fullmatch(r"[0-9a-f]{32}", generated[0]), generated
    assert json.loads(out)["request_id"] == generated[0]
    nginx.wait_for_log(f"request_id={generated[0]} ")

    # Not an id (spaces, quotes): replaced by a generated one rather than copied into headers and logs.
    response, out = nginx.request("GET", "/v1/tasks", headers={"X-Request-Id": 'bad id "x"'})
    replaced = response.getheader("X-Request-Id")
    assert re.fullmatch(r"[0-9a-f]{32}", replaced) and json.loads(out)["request_id"] == replaced
    assert {r["request_id"] for r in healthy.received} >= {"client-id-123", generated[0], replaced}

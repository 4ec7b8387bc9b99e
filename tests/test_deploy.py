"""No Docker engine runs here: check what can be checked without one."""

from __future__ import annotations

import itertools
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]


def test_compose_files_parse_and_wire_nginx_to_replicas():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["anchorserve"]["deploy"]["replicas"] >= 2
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
    # the project is installed, so its console scripts exist in the image
    assert re.search(r"^RUN pip install --no-deps \.", dockerfile, flags=re.M)


# ------------------------------------------------------------------ replicas sharing state through Redis

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
K8S_DIR = ROOT / "deploy" / "k8s"


def argv(command: str | list[str]) -> list[str]:
    """A compose `command`/`test` or a k8s `command`/`args`, as a list of words."""
    words = shlex.split(command) if isinstance(command, str) else [str(w) for w in command]
    return words[1:] if words[:1] in (["CMD"], ["CMD-SHELL"]) else words


def has_flag(words: list[str], flag: str, value: str) -> bool:
    return any(a == flag and b == value for a, b in itertools.pairwise(words))


def k8s_docs() -> list[dict]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), path
                docs.append(doc)
    return docs


def k8s(kind: str, name: str) -> dict:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_compose_runs_redis_with_persistence_and_a_healthcheck():
    redis = COMPOSE["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    words = argv(redis["command"])
    assert words[0] == "redis-server" and has_flag(words, "--appendonly", "yes")
    volume, _, target = next(v for v in redis["volumes"] if v.endswith(":/data")).partition(":")
    assert target == "/data" and volume in COMPOSE["volumes"]  # a named volume, not a container layer
    assert argv(redis["healthcheck"]["test"]) == ["redis-cli", "ping"]


def test_compose_replicas_share_redis_and_start_in_order():
    services = COMPOSE["services"]
    app = services["anchorserve"]
    assert app["deploy"]["replicas"] >= 2
    env = app["environment"]
    assert {"ANCHORSERVE_API_KEY", "ANCHORSERVE_ADMIN_API_KEY"} <= set(env)
    url = urlsplit(env["ANCHORSERVE_STATE_URL"])
    assert url.scheme == "redis" and url.hostname in services and services[url.hostname]["image"].startswith("redis")
    assert url.port == 6379 and url.path == "/0"
    # No shared state volume: a volume mounted by every replica would bypass Redis.
    assert not any(str(v).endswith(":/data") for v in app.get("volumes", []))
    assert app["depends_on"] == {url.hostname: {"condition": "service_healthy"}}
    health = " ".join(argv(app["healthcheck"]["test"]))
    assert health.startswith("python -c ") and "http://127.0.0.1:8000/ready" in health
    assert "curl" not in health and "wget" not in health  # neither is in the image
    assert services["nginx"]["depends_on"] == {"anchorserve": {"condition": "service_healthy"}}
    # The GPU override still merges onto the same service.
    gpu = yaml.safe_load((ROOT / "docker-compose.gpu.yml").read_text())
    assert "ANCHORSERVE_STATE_URL" not in gpu["services"]["anchorserve"].get("environment", {})


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker client")
def test_docker_compose_config_accepts_the_files():
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose plugin")
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.gpu.yml"]):
        args = [arg for f in files for arg in ("-f", str(ROOT / f))]
        result = subprocess.run(["docker", "compose", *args, "config", "-q"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_every_k8s_file_parses():
    names = sorted(p.name for p in K8S_DIR.glob("*.yaml"))
    assert names == ["anchorserve.yaml", "redis.yaml", "secret.example.yaml"]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in k8s_docs()}
    assert {
        ("Deployment", "anchorserve"),
        ("Service", "anchorserve"),
        ("Service", "redis"),
        ("Secret", "anchorserve-redis"),
    } <= kinds


def container_port(container: dict, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as the number."""
    by_name = {p["name"]: p["containerPort"] for p in container["ports"] if "name" in p}
    return by_name[port] if isinstance(port, str) else port


def test_k8s_deployment_probes_resources_and_shutdown():
    deployment = k8s("Deployment", "anchorserve")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert [p["containerPort"] for p in container["ports"]] == [8000]
    ready, alive = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["path"] == "/ready" and container_port(container, ready["port"]) == 8000
    assert alive["path"] == "/health" and container_port(container, alive["port"]) == 8000
    # The model loads at start: liveness must not kill a pod that is still loading.
    liveness = container["livenessProbe"]
    assert liveness["initialDelaySeconds"] + liveness["periodSeconds"] * liveness["failureThreshold"] >= 90
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][part]), part
    # SIGTERM drains queued requests for up to 30 s (uvicorn's graceful shutdown), after preStop.
    pause = argv(container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"]))
    assert pause[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] >= 30 + int(pause[1])
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's user


def test_k8s_state_url_and_keys_come_from_the_example_secrets():
    (container,) = k8s("Deployment", "anchorserve")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["ANCHORSERVE_STATE_URL"]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == ("anchorserve-redis", "url") and not ref.get("optional", False)
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all((K8S_DIR / "secret.example.yaml").read_text())}
    for name, var in env.items():
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["key"] in secrets[ref["name"]]["stringData"], name
    # The example URL points at the example Redis Service.
    url = urlsplit(secrets["anchorserve-redis"]["stringData"]["url"])
    redis_service = k8s("Service", url.hostname)
    assert url.scheme == "redis" and url.port in [p["port"] for p in redis_service["spec"]["ports"]]


def test_k8s_service_selects_the_pods_and_targets_the_container_port():
    deployment = k8s("Deployment", "anchorserve")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s("Service", "anchorserve")
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= labels.items() and service["spec"]["selector"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000 and container_port(container, port.get("targetPort", port["port"])) == 8000
    for doc in k8s_docs():
        if doc["kind"] == "PodDisruptionBudget":
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_example_redis_persists_and_serves_its_port():
    redis = next(
        d for d in k8s_docs() if d["kind"] in ("StatefulSet", "Deployment") and d["metadata"]["name"] == "redis"
    )
    spec = redis["spec"]
    assert spec.get("replicas", 1) == 1
    (container,) = spec["template"]["spec"]["containers"]
    assert container["image"].startswith("redis:7")
    words = argv(container.get("command", []) + container.get("args", []))
    assert words[0] == "redis-server" and has_flag(words, "--appendonly", "yes")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
    pvcs = {v["name"] for v in spec["template"]["spec"].get("volumes", []) if "persistentVolumeClaim" in v}
    assert mount["name"] in claims | pvcs  # persisted, not an emptyDir
    service = k8s("Service", "redis")
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items() and service["spec"]["selector"]
    (port,) = service["spec"]["ports"]
    assert port["port"] == 6379 and container_port(container, port["targetPort"]) == 6379
    assert "example" in (K8S_DIR / "redis.yaml").read_text().lower().split("\n", 1)[0]


def test_deploy_readme_covers_compose_and_k8s():
    text = (ROOT / "deploy" / "README.md").read_text()
    for needle in ("--scale anchorserve=", "ANCHORSERVE_STATE_URL", "deploy/k8s/anchorserve.yaml", "503", "1 s"):
        assert needle in text, needle
    assert "deploy/README.md" in (ROOT / "README.md").read_text()


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


CLASSIFY_LOCATION = "~ ^/(v1/classify|classify|predict|invocations)?$"


def test_nginx_retries_posts_only_on_classify():
    classify = LOCATIONS[CLASSIFY_LOCATION]
    (retry,) = directives(classify, "proxy_next_upstream")
    assert {"error", "timeout", "http_503", "non_idempotent"} <= set(retry)
    (tries,) = directives(classify, "proxy_next_upstream_tries")
    assert 1 < int(tries[0]) <= 3
    assert directives(classify, "proxy_next_upstream_timeout")
    for name, body in LOCATIONS.items():
        if name != CLASSIFY_LOCATION:
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


def test_the_readme_lists_every_metric_and_no_other():
    """The README's metrics table names each metric the server registers, and nothing it does not."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("**Metrics**"):]
    table = table[:table.index("\n\n", table.index("| metric |"))]
    listed = set(re.findall(r"^\| `(anchorserve_\w+)", table, flags=re.M))
    registered = {family.name + ("_total" if family.type == "counter" else "")
                  for family in Metrics().registry.collect()}
    assert listed == registered

"""No Docker engine runs here: check what can be checked without one."""

from __future__ import annotations

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

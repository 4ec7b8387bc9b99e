"""Real server processes for fault and replica tests (fixtures `long_model` and `launch`, registered
by `pytest_plugins` in conftest.py): start on a free loopback port, wait for /ready with a
deadline, SIGKILL or SIGTERM them, and restart them on the same state dir.

Unlike `tests.test_uvicorn.running_server` (one graceful start and stop on a config file), a
`ServerProcess` is started many times over one state dir and may be killed at any moment; its owner
calls `close()` (a fixture teardown or `finally`) so no process outlives its test.

Two launchers run `server.__main__.main()` in a fresh process with the server's environment:
- `ExecLauncher`: `python -m server` per start, ~4 s of imports each time;
- `ForkLauncher` (the default): one helper process imports the server once, then forks a child per
  start that sets the environment and calls `main()`. The child is a separate process with its own
  PID, signals and exit status; only the imports (which touch no state) are shared, so a start
  takes ~0.5 s instead of ~4 s. Set ANCHORSERVE_FAULT_EXEC=1 to use `python -m server` instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from tests.conftest import make_tokenizer
from tests.test_uvicorn import free_port

ADMIN_KEY = "fault-admin-key"
REPO = Path(__file__).resolve().parent.parent


class ServerDied(RuntimeError):
    pass


# --- launchers -------------------------------------------------------------------------------------


class Process(Protocol):
    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...


class ExecLauncher:
    def spawn(self, env: dict[str, str], log_path: Path) -> Process:
        with log_path.open("w") as log:
            return subprocess.Popen([sys.executable, "-m", "server"], cwd=REPO, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def close(self) -> None:
        pass


# The helper: imports the server, then on each command line forks a child that runs main() with the
# command's environment and log file; reports {"started": pid} and, when reaped, {"exited": pid, "code"}.
# It starts no thread, and reads its commands with os.read (no buffered stdin behind select).
_FORK_SERVER = r"""
import json, os, select, sys
import server.__main__ as entry

def report(message):
    os.write(1, (json.dumps(message) + "\n").encode())

pending = b""
while True:
    readable, _, _ = select.select([0], [], [], 0.02)
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        report({"exited": pid, "code": os.waitstatus_to_exitcode(status)})
    if not readable:
        continue
    chunk = os.read(0, 65536)
    if not chunk:
        break
    pending += chunk
    while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        command = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                log = os.open(command["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(log, 1)
                os.dup2(log, 2)
                os.environ.clear()
                os.environ.update(command["env"])
                sys.argv = [entry.__file__]
                code = entry.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:
                sys.stderr.write(f"fork child failed: {exc!r}\n")
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        report({"started": pid})
"""


class ForkedProcess:
    def __init__(self, launcher: ForkLauncher, pid: int) -> None:
        self.launcher = launcher
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.launcher.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.monotonic() + (timeout if timeout is not None else 3600)
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)


class ForkLauncher:
    def __init__(self) -> None:
        self.helper = subprocess.Popen([sys.executable, "-c", _FORK_SERVER], cwd=REPO, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, env=dict(os.environ) | {"OMP_NUM_THREADS": "1"})
        self._exits: dict[int, int] = {}
        self._started: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        self._children: list[int] = []
        threading.Thread(target=self._read, name="fork-launcher", daemon=True).start()

    def _read(self) -> None:
        for line in self.helper.stdout:
            message = json.loads(line)
            if "started" in message:
                self._started.put(message["started"])
            else:
                with self._lock:
                    self._exits[message["exited"]] = message["code"]

    def exit_code(self, pid: int) -> int | None:
        with self._lock:
            return self._exits.get(pid)

    def spawn(self, env: dict[str, str], log_path: Path) -> Process:
        self.helper.stdin.write(json.dumps({"env": env, "log": str(log_path)}).encode() + b"\n")
        self.helper.stdin.flush()
        pid = self._started.get(timeout=30)
        self._children.append(pid)
        return ForkedProcess(self, pid)

    def close(self) -> None:
        for pid in self._children:
            if self.exit_code(pid) is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.helper.stdin.close()
        try:
            self.helper.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.helper.kill()
            self.helper.wait()


def launcher() -> ExecLauncher | ForkLauncher:
    return ExecLauncher() if os.environ.get("ANCHORSERVE_FAULT_EXEC") else ForkLauncher()


@pytest.fixture(scope="session")
def long_model(tmp_path_factory) -> Path:
    """conftest's tiny Llama, a little wider and with 8192 positions (the conftest one has 512, fewer than a
    task of max_demo_tokens needs), so building a ~4000-token task takes long enough to be interrupted."""
    folder = tmp_path_factory.mktemp("fault-model")
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         initializer_range=0.2, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def launch():
    """Starts server processes (forked from one helper that imported the server, see tests/processes.py)."""
    starter = launcher()
    yield starter
    starter.close()


# --- one server over one state dir -------------------------------------------------------------------


class ServerProcess:
    """One server configuration (env) over one state dir; each `start()` is a new process."""

    def __init__(self, launcher: ExecLauncher | ForkLauncher, root: Path, model: Path, tasks: list[dict[str, Any]],
                 state_dir: Path | None = None, **settings: Any) -> None:
        self.launcher = launcher
        self.root = root
        self.state_dir = state_dir or root / "state"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORSERVE_")} | {
            "ANCHORSERVE_MODEL": str(model),
            "ANCHORSERVE_DEVICE": "cpu",
            "ANCHORSERVE_DTYPE": "float32",
            "ANCHORSERVE_STATE_DIR": str(self.state_dir),
            "ANCHORSERVE_ADMIN_API_KEY": ADMIN_KEY,
            "ANCHORSERVE_TASKS": json.dumps(tasks),
            "ANCHORSERVE_MAX_WAIT_MS": "0",
            "OMP_NUM_THREADS": "1",  # two shared cores: one for the server, one for the rest
        } | {f"ANCHORSERVE_{k.upper()}": str(v) for k, v in settings.items()}
        self.proc: Process | None = None
        self.port = 0
        self.starts = 0
        self.http = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.root / f"server-{self.starts}.log"

    # --- lifecycle -------------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> dict[str, Any]:
        """Start a process and wait until /ready answers 200; returns its body."""
        assert self.proc is None or self.proc.poll() is not None, "the previous process still runs"
        self.starts += 1
        self.port = free_port()
        self.proc = self.launcher.spawn(self.env | {"PORT": str(self.port)}, self.log_path)
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerDied(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                response = self.http.get(f"{self.url}/ready", timeout=2)
                if response.status_code == 200:
                    return response.json()
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait for a graceful exit; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.http.close()

    # --- requests --------------------------------------------------------------------------------

    def get(self, path: str) -> httpx.Response:
        return self.http.get(self.url + path)

    def post(self, path: str, body: Any) -> httpx.Response:
        return self.http.post(self.url + path, json=body)

    def put(self, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
        return self.http.put(self.url + path, json=body, headers=headers)

    def delete(self, path: str) -> httpx.Response:
        return self.http.delete(self.url + path)

    def classify(self, task: str, texts: list[str]) -> list[dict[str, float]]:
        response = self.post("/v1/classify", {"task": task, "input": texts})
        assert response.status_code == 200, response.text
        return [row["label_probs"] for row in response.json()["data"]]

    def task(self, name: str) -> dict[str, Any]:
        response = self.get(f"/v1/tasks/{name}")
        assert response.status_code == 200, response.text
        return response.json()

    def send_raw(self, method: str, path: str, body: Any) -> RawRequest:
        """Send a whole request on its own connection and return at once (the answer is read later),
        so a fault can be timed from the moment the request is out."""
        return RawRequest(self.port, method, path, json.dumps(body).encode())


class RawRequest:
    """An HTTP/1.1 request written to a socket; `read_for` collects what the server answers."""

    def __init__(self, port: int, method: str, path: str, body: bytes) -> None:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ADMIN_KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(head.encode() + body)
        self.sent_at = time.monotonic()
        self.data = b""
        self.closed = False

    def read_for(self, seconds: float) -> None:
        """Collect answer bytes for up to `seconds`, or until the server closes the connection."""
        deadline = time.monotonic() + seconds
        while not self.closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if readable:
                try:
                    chunk = self.sock.recv(65536)
                except OSError:
                    chunk = b""
                self.data += chunk
                self.closed = not chunk

    def read_until(self, at: float) -> None:
        """Collect answer bytes until the monotonic instant `at` (a fault's time), even past the answer."""
        self.read_for(at - time.monotonic())
        time.sleep(max(0.0, at - time.monotonic()))

    @property
    def status(self) -> int | None:
        """The answer's status code, or None when no status line arrived."""
        if not self.data.startswith(b"HTTP/1.1 "):
            return None
        return int(self.data[9:12])

    def json(self) -> Any:
        return json.loads(self.data.partition(b"\r\n\r\n")[2])

    def close(self) -> None:
        self.sock.close()

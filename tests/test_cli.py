"""The command lines: `anchorserve` (serve + the engine commands), `python -m anchor_cache`,
`python -m server` and `anchorserve-client`.

The engine's `eval` output is a contract used by outside evaluators. Every user mistake is one
line on stderr with a non-zero exit, found before the model loads (the loader is replaced by one
that fails the test, and `--model` names a folder that does not exist).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from anchor_cache import arguments, commands
from anchor_cache.cli import main
from clients.cli import main as client_main
from server.cli import main as anchorserve_main
from tests.conftest import save_tiny_model, sentiment_task
from tests.test_uvicorn import free_port

REPO = Path(__file__).resolve().parent.parent
TASK = ["--template", "Review: {text}\\nSentiment:", "--labels", "Negative,Positive"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("cli-model"))


def run(entry, argv: list[str], capsys) -> tuple[int, list[str], str]:
    """(exit status, stderr lines, stdout) of an in-process command line, argparse exits included."""
    try:
        code = entry(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.err.splitlines(), out.out


def run_process(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)


# --- eval, reweight, analyze: results and pictures ---------------------------------------------------


def test_eval_writes_the_results_contract_and_a_picture(tiny_folder, dataset_dir, tmp_path, capsys):
    out = tmp_path / "results.json"
    methods = "vanilla,hidden_anchor,text_anchor,hidden_random,hidden_random_top,zero_shot"
    code = main([
        "eval", "--data", str(dataset_dir), *TASK, "--methods", methods, "--shots-per-class", "1",
        "--seeds", "42,43", "--limit", "5", "--top-draws", "2", "--top-dev-size", "4",
        "--model", str(tiny_folder), "--dtype", "float32", "--out", str(out), "--priors", "pool,adapt",
    ])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["config"]["template"] == "Review: {text}\nSentiment:"
    assert list(results["methods"]) == methods.split(",")
    for m in results["methods"].values():
        assert set(m) == {"accuracy", "accuracy_by_prior", "label_loyalty", "word_loyalty", "per_seed",
                          "tokens_per_request", "kv_cache_bytes"}
        assert set(m["accuracy_by_prior"]) == {"pool", "adapt"} and m["accuracy_by_prior"]["pool"] == m["accuracy"]
        assert [s["seed"] for s in m["per_seed"]] == [42, 43] and all(s["n"] == 5 for s in m["per_seed"])
        assert 0 <= m["accuracy"] <= 100 and isinstance(m["kv_cache_bytes"], int)
    vanilla, anchor = results["methods"]["vanilla"], results["methods"]["hidden_anchor"]
    assert vanilla["label_loyalty"] == vanilla["word_loyalty"] == 100
    assert anchor["tokens_per_request"] < vanilla["tokens_per_request"]
    assert 0 < anchor["kv_cache_bytes"] < vanilla["kv_cache_bytes"]
    assert results["methods"]["zero_shot"]["kv_cache_bytes"] == 0
    assert "| hidden_anchor |" in capsys.readouterr().out
    assert (tmp_path / "results.png").read_bytes().startswith(b"\x89PNG")


def test_eval_plot_has_error_bars_only_with_several_seeds():
    def results(seeds: list[float]) -> dict:
        per_seed = [{"accuracy": a, "label_loyalty": 100.0, "word_loyalty": 50.0} for a in seeds]
        method = {"accuracy": sum(seeds) / len(seeds), "label_loyalty": 100.0, "word_loyalty": 50.0,
                  "per_seed": per_seed}
        return {"config": {"model": "m", "data": "d"}, "methods": {"vanilla": method, "zero_shot": method}}

    one, several = commands.eval_plot(results([50.0])), commands.eval_plot(results([40.0, 60.0]))
    assert one.startswith(b"\x89PNG") and several.startswith(b"\x89PNG") and one != several


def test_reweight_writes_beta_and_loss_curve_and_classify_reads_it_back(tiny_folder, dataset_dir, tmp_path, capsys):
    out = tmp_path / "beta"
    code = main([
        "reweight", "--data", str(dataset_dir), *TASK, "--model", str(tiny_folder), "--train-per-class", "2",
        "--epochs", "2", "--limit", "4", "--out", str(out),
    ])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) == {"seconds", "accuracy_before", "accuracy_after", "final_loss"}
    assert all(value == float(f"{value:.4g}") for value in printed.values())  # rounded for people
    report = json.loads((out / "reweighting.json").read_text())
    assert len(report["epoch_losses"]) == 2 and len(report["step_losses"]) == 8
    assert {"accuracy_before", "accuracy_after"} <= set(report)
    assert load_file(str(out / "beta.safetensors"))["beta"].shape == (3, 4, 2)
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")

    classify = ["classify", "--data", str(dataset_dir), *TASK, "--model", str(tiny_folder), "--dtype", "float32",
                "a moving film", "dull"]
    assert main(classify) == 0
    plain = capsys.readouterr().out
    for beta in (out, out / "beta.safetensors"):
        assert main([*classify, "--beta", str(beta)]) == 0
        with_beta = capsys.readouterr().out
        assert [json.loads(x)["text"] for x in with_beta.splitlines()] == ["a moving film", "dull"]
        assert with_beta != plain  # β changes the probabilities


@pytest.mark.parametrize("kind", ["saliency", "isolation", "deep-layers", "error_diagnosis"])
def test_analyze_writes_results_and_plots(tiny_folder, dataset_dir, tmp_path, kind):
    out = tmp_path / kind
    flags = {"isolation": ["--ks", "0,1"], "error_diagnosis": ["--contexts", "2"]}.get(kind, [])  # the API's spelling
    seeds = [] if kind == "error_diagnosis" else ["--seeds", "42"]
    code = main([
        "analyze", kind, "--data", str(dataset_dir), *TASK, "--model", str(tiny_folder), "--limit", "4", *seeds,
        *flags, "--out", str(out),
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    named = {"saliency": "s_wp", "isolation": "word_loyalty", "deep-layers": "auc_roc", "error_diagnosis": "spearman"}
    assert named[kind] in results and results["params"]["limit"] == 4
    assert all(png.read_bytes().startswith(b"\x89PNG") for png in out.glob("*.png")) and list(out.glob("*.png"))


# --- data paths ----------------------------------------------------------------------------------------


def test_data_root_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ANCHORSERVE_DATA_DIR", str(tmp_path))
    assert arguments.default_data_root() == tmp_path
    monkeypatch.delenv("ANCHORSERVE_DATA_DIR")
    assert arguments.default_data_root() == REPO.parent / "shared" / "data"


def test_classify_takes_data_like_the_other_commands(tiny_folder, dataset_dir, tmp_path, monkeypatch, capsys):
    root = tmp_path / "root"
    (root / "sst2").mkdir(parents=True)
    for name in ("train.jsonl", "test.jsonl"):
        (root / "sst2" / name).write_bytes((dataset_dir / name).read_bytes())
    monkeypatch.setenv("ANCHORSERVE_DATA_DIR", str(root))
    common = ["--model", str(tiny_folder), "--dtype", "float32", "a moving film"]
    outputs = []
    for data in (["--preset", "sst2"], ["--data", str(root / "sst2"), *TASK],
                 ["--data", str(root / "sst2" / "train.jsonl"), *TASK]):
        code, err, out = run(main, ["classify", *data, *common], capsys)
        assert (code, err) == (0, [])
        outputs.append(out)
    assert len(set(outputs)) == 1 and json.loads(outputs[0])["label"] in {"Negative", "Positive"}


# --- every mistake: one line, the right status, before the model loads ------------------------------


@pytest.fixture()
def no_model(monkeypatch, tmp_path) -> list[str]:
    """`--model` naming a folder that does not exist, and a loader that fails the test if called."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(commands, "load_model", load_model)
    return ["--model", str(tmp_path / "no" / "such" / "model")]


def _bad_rows(tmp_path: Path) -> Path:
    folder = tmp_path / "bad-rows"
    folder.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (folder / name).write_text('{"label": "Positive"}\n')
    return folder


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


ENGINE_MISTAKES = {
    "no text slot": (["--template", "Review:", "--labels", "Negative,Positive"], "--template: template must contain"),
    "duplicate labels": (["--template", "R: {text}", "--labels", "Positive,positive"], "label words must be distinct"),
    "gpu device": ([*TASK, "--device", "gpu"], "'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
    "no task": (["--labels", "Negative,Positive"], "give --preset, or both --template and --labels"),
}


@pytest.mark.parametrize("command", ["classify", "eval", "reweight", "analyze"])
@pytest.mark.parametrize("mistake", list(ENGINE_MISTAKES))
def test_engine_mistakes_are_one_line_before_the_model_loads(command, mistake, no_model, dataset_dir, capsys):
    flags, message = ENGINE_MISTAKES[mistake]
    argv = {"classify": ["classify", "some text"], "eval": ["eval"], "reweight": ["reweight", "--out", "x"],
            "analyze": ["analyze", "saliency", "--out", "x"]}[command]
    started = time.monotonic()
    code, err, out = run(main, [*argv, "--data", str(dataset_dir), *flags, *no_model], capsys)
    assert code == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("python -m anchor_cache") and message in err[0], err
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("case", ["missing folder", "missing default root", "no data", "rows without text",
                                  "missing file in folder", "missing beta"])
def test_data_mistakes_are_one_line_before_the_model_loads(case, no_model, dataset_dir, tmp_path, monkeypatch,
                                                           capsys):
    monkeypatch.setenv("ANCHORSERVE_DATA_DIR", str(tmp_path / "nowhere"))
    argv, wanted = {
        "missing folder": (["eval", "--data", str(tmp_path / "nope"), *TASK], ["--data", "no such folder"]),
        "missing default root": (["eval", "--preset", "sst2"], ["--data", "ANCHORSERVE_DATA_DIR", "sst2"]),
        "no data": (["eval", *TASK], ["--data", "ANCHORSERVE_DATA_DIR"]),
        "rows without text": (["eval", "--data", str(_bad_rows(tmp_path)), *TASK], ["missing ['text']"]),
        "missing file in folder": (["reweight", "--data", str(_empty(tmp_path)), *TASK, "--out", "x"],
                                   ["has no train.jsonl"]),
        "missing beta": (["classify", "--data", str(dataset_dir), *TASK, "--beta", str(tmp_path / "b"), "text"],
                         ["--beta", "no such file"]),
    }[case]
    code, err, _ = run(main, [*argv, *no_model], capsys)
    assert code == 2 and len(err) == 1 and all(w in err[0] for w in wanted), err


def test_bad_arguments_fail_cleanly(tiny_folder, dataset_dir, tmp_path, capsys):
    code, err, _ = run(main, ["eval", "--data", str(dataset_dir), "--methods", "vanilla,nonsense"], capsys)
    assert code == 2 and len(err) == 1 and "unknown methods ['nonsense']" in err[0]
    code, err, _ = run(main, ["eval", "--data", str(tmp_path / "empty"), "--preset", "sst2",
                              "--model", str(tiny_folder)], capsys)
    assert code == 2 and len(err) == 1 and "no such folder" in err[0]


def test_analyze_refuses_bad_parameters(tiny_folder, dataset_dir, tmp_path, capsys):
    args = ["analyze", "isolation", "--data", str(dataset_dir), "--preset", "sst2", "--model", str(tiny_folder),
            "--out", str(tmp_path)]
    for bad in (["--ks", "99"], ["--params", '{"nonsense": 1}'], ["--params", "[1]"]):
        code, err, _ = run(main, [*args, *bad], capsys)
        assert code == 2 and len(err) == 1, (bad, err)


def test_a_mistake_is_one_line_in_a_real_process(dataset_dir, tmp_path):
    """No traceback and no model load, through both entry points (each a fresh interpreter)."""
    missing = str(tmp_path / "no" / "model")
    done = run_process("-m", "anchor_cache", "classify", "--data", str(dataset_dir), "--template", "Review:",
                       "--labels", "a,b", "--model", missing, "text")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == ["python -m anchor_cache: error: --template: template must contain {text} "
                                        "exactly once, got 'Review:'"]
    done = run_process("-m", "server.cli", "classify", "--data", str(tmp_path / "none"), *TASK, "--model", missing,
                       "text")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"anchorserve: error: --data {tmp_path / 'none'}: no such file or folder"]


# --- anchorserve and python -m server -------------------------------------------------------------------


def test_anchorserve_is_the_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["anchorserve"] == "server.cli:main" and scripts["anchorserve-client"] == "clients.cli:main"


def test_anchorserve_runs_the_engine_commands(no_model, dataset_dir, capsys):
    code, err, _ = run(anchorserve_main, ["eval", "--data", str(dataset_dir), "--template", "x", "--labels", "a,b",
                                          *no_model], capsys)
    assert code == 2 and err == ["anchorserve: error: --template: template must contain {text} exactly once, "
                                 "got 'x'"]
    code, err, out = run(anchorserve_main, ["--help"], capsys)
    assert code == 0 and all(c in out for c in ("serve", "eval", "classify", "reweight", "analyze"))
    code, err, out = run(anchorserve_main, ["classify", "--help"], capsys)
    assert code == 0 and "--beta" in out and "--data" in out


@pytest.mark.parametrize("argv", [["-m", "server.cli", "serve", "--help"], ["-m", "server", "--help"]])
def test_serve_help_prints_help_and_does_not_start(argv, tmp_path):
    # Were a server started, it would fail on this model (exit 2) or run until the timeout.
    env = os.environ | {"ANCHORSERVE_MODEL": str(tmp_path / "none"), "PORT": str(free_port())}
    done = run_process(*argv, env=env)
    assert done.returncode == 0 and done.stderr == ""
    assert all(flag in done.stdout for flag in ("--host", "--port", "--config", "ANCHORSERVE_CONFIG"))


@pytest.mark.parametrize("argv, message", [
    (["serve", "--config", "missing.yaml"], "settings file missing.yaml (--config, ANCHORSERVE_CONFIG): no such file"),
    (["serve", "--port", "0"], "port: Input should be greater than or equal to 1"),
    (["serve", "--port", "x"], "port: Input should be a valid integer"),
    (["serve", "--state-url", "redis://:hunter2@db/x"], "state_url: 'redis://:***@db/x': the path must be a database"),
    (["serve", "--log-format", "xml"], "log_format: Input should be 'text' or 'json'"),
])
def test_serve_mistakes_are_one_line(argv, message, capsys):
    code, err, _ = run(anchorserve_main, argv, capsys)
    assert code == 2 and len(err) == 1 and message in err[0] and "hunter2" not in err[0], err


@contextlib.contextmanager
def serving(command: list[str], env: dict[str, str], port: int, log: Path):
    """A server process; yields once /ready answers on `port` (polled with a deadline), then SIGTERMs it."""
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, *command], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)


def test_serve_port_and_config_flags_win(tmp_path):
    model = save_tiny_model("gpt2", tmp_path / "model")
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"model": str(model), "device": "cpu", "dtype": "float32",
                                  "state_dir": str(tmp_path / "state"), "port": free_port(),
                                  "tasks": [sentiment_task().model_dump(mode="json")]}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORSERVE_")} | {"PORT": str(free_port())}
    with serving(["-m", "server.cli", "serve", "--port", str(port), "--config", str(config)], env, port,
                 tmp_path / "server.log") as url:
        info = httpx.get(f"{url}/info").json()
        assert info["port"] == port and info["state_dir"] == str(tmp_path / "state")
        answer = httpx.post(f"{url}/v1/classify", json={"task": "sentiment", "input": "a moving film"})
        assert answer.status_code == 200


@pytest.mark.parametrize("api_servers", ["0", "2"])
def test_a_busy_port_stops_the_server_before_the_model_loads(tmp_path, api_servers):
    model = save_tiny_model("gpt2", tmp_path / "model")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANCHORSERVE_")} | {
            "ANCHORSERVE_MODEL": str(model), "ANCHORSERVE_STATE_DIR": str(tmp_path / "state"),
            "ANCHORSERVE_PORT": str(port), "ANCHORSERVE_API_SERVERS": api_servers}
        done = run_process("-m", "server", env=env)
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr, done.stderr
    assert f"loaded {model.name} from {model}" not in done.stderr + done.stdout  # models.py's, once the weights are in


# --- anchorserve-client -------------------------------------------------------------------------------


def test_client_connection_refused_is_one_line(monkeypatch, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, err, _ = run(client_main, ["--url", url, "classify", "--task", "sentiment", "text"], capsys)
    assert code == 1 and len(err) == 1 and url in err[0] and "ANCHORSERVE_URL" in err[0], err
    monkeypatch.setenv("ANCHORSERVE_URL", url)
    code, err, _ = run(client_main, ["tasks"], capsys)
    assert code == 1 and len(err) == 1 and url in err[0], err


def test_client_connection_refused_in_a_real_process():
    url = f"http://127.0.0.1:{free_port()}"
    done = run_process("-m", "clients", "--url", url, "tasks")
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1 and url in done.stderr


def test_client_input_mistakes_are_one_line_before_any_request(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would be a connection error
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"label": "Positive"}\n')
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "cut off\n')
    bare = tmp_path / "lines.txt"
    bare.write_text('{"text": oops\n')
    cases = [
        (["classify", "--task", "t", "--file", str(broken)], f"{broken}:2: not valid JSON"),
        (["classify", "--task", "t", "--file", str(bare)], f"{bare}:1: not valid JSON"),
        (["classify", "--task", "t", "--file", str(tmp_path / "missing.jsonl")], "no such file"),
        (["classify", "--task", "t", "--file", str(rows)], f'{rows}:2: a JSON object needs a string "text"'),
        (["classify", "--task", "t"], "give texts as arguments or --file"),
        (["analyze", "saliency", "--task", "t", "--file", str(rows), "--out", str(tmp_path)], f"{rows}:1: expected"),
        (["analyze", "saliency", "--task", "t", "--path", "p", "--params", "{", "--out", "x"], "not valid JSON"),
    ]
    for argv, message in cases:
        code, err, _ = run(client_main, ["--url", url, *argv], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (argv, err)


def test_client_help_documents_the_environment(capsys):
    code, _, out = run(client_main, ["--help"], capsys)
    assert code == 0 and "ANCHORSERVE_URL" in out and "ANCHORSERVE_API_KEY" in out


def test_the_exit_watchdog_cuts_a_stuck_shutdown_short():
    """A thread that never ends holds a Python process's exit; once armed (at the first SIGTERM),
    the watchdog ends the process within its timeout, status 1, saying why."""
    stuck = ("import threading, time\n"
             "from server.serving import arm_exit_watchdog\n"
             "from server.logs import configure_logging\n"
             "configure_logging()\n"
             "threading.Thread(target=time.sleep, args=(120,)).start()\n"
             "arm_exit_watchdog(0.5)\n")
    done = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=60)  # not 120 s
    assert done.returncode == 1 and "shutdown_timeout_s" in done.stderr


def test_help_and_argument_mistakes_never_import_torch():
    """`--help` and a mistyped argument answer before the engine loads (torch alone takes seconds)."""
    probe = ("import sys\n"
             "sys.argv = sys.argv[1:]\n"
             "from server.cli import main\n"
             "try:\n    main()\nexcept SystemExit as exc:\n    code = exc.code\n"
             "print(code, 'torch' in sys.modules)\n")
    for argv in (["anchorserve", "--help"], ["anchorserve", "eval", "--help"], ["anchorserve", "eval", "--limit", "x"],
                 ["anchorserve", "analyze", "nope", "--out", "x"]):
        done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60,
                              cwd=REPO)
        code, imported = done.stdout.split()[-2:]
        assert imported == "False" and code in ("0", "2"), (argv, done.stdout[-300:], done.stderr[-300:])


def test_the_names_the_command_line_offers_are_the_engines():
    from anchor_cache import analysis, evaluate, models, names, priors

    assert tuple(evaluate.VARIANTS) == names.VARIANT_NAMES
    assert tuple(p.value for p in priors.Prior) == names.PRIORS
    assert tuple(analysis.KINDS) == names.ANALYSES
    assert models.DEFAULT_MODEL == names.DEFAULT_MODEL

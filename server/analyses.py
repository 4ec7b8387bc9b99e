"""Admin analysis jobs: the paper's analyses on a served task, with JSON results and PNG plots.

A job runs in its own thread at the lowest CPU priority (nice 19), beside the model thread that
serves requests: the OS scheduler hands the cores to classification whenever it wants them, with
no step a request has to wait out, and the job uses what is left (bench/job_interference.py
measures both). Limits: analysis jobs at once, prompts per job, tokens per prompt, attention-map
size, and datasets only under data_root.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from anchor_cache.analysis import AnalysisData, JobControl, parse_params, run_analysis
from anchor_cache.data import Example, read_jsonl
from anchor_cache.errors import NotFoundError, ValidationError
from anchor_cache.registry import ServedTask
from anchor_cache.task import label_index
from server.admin import data_path
from server.auth import require_admin_key, require_json
from server.errors import Overloaded
from server.jobs import Job
from server.protocol import AnalysisRequest, AnalysisStatus
from server.routes import state_of
from server.settings import Settings
from server.state import ServerState

analyses = APIRouter(prefix="/admin/analyses", tags=["admin"],
                     dependencies=[Depends(require_admin_key), Depends(require_json)])

JOB_KIND = "analysis"


def _data(body: AnalysisRequest, served: ServedTask, settings: Settings) -> AnalysisData:
    labels = served.spec.labels
    if body.data.examples is not None:
        test = [Example(e.text, label_index(e.label, labels)) for e in body.data.examples]
        train = None
    else:
        path = data_path(settings, body.data.path)
        test = read_jsonl(path / "test.jsonl" if path.is_dir() else path, labels)
        train_file = path / "train.jsonl"
        train = read_jsonl(train_file, labels) if path.is_dir() and train_file.is_file() else None
    if body.demonstrations == "drawn" and train is None:
        raise ValidationError("demonstrations 'drawn' needs a dataset folder with a train.jsonl")
    if not test:
        raise ValidationError("no rows to analyse")
    return AnalysisData(task=served.spec, test=test, train=train if body.demonstrations == "drawn" else None)


def _check_limits(params: Any, data: AnalysisData, settings: Settings) -> None:
    seeds = len(getattr(params, "seeds", [0]))
    prompts = min(params.limit, len(data.test)) * seeds
    if prompts > settings.max_analysis_examples:
        raise ValidationError(f"{prompts} prompts (rows × seeds); the limit is {settings.max_analysis_examples}: "
                              "lower params.limit or params.seeds")
    if params.max_tokens > settings.max_analysis_tokens:
        raise ValidationError(
            f"params.max_tokens {params.max_tokens} exceeds max_analysis_tokens ({settings.max_analysis_tokens})"
        )
    if getattr(params, "attention_maps", 0) and params.max_map_values > settings.max_attention_map_values:
        raise ValidationError(f"params.max_map_values may be at most {settings.max_attention_map_values}")


def status_of(job: Job) -> AnalysisStatus:
    return AnalysisStatus(
        id=job.id, kind=(job.params or {}).get("kind", ""), task=job.target, status=job.status, created=job.created,
        finished=job.finished, progress=job.progress, params=(job.params or {}).get("params"), error=job.error,
        results=job.result, plots={name: f"/admin/analyses/{job.id}/plots/{name}.png" for name in job.plots},
    )


def _lower_priority() -> None:
    """Nice 19 for this thread: on Linux niceness is per thread and the OpenMP workers it starts
    inherit it, so the model thread serving requests gets the CPU whenever it wants it."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


async def _run(state: ServerState, job: Job, kind: str, data: AnalysisData, params: Any,
               cancel: threading.Event) -> dict[str, Any]:
    def progress(done: int, total: int) -> None:
        job.progress = {"done": done, "total": total, "fraction": round(done / total, 4) if total else 0.0}

    control = JobControl(should_stop=cancel.is_set, on_progress=progress)
    lm = state.require_ready().lm
    with ThreadPoolExecutor(1, thread_name_prefix="anchorserve-analysis", initializer=_lower_priority) as pool:
        output = await asyncio.get_running_loop().run_in_executor(pool, run_analysis, lm, kind, data, params, control)
    job.plots = output.plots
    return output.results


def _job(request: Request, job_id: str) -> Job:
    job = state_of(request).jobs.get(job_id)
    if job.kind != JOB_KIND:
        raise NotFoundError(f"unknown analysis {job_id!r}")
    return job


@analyses.post("", status_code=202, response_model=AnalysisStatus, summary="Start an analysis job")
async def start_analysis(body: AnalysisRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    served = state.require_ready().get(body.task)
    params = parse_params(body.kind, body.params)
    caps = {"max_tokens": state.settings.max_analysis_tokens, "max_map_values": state.settings.max_attention_map_values}
    params = params.model_copy(update={k: min(getattr(params, k), cap) for k, cap in caps.items()
                                       if hasattr(params, k) and k not in body.params})  # unset: the server's cap
    params.check(served.classifier.lm.model.config.num_hidden_layers)
    data = await asyncio.to_thread(_data, body, served, state.settings)  # file reads stay off the event loop
    _check_limits(params, data, state.settings)
    if state.jobs.active(JOB_KIND) >= state.settings.max_analysis_jobs:
        raise Overloaded(f"{state.settings.max_analysis_jobs} analysis job(s) already running (max_analysis_jobs); "
                         "wait for one or cancel it")
    job = Job(kind=JOB_KIND, target=body.task, params={"kind": body.kind, "params": params.model_dump()})
    state.jobs.submit(JOB_KIND, body.task, lambda cancel: _run(state, job, body.kind, data, params, cancel), job)
    content = status_of(job).model_dump() | {"status_url": f"/admin/analyses/{job.id}"}
    return JSONResponse(status_code=202, content=content)


@analyses.get("/{job_id}", response_model=AnalysisStatus, summary="Status, progress, params and results")
async def get_analysis(job_id: str, request: Request) -> AnalysisStatus:
    return status_of(_job(request, job_id))


@analyses.get("/{job_id}/plots/{name}.png", response_class=Response, summary="One plot of a finished analysis",
              responses={200: {"content": {"image/png": {}}}})
async def get_plot(job_id: str, name: str, request: Request) -> Response:
    job = _job(request, job_id)
    if name not in job.plots:
        raise NotFoundError(f"analysis {job_id} has no plot {name!r} (status {job.status}; plots: {sorted(job.plots)})")
    return Response(job.plots[name], media_type="image/png")


@analyses.delete("/{job_id}", response_model=AnalysisStatus, summary="Cancel an analysis; it stops at its next step")
async def cancel_analysis(job_id: str, request: Request) -> AnalysisStatus:
    job = _job(request, job_id)
    state_of(request).jobs.cancel(job_id)
    return status_of(job)

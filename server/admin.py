"""Admin routes: create, replace and delete tasks, and learn their re-weighting β (as jobs).

Disabled (404) unless ADMIN_API_KEY is set. A build prepares the new task off to the side (on the
model thread, between batches) and swaps it in only when it succeeded, so the old version keeps
serving during a replacement and stays if the build fails. Writes to one task name are
serialised: a second write while one is building or training gets 409. β trains in its own
thread while classification goes on, and is swapped in (and persisted) only when training
finished; a failed or cancelled run leaves the previous β serving.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from anchor_cache.data import read_jsonl, sample_demonstrations
from anchor_cache.errors import ValidationError
from anchor_cache.registry import ServedTask
from anchor_cache.reweighting import TrainConfig, train_reweighting
from anchor_cache.task import TaskSpec, label_index
from server.auth import require_admin_key, require_json
from server.errors import Conflict, status_of_kind
from server.jobs import Job
from server.protocol import ReweightRequest
from server.routes import state_of, task_info
from server.settings import Settings
from server.state import ServerState

admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key), Depends(require_json)])


async def _apply(state: ServerState, spec: TaskSpec) -> dict[str, Any]:
    registry = state.require_ready()
    try:
        served = await state.scheduler.run_exclusive(lambda: registry.prepare(spec))
        registry.put(served)
        registry.persist(spec)
    finally:
        state.building.discard(spec.name)
    state.track(served)
    return task_info(served).model_dump()


async def _start_build(request: Request, spec: TaskSpec, replace: bool) -> JSONResponse:
    state = state_of(request)
    registry = state.require_ready()
    exists = spec.name in {t.spec.name for t in registry.all()}
    if spec.name in state.building:
        raise Conflict(f"task {spec.name!r} is already being built; wait for that job to finish")
    if exists and not replace:
        raise Conflict(f"task {spec.name!r} exists; use PUT /admin/tasks/{spec.name} to replace it")
    if not exists and len(registry.all()) >= state.settings.max_tasks:
        raise Conflict(f"already serving {state.settings.max_tasks} tasks (max_tasks); delete one first")
    state.building.add(spec.name)
    job = state.jobs.submit("replace_task" if exists else "create_task", spec.name, lambda _: _apply(state, spec))
    await state.jobs.wait(job, timeout=state.settings.admin_sync_wait_s)
    return _job_response(job)


def _job_response(job: Job) -> JSONResponse:
    """201 with the task when the build finished quickly, 202 with the job otherwise."""
    if job.status == "succeeded":
        return JSONResponse(status_code=201, content=job.result | {"job": job.id})
    if job.status == "failed":
        return JSONResponse(status_code=status_of_kind(job.error["type"]), content=job.error | {"job": job.id})
    return JSONResponse(status_code=202, content={"job": job.id, "status": job.status,
                                                  "status_url": f"/admin/jobs/{job.id}"})


@admin.post("/tasks", status_code=201, summary="Create a task; 202 + job when the build takes long")
async def create_task(spec: TaskSpec, request: Request) -> JSONResponse:
    return await _start_build(request, spec, replace=False)


@admin.put("/tasks/{name}", status_code=201, summary="Replace (or create) a task; the old one serves meanwhile")
async def replace_task(name: str, spec: TaskSpec, request: Request) -> JSONResponse:
    if spec.name != name:
        raise ValidationError(f"the body's name {spec.name!r} differs from the path's {name!r}")
    return await _start_build(request, spec, replace=True)


@admin.delete("/tasks/{name}", summary="Stop serving a task and forget it across restarts")
async def delete_task(name: str, request: Request) -> dict:
    state = state_of(request)
    registry = state.require_ready()
    if name in state.building:
        raise Conflict(f"task {name!r} is being built; wait for that job to finish")
    registry.remove(name)
    registry.persist_deletion(name)
    state.forget(name)
    return {"deleted": name}


@admin.get("/jobs/{job_id}", response_model=Job)
async def get_job(job_id: str, request: Request) -> Job:
    return state_of(request).jobs.get(job_id)


def data_path(settings: Settings, relative: str) -> Path:
    """A file or folder under data_root; anything resolving outside it (../, symlinks) is refused."""
    if settings.data_root is None:
        raise ValidationError("reading datasets is disabled: start the server with ANCHORSERVE_DATA_ROOT set")
    root = settings.data_root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ValidationError(f"{relative!r} is outside the data root")
    if not path.exists():
        raise ValidationError(f"{relative!r} does not exist under the data root")
    return path


def _training_rows(body: ReweightRequest, served: ServedTask, settings: Settings) -> tuple[list[str], list[int]]:
    """Training rows as (texts, classes), never including a demonstration text."""
    labels = served.spec.labels
    demo_texts = {d.text for d in served.classifier.prompt.demonstrations}
    if body.examples is not None:
        rows = [(e.text, label_index(e.label, labels)) for e in body.examples if e.text not in demo_texts]
    else:
        path = data_path(settings, body.data.path)
        path = path / "train.jsonl" if path.is_dir() else path
        pool = [r for r in read_jsonl(path, labels) if r.text not in demo_texts]
        picked, _ = sample_demonstrations(pool, len(labels), body.data.per_class, body.data.seed)
        rows = [(r.text, r.label) for r in picked]
    if not rows:
        raise ValidationError("no training examples left (examples equal to demonstrations are dropped)")
    if len(rows) > settings.max_train_examples:
        raise ValidationError(f"{len(rows)} training examples; the limit is {settings.max_train_examples}")
    return [t for t, _ in rows], [c for _, c in rows]


async def _train(
    state: ServerState, served: ServedTask, body: ReweightRequest, texts: list[str], labels: list[int],
    cancel: threading.Event,
) -> dict[str, Any]:
    """Train in a worker thread (classification keeps flowing), then swap β in if the task is unchanged."""
    registry = state.require_ready()
    name = served.spec.name
    n_dev = int(len(texts) * body.dev_fraction)
    order = np.random.default_rng(body.seed).permutation(len(texts))
    dev_idx, train_idx = order[:n_dev], order[n_dev:]
    cfg = TrainConfig(method=served.spec.method, lr=body.lr, epochs=body.epochs, batch_size=body.batch_size,
                      seed=body.seed, patience=body.patience)

    def work() -> ServedTask:
        result = train_reweighting(
            served.classifier, [texts[i] for i in train_idx], [labels[i] for i in train_idx], cfg,
            dev=([texts[i] for i in dev_idx], [labels[i] for i in dev_idx]) if n_dev else None,
            progress=False, should_stop=cancel.is_set,
        )
        info = {"seconds": round(result.seconds, 3), "epoch_losses": result.epoch_losses,
                "step_losses": result.step_losses, "dev_losses": result.dev_losses,
                "train_examples": len(train_idx), "dev_examples": n_dev, "lr": body.lr, "epochs": body.epochs,
                "batch_size": body.batch_size, "trained_at": time.time()}
        return registry.with_beta(served, result.beta, info)

    try:
        trained = await asyncio.to_thread(work)
        if registry.get(name).key != served.key:
            raise Conflict(f"task {name!r} was replaced during training; the new β was discarded")
        registry.save_beta(trained)
        registry.put(trained)
    finally:
        state.building.discard(name)
    return {"task": name} | trained.reweighting


@admin.post("/tasks/{name}/reweighting", status_code=202, summary="Learn anchor re-weighting β for a task (a job)")
async def reweight_task(name: str, body: ReweightRequest, request: Request) -> JSONResponse:
    state = state_of(request)
    served = state.require_ready().get(name)
    if name in state.building:
        raise Conflict(f"task {name!r} has a build or training job running; wait for it")
    served.classifier.label_keys(served.spec.method)  # fails now if this method has no label words to weight
    texts, labels = _training_rows(body, served, state.settings)
    state.building.add(name)
    job = state.jobs.submit("reweighting", name, lambda cancel: _train(state, served, body, texts, labels, cancel))
    return JSONResponse(status_code=202, content={"job": job.id, "status": job.status,
                                                  "status_url": f"/admin/jobs/{job.id}"})


@admin.delete("/jobs/{job_id}", response_model=Job, summary="Cancel a job; a cancelled training keeps the old β")
async def cancel_job(job_id: str, request: Request) -> Job:
    return state_of(request).jobs.cancel(job_id)

"""Admin routes: create, replace and delete tasks at runtime (builds run as jobs).

Disabled (404) unless ADMIN_API_KEY is set. A build prepares the new task off to the side (on the
model thread, between batches) and swaps it in only when it succeeded, so the old version keeps
serving during a replacement and stays if the build fails. Writes to one task name are
serialised: a second write while one is building gets 409.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from anchor_cache.errors import ValidationError
from anchor_cache.task import TaskSpec
from server.auth import require_admin_key, require_json
from server.errors import Conflict, status_of_kind
from server.jobs import Job
from server.routes import state_of, task_info
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
    job = state.jobs.submit("replace_task" if exists else "create_task", spec.name, lambda: _apply(state, spec))
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

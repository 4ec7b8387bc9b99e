"""Admin routes for tasks and their jobs: create, replace, delete, learn β, poll and cancel.

Disabled (404) unless ADMIN_API_KEY is set. Builds answer 201 with the task when they finish
within admin_sync_wait_s, and 202 with the job otherwise. Any replica answers for any job.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header
from fastapi.responses import JSONResponse

from anchor_cache.errors import ValidationError
from anchor_cache.task import TaskSpec
from server.auth import require_admin_key, require_json
from server.deps import State, Tasks
from server.errors import error_headers, status_of
from server.jobs import Job
from server.protocol import JobAccepted, ReweightRequest, TaskCreated, error_responses

admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key), Depends(require_json)],
                  responses=error_responses(401, 404, 422, 503))

WRITE_ERRORS = error_responses(400, 409, 412, 413, 415, 422)
IfMatch = Annotated[str | None, Header(description='the ETag of GET /v1/tasks/{name} ("12"), or * for any current '
                                      "version; anything else (a stale, weak or malformed tag) gets 412")]
BUILD_RESPONSES = {201: {"model": TaskCreated, "description": "built within admin_sync_wait_s"},
                   202: {"model": JobAccepted, "description": "building: poll the job"}} | WRITE_ERRORS


def _accepted(job: Job) -> JSONResponse:
    accepted = JobAccepted(job=job.id, status=job.status, status_url=f"/admin/jobs/{job.id}")
    return JSONResponse(status_code=202, content=accepted.model_dump())


async def _build_response(state: State, job: Job) -> JSONResponse:
    """201 with the task when the build finished quickly, its error when it failed, else 202."""
    await state.jobs.wait(job, timeout=state.settings.admin_sync_wait_s)
    if job.status == "succeeded":
        return JSONResponse(status_code=201, content=job.result | {"job": job.id})
    if job.status in ("failed", "cancelled"):
        error = job.error or {"error": "the build was cancelled (the server is shutting down)", "type": "cancelled"}
        status = status_of(error["type"])
        return JSONResponse(status_code=status, content=error | {"job": job.id}, headers=error_headers(status))
    return _accepted(job)


@admin.post("/tasks", status_code=201, responses=BUILD_RESPONSES,
            summary="Create a task; 202 + job when the build takes long")
async def create_task(spec: TaskSpec, tasks: Tasks, state: State) -> JSONResponse:
    """409 when the name exists on any replica (the state store decides)."""
    return await _build_response(state, await tasks.write(spec, replace=False))


@admin.put("/tasks/{name}", status_code=201, responses=BUILD_RESPONSES,
           summary="Replace (or create) a task; the old one serves meanwhile")
async def replace_task(name: str, spec: TaskSpec, tasks: Tasks, state: State,
                       if_match: IfMatch = None) -> JSONResponse:
    """Without If-Match the write is unconditional (the later of concurrent writes wins everywhere)."""
    if spec.name != name:
        raise ValidationError(f"the body's name {spec.name!r} differs from the path's {name!r}")
    return await _build_response(state, await tasks.write(spec, replace=True, if_match=if_match))


@admin.delete("/tasks/{name}", responses=error_responses(409, 412),
              summary="Stop serving a task (a failed one too) on every replica and forget it across restarts")
async def delete_task(name: str, tasks: Tasks, if_match: IfMatch = None) -> dict[str, str]:
    await tasks.delete(name, if_match)
    return {"deleted": name}


@admin.post("/tasks/{name}/reweighting", status_code=202, responses={202: {"model": JobAccepted}} | WRITE_ERRORS,
            summary="Learn anchor re-weighting β for a task (a job)")
async def reweight_task(name: str, body: ReweightRequest, tasks: Tasks) -> JSONResponse:
    return _accepted(await tasks.reweight(name, body))


@admin.get("/jobs/{job_id}", response_model=Job, summary="A job's status, progress and result")
async def get_job(job_id: str, state: State) -> Job:
    return await state.jobs.find(job_id)


@admin.delete("/jobs/{job_id}", response_model=Job, summary="Cancel a job; a cancelled training keeps the old β")
async def cancel_job(job_id: str, state: State) -> Job:
    return await state.jobs.cancel(job_id)

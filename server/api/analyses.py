"""Admin analysis jobs: start, poll (status, progress, results), fetch plots, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from server.auth import require_admin_key, require_json
from server.deps import Analyses
from server.jobs import Job
from server.protocol import AnalysisRequest, AnalysisStatus, error_responses

analyses = APIRouter(prefix="/admin/analyses", tags=["admin"], responses=error_responses(401, 404, 422, 503),
                     dependencies=[Depends(require_admin_key), Depends(require_json)])


def _status(job: Job) -> AnalysisStatus:
    return AnalysisStatus(
        id=job.id, kind=(job.params or {}).get("kind", ""), task=job.target, status=job.status, created=job.created,
        finished=job.finished, progress=job.progress, params=(job.params or {}).get("params"), error=job.error,
        results=job.result, plots={name: f"/admin/analyses/{job.id}/plots/{name}.png" for name in job.plot_names},
    )


@analyses.post("", status_code=202, response_model=AnalysisStatus, summary="Start an analysis job",
               responses=error_responses(400, 413, 415, 422, 429))
async def start_analysis(body: AnalysisRequest, service: Analyses) -> JSONResponse:
    job = await service.start(body)
    content = _status(job).model_dump() | {"status_url": f"/admin/analyses/{job.id}"}
    return JSONResponse(status_code=202, content=content)


@analyses.get("/{job_id}", response_model=AnalysisStatus, summary="Status, progress, params and results")
async def get_analysis(job_id: str, service: Analyses) -> AnalysisStatus:
    return _status(await service.get(job_id))


@analyses.get("/{job_id}/plots/{name}.png", response_class=Response, summary="One plot of a finished analysis",
              responses={200: {"content": {"image/png": {}}}})
async def get_plot(job_id: str, name: str, service: Analyses) -> Response:
    return Response(await service.plot(job_id, name), media_type="image/png")


@analyses.delete("/{job_id}", response_model=AnalysisStatus, summary="Cancel an analysis; it stops at its next step")
async def cancel_analysis(job_id: str, service: Analyses) -> AnalysisStatus:
    return _status(await service.cancel(job_id))

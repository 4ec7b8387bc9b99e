"""The analysis service: the paper's analyses on a served task, as jobs with JSON results and PNGs.

A job runs in its own nice-19 thread beside the thread that runs forwards for requests: the OS hands the
cores to classification whenever it wants them, with no step a request has to wait out, and the
job uses what is left (bench/job_interference.py measures both). Parameters are checked once,
here, against the server's caps and the model's depth; the engine takes them as they are. Limits:
analysis jobs at once, prompts per job, tokens per prompt, attention-map size, and datasets only
under data_root.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from anchor_cache.analysis import AnalysisData, AnalysisParams, JobControl, parse_params, run_analysis
from anchor_cache.data import Example, read_jsonl
from anchor_cache.errors import NotFoundError, ValidationError
from anchor_cache.task import TaskSpec, label_index
from server.datafiles import data_path
from server.engine_client import AdminEngineClient
from server.jobs import Job, JobRunner, TooManyJobs, in_background_thread
from server.protocol import AnalysisRequest
from server.settings import Settings

JOB_KIND = "analysis"


class AnalysisService:
    def __init__(self, engine: AdminEngineClient, jobs: JobRunner, settings: Settings) -> None:
        self.engine = engine
        self.jobs = jobs
        self.settings = settings

    def _params(self, body: AnalysisRequest) -> AnalysisParams:
        """The request's params with the server's caps for those it left unset, checked once."""
        s = self.settings
        params = parse_params(body.kind, body.params)
        caps = {"max_tokens": s.max_analysis_tokens, "max_map_values": s.max_attention_map_values}
        params = params.model_copy(update={k: min(getattr(params, k), cap) for k, cap in caps.items()
                                           if hasattr(params, k) and k not in body.params})
        params = parse_params(body.kind, params, self.engine.num_layers)
        if params.max_tokens > s.max_analysis_tokens:
            raise ValidationError(
                f"params.max_tokens {params.max_tokens} exceeds max_analysis_tokens ({s.max_analysis_tokens})"
            )
        if getattr(params, "attention_maps", 0) and params.max_map_values > s.max_attention_map_values:
            raise ValidationError(f"params.max_map_values may be at most {s.max_attention_map_values}")
        return params

    def _data(self, body: AnalysisRequest, spec: TaskSpec) -> AnalysisData:
        labels = spec.labels
        if body.data.examples is not None:
            test = [Example(e.text, label_index(e.label, labels)) for e in body.data.examples]
            train = None
        else:
            path = data_path(self.settings, body.data.path)
            test = read_jsonl(path / "test.jsonl" if path.is_dir() else path, labels)
            train_file = path / "train.jsonl"
            train = read_jsonl(train_file, labels) if path.is_dir() and train_file.is_file() else None
        if body.demonstrations == "drawn" and train is None:
            raise ValidationError("demonstrations 'drawn' needs a dataset folder with a train.jsonl")
        if not test:
            raise ValidationError("no rows to analyse")
        return AnalysisData(task=spec, test=test, train=train if body.demonstrations == "drawn" else None)

    def _check_size(self, params: AnalysisParams, data: AnalysisData) -> None:
        prompts = min(params.limit, len(data.test)) * len(getattr(params, "seeds", [0]))
        if prompts > self.settings.max_analysis_examples:
            raise ValidationError(f"{prompts} prompts (rows × seeds); the limit is "
                                  f"{self.settings.max_analysis_examples}: lower params.limit or params.seeds")

    async def start(self, body: AnalysisRequest) -> Job:
        spec = self.engine.task(body.task).spec
        params = self._params(body)
        data = await asyncio.to_thread(self._data, body, spec)  # file reads stay off the event loop
        self._check_size(params, data)
        limit = self.settings.max_analysis_jobs
        if self.jobs.active(JOB_KIND) >= limit:
            raise TooManyJobs(f"{limit} analysis job(s) already running (max_analysis_jobs); wait for one or cancel it")
        job = Job(kind=JOB_KIND, target=body.task, params={"kind": body.kind, "params": params.model_dump()})
        self.jobs.submit(JOB_KIND, body.task, lambda cancel: self._run(job, body.kind, data, params, cancel), job)
        return job

    async def _run(self, job: Job, kind: str, data: AnalysisData, params: AnalysisParams,
                   cancel: threading.Event) -> dict[str, Any]:
        def progress(done: int, total: int) -> None:
            job.progress = {"done": done, "total": total, "fraction": round(done / total, 4) if total else 0.0}

        lm = self.engine.model()
        control = JobControl(should_stop=cancel.is_set, on_progress=progress)
        output = await in_background_thread(lambda: run_analysis(lm, kind, data, params, control),
                                            "anchorserve-analysis")
        job.plots = output.plots
        return output.results

    async def get(self, job_id: str) -> Job:
        job = await self.jobs.find(job_id)
        if job.kind != JOB_KIND:
            raise NotFoundError(f"unknown analysis {job_id!r}")
        return job

    async def plot(self, job_id: str, name: str) -> bytes:
        job = await self.get(job_id)
        png = await self.jobs.plot(job, name)
        if png is None:
            raise NotFoundError(f"analysis {job_id} has no plot {name!r} "
                                f"(status {job.status}; plots: {job.plot_names})")
        return png

    async def cancel(self, job_id: str) -> Job:
        await self.get(job_id)
        return await self.jobs.cancel(job_id)

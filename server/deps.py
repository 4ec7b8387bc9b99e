"""Typed access to the app's state for routes (FastAPI dependencies), so routers share no helpers.

The dependencies are `async def`: FastAPI runs a plain `def` one in its thread pool, a thread hop
per dependency per request, for what is one attribute read."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.analyses import AnalysisService
from server.classify import ClassifyService
from server.state import ServerState
from server.tasks import TaskService


async def state_of(request: Request) -> ServerState:
    return request.app.state.anchor


async def _classify(request: Request) -> ClassifyService:
    return request.app.state.anchor.classify


async def _tasks(request: Request) -> TaskService:
    return request.app.state.anchor.tasks


async def _analyses(request: Request) -> AnalysisService:
    return request.app.state.anchor.analyses


State = Annotated[ServerState, Depends(state_of)]
Classify = Annotated[ClassifyService, Depends(_classify)]
Tasks = Annotated[TaskService, Depends(_tasks)]
Analyses = Annotated[AnalysisService, Depends(_analyses)]

"""Typed access to the app's state for routes (FastAPI dependencies), so routers share no helpers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from server.analyses import AnalysisService
from server.classify import ClassifyService
from server.state import ServerState
from server.tasks import TaskService


def state_of(request: Request) -> ServerState:
    return request.app.state.anchor


def _classify(request: Request) -> ClassifyService:
    return state_of(request).classify


def _tasks(request: Request) -> TaskService:
    return state_of(request).tasks


def _analyses(request: Request) -> AnalysisService:
    return state_of(request).analyses


State = Annotated[ServerState, Depends(state_of)]
Classify = Annotated[ClassifyService, Depends(_classify)]
Tasks = Annotated[TaskService, Depends(_tasks)]
Analyses = Annotated[AnalysisService, Depends(_analyses)]

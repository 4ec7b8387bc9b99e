"""The classify service against a scripted engine: services reach the engine only through the
`EngineClient` protocol, so what the service itself decides (tokenising again for a replaced task,
reporting the engine's queue wait) is tested without a model."""

from __future__ import annotations

import asyncio
import gc
import math

import pytest

from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import Method, TaskSpec
from server.classify import ClassifyService, DisconnectWatch
from server.engine_client import EngineClient, Scores, TaskChanged, TaskView, text_bytes_bound
from server.metrics import Metrics
from server.settings import Settings
from tests.conftest import sentiment_task

QUEUE_S = 0.123


class ScriptedEngine:
    """Serves `versions` of one task in turn: a submit against an older version than the current
    one fails with TaskChanged, as an engine whose task was replaced after tokenising does."""

    def __init__(self, tokenizer, versions: list[TaskSpec]) -> None:
        self.prompts = [TaskPrompt.build(spec, list(spec.demonstrations), tokenizer) for spec in versions]
        self.current = 1
        self.submitted: list[tuple[int, int]] = []  # (revision, rows) of each submit

    def model_name(self) -> str:
        return "scripted"

    def compute_type(self) -> str:
        return "cpu"

    def max_text_bytes(self, max_tokens: int) -> int:
        return text_bytes_bound(max_tokens, 64)

    async def view(self, name: str) -> TaskView:
        prompt = self.prompts[self.current - 1]
        return TaskView(spec=prompt.task, revision=self.current, prompt=prompt, anchor_tokens=5, has_pool=False)

    def submit(self, view: TaskView, method: Method, queries: list[list[int]], deadline: float
               ) -> asyncio.Future[Scores]:
        self.submitted.append((view.revision, len(queries)))
        answer = asyncio.get_running_loop().create_future()
        if self.current < len(self.prompts):  # replaced while this request was tokenised
            self.current += 1
            answer.set_exception(TaskChanged("replaced"))
        else:
            row = [math.log(0.25), math.log(0.75)]
            answer.set_result(Scores(logits=[[0.0, 1.0]] * len(queries), logprobs=[row] * len(queries),
                                     raw_logprobs=None, queue_s=QUEUE_S))
        return answer


async def never_disconnects() -> dict:
    await asyncio.Event().wait()
    return {}


def classify(engine: EngineClient, texts: list[str]):
    service = ClassifyService(engine, Settings(tasks=[sentiment_task()]), Metrics())
    try:
        return asyncio.run(service.classify("sentiment", texts, None, never_disconnects))
    finally:
        service.close()


def test_a_task_replaced_after_tokenising_is_tokenised_again_and_answers_with_its_new_labels(tiny_lm):
    replaced = sentiment_task(template="Article: {text}\nTopic:", labels=["Sports", "Business"], demonstrations=[
        {"text": "the match ended in a draw", "label": "Sports"}, {"text": "the markets fell", "label": "Business"}])
    engine = ScriptedEngine(tiny_lm.tokenizer, [sentiment_task(), replaced])
    answer = classify(engine, ["fine", "awful"])
    assert engine.submitted == [(1, 2), (2, 2)]
    assert answer.labels == ["Sports", "Business"]
    assert [p.label for p in answer.predictions] == ["Business", "Business"]
    assert answer.predictions[0].probs["Business"] == pytest.approx(0.75)


def test_the_queue_time_is_the_engines_and_inference_the_rest(tiny_lm):
    answer = classify(ScriptedEngine(tiny_lm.tokenizer, [sentiment_task()]), ["fine"])
    assert answer.timing.queue_s == QUEUE_S
    assert answer.timing.inference_s < QUEUE_S  # the scripted engine answers at once: no forward time


async def _watched_requests(n: int, leave_first: bool = False) -> list[DisconnectWatch]:
    """`n` requests watched as the service watches them, over a receive that behaves as uvicorn's:
    http.disconnect once the response is sent (or at once, when the client leaves first)."""
    watches = []
    for _ in range(n):
        sent, read = asyncio.Event(), asyncio.Event()

        async def receive(sent=sent, read=read) -> dict:
            if not leave_first:
                await sent.wait()
            read.set()
            return {"type": "http.disconnect"}

        future = asyncio.get_running_loop().create_future()
        watch = DisconnectWatch(future, receive)
        watch()
        if not leave_first:
            future.set_result(object())
            await future
            sent.set()  # the response went out
        await read.wait()
        await asyncio.sleep(0)  # the receive task's done callback runs one loop turn after it returns
        watches.append(watch)
    return watches


def test_a_client_that_leaves_first_cancels_its_request():
    watch, = asyncio.run(_watched_requests(1, leave_first=True))
    assert watch.left and watch.future.cancelled()
    answered, = asyncio.run(_watched_requests(1))
    assert not answered.left and answered.future.done() and not answered.future.cancelled()


def test_a_finished_request_leaves_no_reference_cycle():
    """A request's watch, its receive task and its result are freed by reference counting when it
    ends: one cycle per request cost each frontend a long full collection every second or two."""
    async def count_cyclic_garbage() -> int:
        await _watched_requests(1)  # what the loop makes once
        gc.collect()
        gc.disable()
        try:
            await _watched_requests(20)
            return gc.collect()
        finally:
            gc.enable()

    assert asyncio.run(count_cyclic_garbage()) == 0

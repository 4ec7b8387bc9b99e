"""`RemoteEngine`: the EngineClient of an HTTP frontend, talking to the engine core over ZeroMQ.

A frontend tokenises with its own copy of the model's tokenizer (loaded from the folder the core
names) and keeps each task's view at the revision the core last described; a request tokenised
against a revision the core no longer serves gets `TaskChanged`, and the classify service tokenises
it again against the new one.

The core's liveness comes from the socket itself: ZeroMQ's monitor reports the connection's
handshake and its loss. While the core is gone (killed, restarting) every call fails at once with
503 `unavailable`, the requests in flight with it; the socket reconnects by itself when the core is
back, and the next `Hello` reloads the model's facts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time

import msgspec
import zmq
import zmq.asyncio
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from zmq.utils.monitor import parse_monitor_message

from anchor_cache.errors import AnchorServeError, UnavailableError
from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import Method, TaskSpec
from server import wire
from server.engine_client import Scores, TaskChanged, TaskView, derived, text_bytes_bound
from server.scheduler import DeadlineExceeded

log = logging.getLogger(__name__)

# How long a frontend waits for an answer past the request's own deadline before it gives up on a
# core that holds the connection but does not answer (stopped, or stuck).
REPLY_GRACE_S = 2.0
HELLO_RETRY_S = 0.25


class EngineError(AnchorServeError):
    """An error the core answered with, by its kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class RemoteEngine:
    def __init__(self, address: str) -> None:
        self.address = address
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._views: dict[str, TaskView] = {}
        self._facts: wire.ModelFacts | None = None
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._connected = asyncio.Event()
        self._described = asyncio.Event()  # the core has answered a Hello since this frontend started
        self._tasks: list[asyncio.Task] = []
        self._outbox = wire.Outbox(lambda _, frame: self._socket.send(frame))

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        self._socket = sock
        self._tasks = [asyncio.create_task(self._receive(), name="anchorserve-engine-replies"),
                       asyncio.create_task(self._watch(monitor), name="anchorserve-engine-monitor")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail_pending(UnavailableError("the frontend is shutting down"))
        if self._socket is not None:
            self._socket.disable_monitor()
            self._outbox.close()
            self._socket.close(linger=0)
        self._context.term()

    async def wait_ready(self, timeout_s: float | None) -> bool:
        """Whether the core has described its model within `timeout_s` of now (None: waits for it)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._described.wait(), timeout_s)
        return self.ready

    @property
    def ready(self) -> bool:
        return self._connected.is_set() and self._tokenizer is not None

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        """Follow the connection: on a handshake fetch the model's facts; on a loss fail what waits."""
        hello: asyncio.Task | None = None
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._connected.set()
                    if hello is None or hello.done():
                        hello = asyncio.create_task(self._hello(), name="anchorserve-engine-hello")
                elif event == zmq.EVENT_DISCONNECTED:
                    self._connected.clear()
                    log.warning("the engine core went away; answering 503 until it is back")
                    self._fail_pending(UnavailableError("the engine core went away; retry shortly"))
        finally:
            if hello is not None:
                hello.cancel()
            monitor.close(linger=0)

    async def _hello(self) -> None:
        """Ask for the model's facts until the core has its model loaded."""
        while self._connected.is_set():
            try:
                facts = await self._send(wire.Hello(id=next(self._ids)), time.monotonic() + 30)
            except AnchorServeError:
                await asyncio.sleep(HELLO_RETRY_S)
                continue
            if self._facts is None or facts.model_dir != self._facts.model_dir:
                self._tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, facts.model_dir,
                                                          local_files_only=True)
                self._views.clear()
            self._facts = facts
            self._described.set()
            log.info("connected to the engine core serving %s", facts.name)
            return

    async def _receive(self) -> None:
        drain = wire.plain(self._socket)
        while True:
            self._take(await self._socket.recv())
            while True:  # under load many replies wait at once: take them all before yielding
                try:
                    payload = drain.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take(payload)

    def _take(self, payload: bytes) -> None:
        try:
            replies = wire.reply_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.exception("undecodable reply from the engine core")
            return
        for reply in replies:
            future = self._pending.pop(reply.id, None)
            if future is None or future.done():
                continue  # answered after the caller gave up
            if isinstance(reply, wire.Failed):
                future.set_exception(TaskChanged(reply.message) if reply.kind == wire.STALE
                                     else EngineError(reply.kind, reply.message))
            else:
                future.set_result(reply)

    def _fail_pending(self, error: AnchorServeError) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _send(self, message: wire.Request, deadline: float) -> asyncio.Future:
        """Send `message`; the future resolves to its reply, or fails when the core is gone or
        silent past `deadline` + REPLY_GRACE_S."""
        if not self._connected.is_set():
            raise UnavailableError("the engine core is not running (starting or restarting); retry shortly")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending[message.id] = future
        timer = loop.call_at(loop.time() + max(0.0, deadline - time.monotonic()) + REPLY_GRACE_S, _expire, future)
        future.add_done_callback(lambda _: timer.cancel())
        self._outbox.put(None, message)
        return future

    # --- EngineClient -----------------------------------------------------------------------------

    def model_name(self) -> str:
        if not self.ready or self._facts is None:
            raise UnavailableError("the engine core is loading the model and tasks (or restarting); retry shortly")
        return self._facts.name

    def compute_type(self) -> str:
        self.model_name()
        return self._facts.compute_type

    def max_text_bytes(self, max_tokens: int) -> int:
        self.model_name()
        return text_bytes_bound(max_tokens, self._facts.max_token_bytes)

    async def view(self, name: str) -> TaskView:
        view = self._views.get(name)
        if view is not None:
            return view
        self.model_name()
        facts = await self._send(wire.Describe(id=next(self._ids), task=name), time.monotonic() + 30)
        spec = TaskSpec.model_validate_json(facts.spec)
        prompt = TaskPrompt.build(spec, list(spec.demonstrations), self._tokenizer)
        view = TaskView(spec=spec, revision=facts.revision, prompt=prompt, anchor_tokens=facts.anchor_tokens,
                        has_pool=facts.has_pool)
        current = self._views.get(name)
        if current is None or current.revision < view.revision:
            self._views[name] = view
        return view

    def forget(self, view: TaskView) -> None:
        """Drop a view the core no longer serves, so the next `view` asks again."""
        if self._views.get(view.name) is view:
            del self._views[view.name]

    def submit(self, view: TaskView, method: Method, queries: list[list[int]], deadline: float
               ) -> asyncio.Future[Scores]:
        message = wire.Classify(id=next(self._ids), task=view.name, revision=view.revision, method=str(method),
                                queries=queries, timeout_s=max(0.0, deadline - time.monotonic()))
        reply = self._send(message, deadline)

        def forget_if_stale(done: asyncio.Future) -> None:
            if not done.cancelled() and isinstance(done.exception(), TaskChanged):
                self.forget(view)

        def abort() -> None:
            self._pending.pop(message.id, None)
            reply.cancel()
            if self._connected.is_set():
                self._outbox.put(None, wire.Abort(id=message.id))

        reply.add_done_callback(forget_if_stale)
        return derived(reply, lambda r: Scores(logits=r.logits, logprobs=r.logprobs, raw_logprobs=r.raw_logprobs,
                                                 queue_s=r.queue_s),
                       abort)


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("no answer from the engine core by the request's deadline"))

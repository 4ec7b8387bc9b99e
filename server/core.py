"""The engine core's socket: where HTTP frontends (server/frontend.py) send token ids.

The core process runs the whole single-process server (model, registry, scheduler, jobs,
replication, admin routes) and, beside it, this endpoint: a ZeroMQ ROUTER on an ipc:// path whose
messages (server/wire.py) go straight to the engine facade on the core's event loop. A `Classify`
joins the same scheduler queue as an in-process request, so batches mix requests from every
frontend; its reply leaves as soon as the batch's scores are on the host.

A frame that is not a list, a message in it that is not a known one, or a request that names token
ids the model does not have, is refused (logged, counted as failures{reason="bad_message"}) without touching the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec
import zmq
import zmq.asyncio

from anchor_cache.errors import AnchorServeError, ValidationError
from anchor_cache.task import Method
from server import wire
from server.engine_client import AdminEngineClient, Scores
from server.metrics import Metrics

log = logging.getLogger(__name__)


class CoreEndpoint:
    def __init__(self, engine: AdminEngineClient, address: str, metrics: Metrics) -> None:
        self.engine = engine
        self.address = address
        self.metrics = metrics
        self._context = zmq.asyncio.Context()
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task | None = None
        self._pending: dict[tuple[bytes, int], asyncio.Future] = {}
        self._outbox = wire.Outbox(lambda sender, frame: self._socket.send_multipart([sender, frame]))

    def start(self) -> None:
        sock = self._context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        self._socket = sock
        self._task = asyncio.create_task(self._serve(), name="anchorserve-core-endpoint")
        log.info("engine core listening for frontends on %s", self.address)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for future in self._pending.values():
            future.cancel()
        if self._socket is not None:
            self._outbox.close()
            self._socket.close(linger=0)
        self._context.term()

    async def _serve(self) -> None:
        drain = wire.plain(self._socket)
        while True:
            self._take(await self._socket.recv_multipart())
            # Under load many messages wait at once: take them all before yielding to the loop again.
            while True:
                try:
                    frames = drain.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._take(frames)

    def _take(self, frames: list[bytes]) -> None:
        """Decode and handle one frame's messages; nothing it does may stop the loop."""
        if len(frames) != 2:
            self._refuse(f"{len(frames)} frames")
            return
        sender, payload = frames
        try:
            messages = wire.frame_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._refuse(str(exc))
            return
        for raw in messages:
            try:
                message = wire.request_decoder.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self._refuse(str(exc))  # only this one: the frame's other requests go on
                continue
            self._take_one(sender, message)

    def _take_one(self, sender: bytes, message: wire.Request) -> None:
        try:
            self._handle(sender, message)
        except AnchorServeError as exc:
            self._send(sender, wire.Failed(id=message.id, kind=exc.kind, message=str(exc)))
        except Exception as exc:  # the loop must outlive any one message
            log.exception("engine core failed on a %s message", type(message).__name__)
            self._send(sender, wire.Failed(id=message.id, kind="internal", message=f"engine core error: {exc}"))

    def _refuse(self, why: str) -> None:
        self.metrics.failures.labels("bad_message").inc()
        log.warning("refused a message on the engine socket: %s", why[:200])

    def _send(self, sender: bytes, reply: wire.Reply) -> None:
        self._outbox.put(sender, reply)

    def _handle(self, sender: bytes, message: wire.Request) -> None:
        engine = self.engine
        match message:
            case wire.Hello(id=id):
                engine.require_ready()
                self._send(sender, wire.ModelFacts(id=id, name=engine.model_name(),
                                                   model_dir=engine.model_dir(),
                                                   max_token_bytes=engine.max_token_bytes,
                                                   compute_type=engine.compute_type()))
            case wire.Describe(id=id, task=name):
                view = engine.view_of(engine.task(name))
                self._send(sender, wire.TaskFacts(id=id, spec=view.spec.model_dump_json().encode(),
                                                  revision=view.revision, anchor_tokens=view.anchor_tokens,
                                                  has_pool=view.has_pool))
            case wire.Classify():
                self._classify(sender, message)
            case wire.Abort(id=id):
                future = self._pending.pop((sender, id), None)
                if future is not None:
                    future.cancel()

    def _classify(self, sender: bytes, message: wire.Classify) -> None:
        served = self.engine.task(message.task)
        if served.revision != message.revision:
            self._send(sender, wire.Failed(id=message.id, kind=wire.STALE,
                                           message=f"task {message.task!r} is now at revision {served.revision}"))
            return
        try:
            method = Method(message.method)
        except ValueError:
            raise ValidationError(f"unknown method {message.method!r}") from None
        self._check_ids(message.queries)
        view = self.engine.view_of(served)
        key = (sender, message.id)
        future = self.engine.submit(view, method, message.queries, time.monotonic() + message.timeout_s)
        self._pending[key] = future

        def reply(done: asyncio.Future[Scores]) -> None:
            self._pending.pop(key, None)
            if done.cancelled():
                return  # the frontend aborted: it expects no answer
            exc = done.exception()
            if exc is None:
                scores = done.result()
                self._send(sender, wire.Scored(id=message.id, logits=scores.logits, logprobs=scores.logprobs,
                                               raw_logprobs=scores.raw_logprobs, queue_s=scores.queue_s))
            else:
                kind = exc.kind if isinstance(exc, AnchorServeError) else "internal"
                self._send(sender, wire.Failed(id=message.id, kind=kind, message=str(exc)))

        future.add_done_callback(reply)

    def _check_ids(self, queries: list[list[int]]) -> None:
        """Token ids a frontend sends must exist in the model (an out-of-range id would fail the
        whole batch it joins)."""
        vocab = self.engine.vocab_size
        if not queries or any(not q or min(q) < 0 or max(q) >= vocab for q in queries):
            self._refuse("token ids outside the vocabulary, or an empty query")
            raise ValidationError("a query on the engine socket is empty or names token ids the model does not have")


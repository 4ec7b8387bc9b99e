"""The messages between HTTP frontends and the engine core, and how they travel.

One ZeroMQ socket pair per frontend: the core binds a ROUTER on an ipc:// path, each frontend
connects a DEALER (vLLM's V1 split, over the same library). Messages are MessagePack encoded by
msgspec into the typed structs below, never pickled: the core decodes each message of a frame
against the `Request` union and refuses anything else, that message alone (a frame over
`MAX_MESSAGE_BYTES` is dropped by ZeroMQ itself, which disconnects the sender). Every request
carries an `id` the reply repeats, so one socket carries many requests at once.

A frame holds a list of messages: what one side sent a peer in one turn of its event loop
(`Outbox`). Under load a frontend reads many requests in one turn and the core answers a whole
batch in one, and ZeroMQ wakes its I/O thread for every frame sent: at one frame per message the
sends took about 15% of a frontend's CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable

import msgspec
import zmq
import zmq.asyncio

# The largest frame the core takes: max_inputs_per_request × max_input_tokens ids is far below this.
MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# An Outbox starts a new frame rather than grow one past this; a single larger message goes alone.
FRAME_BYTES = MAX_MESSAGE_BYTES // 4


class Hello(msgspec.Struct, tag="hello"):
    """Asks for the model's facts (answered by ModelFacts once the model is loaded)."""

    id: int


class Describe(msgspec.Struct, tag="describe"):
    """Asks for a task as served now (answered by TaskFacts)."""

    id: int
    task: str


class Classify(msgspec.Struct, tag="classify"):
    """Token ids of one request, tokenised against the task at `revision`."""

    id: int
    task: str
    revision: int
    method: str
    queries: list[list[int]]
    timeout_s: float  # what is left of the request's deadline when it was sent


class Abort(msgspec.Struct, tag="abort"):
    """The client left: drop request `id`'s queued rows."""

    id: int


Request = Hello | Describe | Classify | Abort


class ModelFacts(msgspec.Struct, tag="model"):
    id: int
    name: str
    model_dir: str  # where the frontend loads the same tokenizer from
    max_token_bytes: int
    compute_type: str  # the model's device type: cpu, cuda, ...


class TaskFacts(msgspec.Struct, tag="task"):
    id: int
    spec: bytes  # the TaskSpec as JSON
    revision: int
    anchor_tokens: int
    has_pool: bool


class Scored(msgspec.Struct, tag="scored"):
    id: int
    logits: list[list[float]] | None  # None for a calibrated task (server.engine_client.Scores)
    logprobs: list[list[float]]
    raw_logprobs: list[list[float]] | None
    queue_s: float


class Failed(msgspec.Struct, tag="failed"):
    """An AnchorServeError by kind (server/errors.py maps kinds to statuses); kind "stale" means the
    task's served revision is no longer the one the request was tokenised for."""

    id: int
    kind: str
    message: str


Reply = ModelFacts | TaskFacts | Scored | Failed

STALE = "stale"

encoder = msgspec.msgpack.Encoder()
frame_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])  # a frame's messages, each decoded on its own
request_decoder = msgspec.msgpack.Decoder(Request)
reply_decoder = msgspec.msgpack.Decoder(list[Reply])


class Outbox:
    """Messages put in one event-loop turn, sent at the end of it as one frame per peer.

    `send(peer, frame)` writes a frame; it runs on the loop, from `flush`, which the first `put`
    of a turn schedules. A frame that would pass FRAME_BYTES is sent at once and a new one begun.
    """

    def __init__(self, send: Callable[[Hashable, bytes], None]) -> None:
        self._send = send
        self._frames: dict[Hashable, tuple[list[msgspec.Raw], int]] = {}  # peer → (messages, bytes)
        self._closed = False

    def put(self, peer: Hashable, message: Request | Reply) -> None:
        if self._closed:
            return  # the socket is closed: no peer will read it
        if not self._frames:
            asyncio.get_running_loop().call_soon(self.flush)
        raw = msgspec.Raw(encoder.encode(message))
        messages, size = self._frames.get(peer, ([], 0))
        if messages and size + len(raw) > FRAME_BYTES:
            self._send(peer, encoder.encode(messages))
            messages, size = [], 0
        messages.append(raw)
        self._frames[peer] = (messages, size + len(raw))

    def flush(self) -> None:
        frames, self._frames = self._frames, {}
        for peer, (messages, _) in frames.items():
            self._send(peer, encoder.encode(messages))

    def close(self) -> None:
        """Send what waits, then drop whatever is put later: call it before closing the socket."""
        self.flush()
        self._closed = True


def plain(sock: zmq.asyncio.Socket) -> zmq.Socket:
    """The same socket without asyncio futures, for draining the messages already waiting. Only
    the task that awaits the socket's receives may use it: ZeroMQ's file descriptor signals by
    edges, and the asyncio socket checks for pending messages before it waits again."""
    return zmq.Socket.shadow(sock.underlying)

"""The state store in Redis (`redis://…`, `rediss://…`, `unix://…`), for replicas on one or many hosts.

Keys (all under `prefix`, "anchorserve:" by default):
  tasks                  hash: task name -> {"revision", "source", "spec", "error"} as JSON
  revision               the counter (INCR): the last revision given out, also bumped by cancel requests
  events                 pub/sub channel: a message after every task write and cancel request
  blob:<name>            a blob's bytes
  blob-used              sorted set: blob name -> last write or read (Redis server time, unix seconds)
  quarantine:<name>.<UTC time>   a damaged blob (or task record), moved aside and never served
  job:<id>               a job's record (JSON), expiring (PX)
  plot:<id>:<name>       a job's PNG plot, expiring (PX)
  cancel:<id>            a cancel request (one day)

A task write is one Lua script: compare the expected revision, INCR the counter, HSET the record and
PUBLISH, atomically. `wait_for_change` listens on the channel (one subscription per store) and also
re-reads the counter at least every second, so a missed message (a reconnect) only costs latency.

Every command has short socket timeouts and is never retried blindly (a retried create could report
a conflict with itself); a connection that Redis closed (a restart) is replaced on the next call.
Connection failures become UnavailableError naming the store by its URL without the password.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from anchor_cache.errors import UnavailableError
from server.redaction import redact_url
from server.store import records
from server.store.base import StateStore
from server.store.records import TASK_NAME, Source, TaskRecord, typed_line

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 1.0
COMMAND_TIMEOUT_S = 2.0
HEALTH_CHECK_S = 10
LISTEN_SLICE_S = 1.0  # the longest a waiter goes without re-reading the counter
FALLBACK_POLL_S = 0.25  # while pub/sub is broken
PUBSUB_RETRY_S = 1.0

# KEYS: tasks hash, revision counter, events channel. ARGV: name, expect ('' = unconditional), the
# record's JSON without its revision ('{"source":…}').
WRITE_LUA = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local revision, live, damaged = 0, false, false
if current then
  local ok, record = pcall(cjson.decode, current)
  if not ok or type(record) ~= 'table' or type(record.revision) ~= 'number' or record.revision < 0 then
    return {'DAMAGED', 0, 0}
  end
  revision = record.revision
  damaged = record.error ~= nil and record.error ~= cjson.null
  live = damaged or (record.spec ~= nil and record.spec ~= cjson.null)
end
local expect = tonumber(ARGV[2])
if expect ~= nil then
  if expect < 0 then
    if live then return {'CONFLICT', revision, damaged and 1 or 0} end
  elseif revision ~= expect then
    return {'STALE', revision, 0}
  end
end
local new = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], '{"revision":' .. new .. ',' .. string.sub(ARGV[3], 2))
redis.call('PUBLISH', KEYS[3], new)
return {'OK', new, 0}
"""

# A damaged record: move its bytes to KEYS[4] and store an error record, if it is still the same bytes.
# KEYS: tasks hash, counter, channel, quarantine key. ARGV: name, the damaged bytes, the record's JSON
# without its revision. Returns the new revision, or 0 if the record changed meanwhile.
REPAIR_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[4], ARGV[2])
local new = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], ARGV[1], '{"revision":' .. new .. ',' .. string.sub(ARGV[3], 2))
redis.call('PUBLISH', KEYS[3], new)
return new
"""

# KEYS: blob, blob-used. ARGV: name. Marks the blob used now (server time) if it exists.
GET_BLOB_LUA = """
local data = redis.call('GET', KEYS[1])
if data then
  local t = redis.call('TIME')
  redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
end
return data
"""

# KEYS: blob, blob-used. ARGV: name, bytes.
PUT_BLOB_LUA = """
local t = redis.call('TIME')
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], tonumber(t[1]) + tonumber(t[2]) / 1000000, ARGV[1])
return 1
"""

# KEYS: blob, blob-used, quarantine key. ARGV: name. 1 moved, 0 no such blob, -1 the target exists.
QUARANTINE_BLOB_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
redis.call('RENAME', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")


def _ms(ttl_s: float) -> int:
    return max(1, math.ceil(ttl_s * 1000))


class RedisStore(StateStore):
    """The state store in the Redis at `url`, under keys starting with `prefix` (see the module docstring)."""

    def __init__(self, url: str, prefix: str = "anchorserve:") -> None:
        self.url = redact_url(url)
        self.prefix = prefix
        self._tasks_key = f"{prefix}tasks"
        self._counter_key = f"{prefix}revision"
        self._channel = f"{prefix}events"
        self._used_key = f"{prefix}blob-used"
        try:
            self._redis = redis.Redis.from_url(
                url,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=COMMAND_TIMEOUT_S,
                health_check_interval=HEALTH_CHECK_S,
            )
        except ValueError as exc:
            raise ValueError(f"state URL {self.url} is not a valid Redis URL ({typed_line(exc)})") from None
        self._write_script = self._redis.register_script(WRITE_LUA)
        self._repair_script = self._redis.register_script(REPAIR_LUA)
        self._get_blob_script = self._redis.register_script(GET_BLOB_LUA)
        self._put_blob_script = self._redis.register_script(PUT_BLOB_LUA)
        self._quarantine_blob_script = self._redis.register_script(QUARANTINE_BLOB_LUA)
        self._pubsub: Any = None  # redis.client.PubSub, created by the first wait_for_change
        self._pubsub_lock = threading.Lock()
        self._pubsub_retry_at = 0.0
        self._pubsub_broken = False

    # --- plumbing ---------------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> UnavailableError:
        reason = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            return UnavailableError(
                f"the state store {self.url} is unreachable ({reason}); check that Redis runs and is "
                "reachable from this host (replicas retry and resync when it is back)"
            )
        return UnavailableError(f"the state store {self.url} refused a command ({reason})")

    @contextlib.contextmanager
    def _talk(self) -> Iterator[None]:
        """Redis errors as UnavailableError, without the password or a chained traceback."""
        try:
            yield
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    def _key(self, kind: str, *parts: str) -> str:
        return f"{self.prefix}{kind}:{':'.join(parts)}"

    # --- task records -------------------------------------------------------------------------------

    @staticmethod
    def _body(spec: dict[str, Any] | None, source: Source, error: str | None = None) -> str:
        """A record's JSON without its revision (the scripts put that in front)."""
        return json.dumps({"source": source, "spec": spec, "error": error}, ensure_ascii=False, separators=(",", ":"))

    def _repair(self, name: str, raw: bytes, reason: str) -> TaskRecord | None:
        """Move a damaged record's bytes aside and store a record whose error says so; returns the
        name's record then (maybe another replica's write, which raced with the repair)."""
        for _ in range(5):
            moved = f"{self.prefix}quarantine:tasks:{name}.{_stamp()}"
            error = f"the record of task {name} in {self._tasks_key} was damaged ({reason}); moved to {moved}"
            with self._talk():
                revision = self._repair_script(
                    keys=[self._tasks_key, self._counter_key, self._channel, moved],
                    args=[name, raw, self._body(None, "admin", error)],
                )
            if revision:
                log.error("task %s: %s", name, error)
                return TaskRecord(name=name, revision=int(revision), spec=None, source="admin", error=error)
            with self._talk():
                raw = self._redis.hget(self._tasks_key, name)
            if raw is None:
                return None
            record = records.parse_record(name, raw)
            if isinstance(record, TaskRecord):
                return record
            reason = record
        raise UnavailableError(f"the state store {self.url}: the record of task {name} keeps changing; retry")

    def _stored_records(self) -> dict[str, bytes]:
        with self._talk():
            stored = self._redis.hgetall(self._tasks_key)
        found = {}
        for key, raw in stored.items():
            name = key.decode("utf-8", "replace")
            if TASK_NAME.fullmatch(name):
                found[name] = raw
            else:
                log.warning("%s holds a field %r that is not a task name; ignored", self._tasks_key, name)
        return found

    def _stored_record(self, name: str) -> bytes | None:
        with self._talk():
            return self._redis.hget(self._tasks_key, name)

    def write(self, name: str, spec: dict[str, Any] | None, source: Source, expect: int | None) -> TaskRecord:
        records.check_write(name, spec, source, expect)
        body = self._body(spec, source)
        for _ in range(5):
            with self._talk():
                status, revision, damaged = self._write_script(
                    keys=[self._tasks_key, self._counter_key, self._channel],
                    args=[name, "" if expect is None else str(expect), body],
                )
            status, revision = status.decode(), int(revision)
            if status == "OK":
                return TaskRecord(name=name, revision=revision, spec=spec, source=source)
            if status == "CONFLICT":
                raise records.conflict(name, revision, bool(damaged))
            if status == "STALE":
                raise records.stale(name, revision, expect if expect is not None else 0)
            self.record(name)  # DAMAGED: quarantine the stored bytes (a new revision), then decide again
        raise UnavailableError(f"the state store {self.url}: the record of task {name} keeps changing; retry")

    def changes(self) -> int:
        with self._talk():
            value = self._redis.get(self._counter_key)
        return int(value) if value is not None else 0

    # --- change notification ------------------------------------------------------------------------

    def _await_change(self, seen: int, timeout: float) -> None:
        """Listens on the events channel (one subscription, used by one waiting thread at a time;
        the others re-read the counter when it returns) for at most a second, and polls while
        pub/sub is broken, so a missed message only costs latency."""
        if time.monotonic() < self._pubsub_retry_at:
            time.sleep(min(FALLBACK_POLL_S, timeout))
        elif self._pubsub_lock.acquire(timeout=min(LISTEN_SLICE_S, timeout)):
            try:
                self._listen_locked(seen, min(LISTEN_SLICE_S, timeout))
            finally:
                self._pubsub_lock.release()

    def _listen_locked(self, seen: int, timeout: float) -> None:
        """Subscribe if needed, then wait up to `timeout` for a message (or return at once if the
        counter moved past `seen` meanwhile). A subscription whose connection died (a Redis restart)
        is replaced at once; other pub/sub failures switch to polling for a while."""
        for _ in range(2):
            fresh = self._pubsub is None
            try:
                if self._pubsub is None:
                    pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                    self._pubsub = pubsub
                    pubsub.subscribe(self._channel)
                # subscribed before this read: a write after it publishes a message we get
                if self.changes() != seen:
                    return
                if self._pubsub.get_message(timeout=timeout) is not None:
                    while self._pubsub.get_message(timeout=0) is not None:  # drain a burst
                        pass
                if self._pubsub_broken:
                    log.info("state store %s: change notifications work again", self.url)
                    self._pubsub_broken = False
                return
            except (RedisError, OSError, UnavailableError) as exc:
                self._drop_pubsub()
                if fresh:
                    self._pubsub_retry_at = time.monotonic() + PUBSUB_RETRY_S
                    if not self._pubsub_broken:
                        log.warning("state store %s: change notifications failed (%s); polling until they work",
                                    self.url, typed_line(exc))
                        self._pubsub_broken = True
                    return

    def _drop_pubsub(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    # --- blobs --------------------------------------------------------------------------------------

    def _blob_key(self, name: str) -> str:
        return self._key("blob", records.check_blob_name(name))

    def get_blob(self, name: str) -> bytes | None:
        key = self._blob_key(name)
        with self._talk():
            return self._get_blob_script(keys=[key, self._used_key], args=[name])

    def put_blob(self, name: str, data: bytes) -> None:
        key = self._blob_key(name)
        with self._talk():
            self._put_blob_script(keys=[key, self._used_key], args=[name, bytes(data)])

    def quarantine_blob(self, name: str) -> str:
        """Returns the key it was renamed to (`<prefix>quarantine:<name>.<UTC time>`)."""
        key = self._blob_key(name)
        for n in range(100):
            target = self._key("quarantine", f"{name}.{_stamp()}" + (f".{n}" if n else ""))
            with self._talk():
                moved = self._quarantine_blob_script(keys=[key, self._used_key, target], args=[name])
            if moved == 1:
                return target
            if moved == 0:
                return f"nowhere (the blob {name} was already gone)"
        raise UnavailableError(f"the state store {self.url}: no free quarantine key for the blob {name}")

    def blob_ages(self) -> dict[str, float]:
        with self._talk():
            pipe = self._redis.pipeline(transaction=True)
            pipe.time()
            pipe.zrange(self._used_key, 0, -1, withscores=True)
            (seconds, micros), used = pipe.execute()
        now = seconds + micros / 1e6
        return {member.decode("utf-8", "replace"): max(0.0, now - score) for member, score in used}

    def delete_blob(self, name: str) -> int:
        key = self._blob_key(name)
        with self._talk():
            pipe = self._redis.pipeline(transaction=True)
            pipe.strlen(key)
            pipe.delete(key)
            pipe.zrem(self._used_key, name)
            size, deleted, _ = pipe.execute()
        return int(size) if deleted else 0

    # --- jobs ---------------------------------------------------------------------------------------

    def _set_expiring(self, key: str, value: bytes, ttl_s: float) -> None:
        with self._talk():
            if ttl_s <= 0:  # already expired
                self._redis.delete(key)
            else:
                self._redis.set(key, value, px=_ms(ttl_s))

    def put_job(self, job_id: str, record: dict[str, Any], ttl_s: float) -> None:
        key = self._key("job", records.check_job_id(job_id))
        self._set_expiring(key, json.dumps(record, ensure_ascii=False).encode(), ttl_s)

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        key = self._key("job", records.check_job_id(job_id))
        with self._talk():
            raw = self._redis.get(key)
        if raw is None:
            return None
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            log.warning("state store %s: the record of job %s is unreadable (%s); treated as missing",
                        self.url, job_id, typed_line(exc))
            return None
        return record

    def put_plot(self, job_id: str, name: str, png: bytes, ttl_s: float) -> None:
        key = self._key("plot", records.check_job_id(job_id), records.check_job_id(name, "plot name"))
        self._set_expiring(key, bytes(png), ttl_s)

    def get_plot(self, job_id: str, name: str) -> bytes | None:
        key = self._key("plot", records.check_job_id(job_id), records.check_job_id(name, "plot name"))
        with self._talk():
            return self._redis.get(key)

    def request_cancel(self, job_id: str) -> None:
        key = self._key("cancel", records.check_job_id(job_id))
        with self._talk():
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(key, b"1", ex=int(records.CANCEL_TTL_S))
            pipe.incr(self._counter_key)
            pipe.publish(self._channel, b"cancel")
            pipe.execute()

    def cancel_requested(self, job_ids: list[str]) -> set[str]:
        ids = [records.check_job_id(job_id) for job_id in job_ids]
        if not ids:
            return set()
        with self._talk():
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.exists(self._key("cancel", job_id))
            found = pipe.execute()
        return {job_id for job_id, exists in zip(ids, found, strict=True) if exists}

    def close(self) -> None:
        locked = self._pubsub_lock.acquire(timeout=LISTEN_SLICE_S + 1)  # a waiter returns within a slice
        try:
            self._drop_pubsub()
        finally:
            if locked:
                self._pubsub_lock.release()
        with contextlib.suppress(Exception):
            self._redis.close()
        with contextlib.suppress(Exception):
            self._redis.connection_pool.disconnect()


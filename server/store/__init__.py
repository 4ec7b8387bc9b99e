"""The state store: what every replica of one deployment must agree on, behind one interface.

- task records: each task name's current spec (or a tombstone, or a damaged record) with a
  store-wide, monotonically increasing revision; writes are compare-and-set on that revision;
- blobs: content-addressed files (anchor caches, learned β) that every replica can load instead of
  rebuilding; caches are derivable, so a missing blob is a rebuild, never an error. The engine
  reaches a store only through this part (`anchor_cache.blobs.BlobStore`);
- job records and their PNG plots, with a time to live, so any replica answers for any job, and
  cancel requests that reach the replica running the job;
- change notification: a counter that grows with every task write or cancel request, and a
  blocking wait on it (Redis pub/sub, or polling a file on one host).

Backends: `LocalStore` (a state dir on one host, safe for several processes through a lock file)
and `RedisStore` (`redis://…`, for replicas on one or many machines). `server.store.url.open_store`
picks one for a state URL.
"""

from __future__ import annotations

from server.store.base import StateStore
from server.store.records import ABSENT, TaskRecord

__all__ = ["ABSENT", "StateStore", "TaskRecord"]

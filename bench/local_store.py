"""LocalStore (files) against stdlib sqlite3 in WAL mode for the task records.

    python -m bench.local_store                # writes bench/results/local_store.json, prints tables
    python -m bench.local_store --runs 1       # one run instead of two

Three backends, each on a fresh state dir under /tmp (this machine's disk):
- files: the real `server.store.local.LocalStore` (flock'ed .lock, `revision` counter file, one
  JSON file per record, each write: temp file + fsync + rename + directory fsync, counter then record);
- sqlite-FULL: `SqliteTasks` below, one `BEGIN IMMEDIATE` transaction per write (read the record,
  compare-and-set, bump the counter row, upsert the record), `journal_mode=WAL`, `synchronous=FULL`:
  every COMMIT fsyncs the WAL before it returns, so an acknowledged write survives a power cut, as
  a LocalStore write does (the like-for-like row);
- sqlite-NORMAL: the same with `synchronous=NORMAL`, the usual WAL choice: a COMMIT only appends to
  the WAL and the WAL is fsynced at checkpoints, so a process crash loses nothing but a power cut (or
  kernel crash) may roll back the last acknowledged writes, counter with them: the database stays
  consistent but a revision a client already holds can be given out again for other content.

1. single process (unpinned unless --pin: on a shared host, pinning puts every fsync wake-up behind
   whatever else runs on that core, a scheduler tick each, which measured the neighbours rather than
   the store), the backends interleaved in rounds (so that drift of the disk or the host's load hits
   all three alike): latency (mean, p50, p99) of an unconditional write, a CAS write
   (expect = the revision the previous write returned), `record(name)`, `records()` with 10 and with
   100 tasks, and `changes()`;
2. concurrency: 4 spawned processes each make 200 successful CAS-or-create writes on a
   shared set of 8 names (read the record, write with expect = its revision, or ABSENT if there is
   none; on a conflict read again and retry), started together; total throughput, attempt latency,
   and correctness: every acknowledged write has a distinct revision, each process's revisions strictly
   increase, the counter equals the highest revision (and the number of acknowledged writes: no
   gaps), each name's acknowledged writes form one chain (each expected the revision of the one
   before: no lost update), and each name's final record is the last acknowledged write (no lost write);
3. lines: what a SqliteStore would remove from server/store/local.py and what it would add.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import itertools
import json
import multiprocessing as mp
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from anchor_cache.errors import ConflictError, PreconditionFailedError
from bench.common import RESULTS
from server.store.local import LocalStore
from server.store.records import ABSENT, Source, TaskRecord, check_write, conflict, stale

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ["files", "sqlite-FULL", "sqlite-NORMAL"]
PROCESSES, WRITES_PER_PROCESS, SHARED_NAMES = 4, 200, 8


# --- the sqlite3 candidate ---------------------------------------------------------------------


class SqliteTasks:
    """Task records and the change counter in one SQLite database (WAL), safe for several processes
    (SQLite's own locks) and for the threads of one (one connection behind a lock). Reads trust the
    rows (no `decode_record`, which LocalStore runs on every file: a few dict lookups per record)."""

    SCHEMA = """
        CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 0), value INTEGER NOT NULL);
        INSERT OR IGNORE INTO counter VALUES (0, 0);
        CREATE TABLE IF NOT EXISTS tasks (
            name TEXT PRIMARY KEY, revision INTEGER NOT NULL, source TEXT NOT NULL, spec TEXT, error TEXT
        ) WITHOUT ROWID;
    """

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        # isolation_level=None: no implicit transactions, ours are explicit; timeout: the busy wait
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            if self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0] != "wal":
                raise RuntimeError(f"{path.name}: WAL mode refused")
            self._db.execute(f"PRAGMA synchronous={synchronous}")  # per connection, not stored
            self._db.executescript(f"BEGIN IMMEDIATE; {self.SCHEMA} COMMIT;")

    @staticmethod
    def _record(row: tuple) -> TaskRecord:
        name, revision, source, spec, error = row
        return TaskRecord(name, revision, None if spec is None else json.loads(spec), source, error)

    def write(self, name: str, spec: dict[str, Any] | None, source: Source, expect: int | None) -> TaskRecord:
        check_write(name, spec, source, expect)
        text = None if spec is None else json.dumps(spec, ensure_ascii=False)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # the write lock now: no other writer until COMMIT
            try:
                row = self._db.execute("SELECT revision, spec IS NOT NULL, error IS NOT NULL FROM tasks "
                                       "WHERE name = ?", (name,)).fetchone()
                if expect == ABSENT and row is not None and (row[1] or row[2]):
                    raise conflict(name, row[0], bool(row[2]))
                if expect is not None and expect >= 0 and (0 if row is None else row[0]) != expect:
                    raise stale(name, 0 if row is None else row[0], expect)
                revision = self._db.execute("UPDATE counter SET value = value + 1 RETURNING value").fetchone()[0]
                self._db.execute("INSERT INTO tasks VALUES (?, ?, ?, ?, NULL) ON CONFLICT (name) DO UPDATE SET "
                                 "revision = excluded.revision, source = excluded.source, spec = excluded.spec, "
                                 "error = NULL", (name, revision, source, text))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return TaskRecord(name, revision, spec, source)

    def records(self) -> dict[str, TaskRecord]:
        with self._lock:
            rows = self._db.execute("SELECT name, revision, source, spec, error FROM tasks ORDER BY name").fetchall()
        return {row[0]: self._record(row) for row in rows}

    def record(self, name: str) -> TaskRecord | None:
        with self._lock:
            row = self._db.execute("SELECT name, revision, source, spec, error FROM tasks WHERE name = ?",
                                   (name,)).fetchone()
        return None if row is None else self._record(row)

    def changes(self) -> int:
        with self._lock:
            return self._db.execute("SELECT value FROM counter").fetchone()[0]

    def close(self) -> None:
        self._db.close()


def open_backend(kind: str, state_dir: Path) -> LocalStore | SqliteTasks:
    if kind == "files":
        return LocalStore(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    return SqliteTasks(state_dir / "state.sqlite3", synchronous=kind.split("-")[1])


def spec_for(name: str, tag: str = "") -> dict[str, Any]:
    """tests/conftest.py's sentiment task as JSON (~400 bytes); `tag` marks which write stored it."""
    return {"name": name, "template": "Review: {text}\nSentiment:", "labels": ["Negative", "Positive"],
            "demonstrations": [{"text": "a wonderful, moving film", "label": "Positive"},
                               {"text": "dull and lifeless, a waste", "label": "Negative"},
                               {"text": f"the fox jumps over the lazy dog {tag}", "label": "Positive"}],
            "description": "the built-in sentiment task, as a bench record for the state store"}


# --- 1. single process --------------------------------------------------------------------------


def summary(ns: list[int]) -> dict[str, float]:
    us = sorted(n / 1000 for n in ns)
    return {"n": len(us), "mean_us": statistics.fmean(us), "p50_us": us[len(us) // 2],
            "p99_us": us[min(len(us) - 1, round(0.99 * (len(us) - 1)))]}


def timed(samples: list[int], call, *args) -> Any:
    start = time.perf_counter_ns()
    out = call(*args)
    samples.append(time.perf_counter_ns() - start)
    return out


def single_process(root: Path, rounds: int, writes: int, reads: int, lists: int) -> dict[str, dict]:
    stores = {kind: open_backend(kind, root / kind) for kind in BACKENDS}
    samples: dict[str, dict[str, list[int]]] = {kind: {} for kind in BACKENDS}
    revisions: dict[str, dict[str, int]] = {kind: {} for kind in BACKENDS}
    names = [f"task{i:03d}" for i in range(100)]

    def grow(kind: str, count: int) -> None:
        for name in names[:count]:
            if name not in revisions[kind]:
                revisions[kind][name] = stores[kind].write(name, spec_for(name), "admin", None).revision

    def one_round(kind: str, size: int) -> None:
        store, s = stores[kind], samples[kind]
        if size == 10:
            for i in range(writes):
                name = names[i % 10]
                revisions[kind][name] = timed(s.setdefault("write (unconditional)", []), store.write, name,
                                              spec_for(name, str(i)), "admin", None).revision
            for i in range(writes):
                name = names[i % 10]
                revisions[kind][name] = timed(s.setdefault("write (CAS, expect = current)", []), store.write, name,
                                              spec_for(name, str(i)), "admin", revisions[kind][name]).revision
            for i in range(reads):
                timed(s.setdefault("record(name)", []), store.record, names[i % 10])
            for _ in range(reads):
                timed(s.setdefault("changes()", []), store.changes)
        for _ in range(lists):
            found = timed(s.setdefault(f"records() with {size} tasks", []), store.records)
        assert len(found) == size, (kind, len(found))

    for size in (10, 100):
        for kind in BACKENDS:
            grow(kind, size)
        for r in range(rounds):
            for kind in BACKENDS[r % 3:] + BACKENDS[: r % 3]:  # a different backend first in each round
                one_round(kind, size)
    for store in stores.values():
        store.close()
    return {kind: {op: summary(ns) for op, ns in ops.items()} for kind, ops in samples.items()}


# --- 2. concurrency -----------------------------------------------------------------------------


def worker(kind: str, state_dir: str, index: int, start: Any, out: Any) -> None:
    """WRITES_PER_PROCESS acknowledged CAS-or-create writes on the shared names (runs in a spawned process)."""
    import random

    rng = random.Random(index)
    store = open_backend(kind, Path(state_dir))
    names = [f"shared{i}" for i in range(SHARED_NAMES)]
    acked, attempts, conflicts, errors, latency = [], 0, 0, [], []
    start.wait()
    began = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the host
    while len(acked) < WRITES_PER_PROCESS:
        name = rng.choice(names)
        current = store.record(name)
        expect = ABSENT if current is None else current.revision
        tag = f"p{index}-{len(acked)}"
        attempts += 1
        t0 = time.perf_counter_ns()
        try:
            written = store.write(name, spec_for(name, tag), "admin", expect)
        except (PreconditionFailedError, ConflictError):
            conflicts += 1
            continue
        except Exception as exc:  # a busy timeout, an I/O error: fails the correctness check
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        finally:
            latency.append(time.perf_counter_ns() - t0)
        acked.append({"name": name, "expect": expect, "revision": written.revision, "tag": tag})
    ended = time.monotonic()
    store.close()
    out.put({"index": index, "began": began, "ended": ended, "acked": acked, "attempts": attempts,
             "conflicts": conflicts, "errors": errors, "latency_ns": latency})


def verify(kind: str, state_dir: Path, reports: list[dict]) -> dict[str, Any]:
    acked = [a for r in reports for a in r["acked"]]
    revisions = [a["revision"] for a in acked]
    store = open_backend(kind, state_dir)
    counter, final = store.changes(), store.records()
    integrity = None
    if kind != "files":
        store.close()
        with contextlib.closing(sqlite3.connect(state_dir / "state.sqlite3")) as db:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
    chains_ok, last_ok = True, True
    for name in {a["name"] for a in acked}:
        chain = sorted((a for a in acked if a["name"] == name), key=lambda a: a["revision"])
        # the first write on a name created it; each later one expected the revision of the one before
        chains_ok &= chain[0]["expect"] == ABSENT and all(
            later["expect"] == earlier["revision"] for earlier, later in itertools.pairwise(chain))
        record = final.get(name)
        last_ok &= (record is not None and record.revision == chain[-1]["revision"]
                    and record.spec == spec_for(name, chain[-1]["tag"]))
    checks = {
        "acknowledged_writes": len(acked),
        "distinct_revisions": len(set(revisions)) == len(revisions),
        "per_process_strictly_increasing": all(
            all(b["revision"] > a["revision"] for a, b in itertools.pairwise(r["acked"]))
            for r in reports),
        "counter": counter,
        "counter_is_highest_revision": counter == max(revisions),
        "no_gaps": sorted(revisions) == list(range(1, len(revisions) + 1)),
        "one_cas_chain_per_name": chains_ok,
        "final_record_is_last_acknowledged": last_ok,
        "errors": [e for r in reports for e in r["errors"]],
        "sqlite_integrity_check": integrity,
    }
    checks["ok"] = (checks["distinct_revisions"] and checks["per_process_strictly_increasing"]
                    and checks["counter_is_highest_revision"] and checks["no_gaps"] and chains_ok and last_ok
                    and not checks["errors"] and integrity in (None, "ok")
                    and len(acked) == PROCESSES * WRITES_PER_PROCESS)
    return checks


def concurrency(root: Path, kind: str) -> dict[str, Any]:
    state_dir = root / f"{kind}-concurrent"
    open_backend(kind, state_dir).close()  # create the state dir / the database (and WAL mode) once, first
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(kind, str(state_dir), i, start, out)) for i in range(PROCESSES)]
    for p in procs:
        p.start()
    time.sleep(2.0)  # every process imported and opened its store (spawn: a fresh interpreter each)
    start.set()
    reports = sorted((out.get(timeout=120) for _ in procs), key=lambda r: r["index"])
    for p in procs:
        p.join()
    wall = max(r["ended"] for r in reports) - min(r["began"] for r in reports)
    acked = sum(len(r["acked"]) for r in reports)
    return {"processes": PROCESSES, "names": SHARED_NAMES, "wall_s": wall, "writes_per_s": acked / wall,
            "attempts": sum(r["attempts"] for r in reports), "conflicts": sum(r["conflicts"] for r in reports),
            "attempt_latency": summary([n for r in reports for n in r["latency_ns"]]),
            "correctness": verify(kind, state_dir, reports)}


# --- 3. lines -----------------------------------------------------------------------------------

# LocalStore code that exists for the task records and the counter: a SqliteStore drops it.
REPLACED = ["_locked", "_task_path", "_read_counter", "_highest_revision", "_next_revision_locked", "changes",
            "_read_raw", "_stored_records", "_stored_record", "_store_locked", "_current_locked", "_repair",
            "write"]
# File helpers the blobs and jobs keep using (quarantine_blob, put_blob, put_job...): they stay.
KEPT = ["fsync_directory", "write_atomic", "remove_durably", "quarantine", "_write_file"]


def line_counts() -> dict[str, Any]:
    source = (REPO / "server/store/local.py").read_text()
    module = ast.parse(source)
    store = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "LocalStore")
    sizes = {}
    for node in [*module.body, *store.body]:  # module functions and LocalStore's methods, not nested ones
        if isinstance(node, ast.FunctionDef):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            sizes[node.name] = node.end_lineno - start + 1
    sqlite_lines = len(inspect.getsource(SqliteTasks).splitlines())
    return {"local.py": len(source.splitlines()),
            "replaced_by_sqlite": {name: sizes[name] for name in REPLACED},
            "replaced_total": sum(sizes[name] for name in REPLACED),
            "kept_for_blobs_and_jobs": {name: sizes[name] for name in KEPT},
            "kept_total": sum(sizes[name] for name in KEPT),
            "sqlite_class_in_this_bench": sqlite_lines}


# --- the run ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    tmp_fs: dict[str, str] = {"mount": ""}
    for line in Path("/proc/mounts").read_text().splitlines():  # the longest mount point holding /tmp
        device, mount, fstype, options, *_ = line.split()
        if "/tmp/".startswith(mount.rstrip("/") + "/") and len(mount) > len(tmp_fs["mount"]):
            tmp_fs = {"mount": mount, "device": device, "type": fstype, "options": options}
    return {"cpus": os.cpu_count(), "tmp_filesystem": tmp_fs, "python": platform.python_version(),
            "sqlite3": sqlite3.sqlite_version, "platform": platform.platform()}


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="bench-local-store-", dir="/tmp"))
    try:
        load_before = os.getloadavg()
        affinity = os.sched_getaffinity(0)
        if args.pin is not None:
            os.sched_setaffinity(0, {args.pin})
        try:
            single = single_process(root, args.rounds, args.writes, args.reads, args.lists)
        finally:
            os.sched_setaffinity(0, affinity)  # the concurrent processes inherit it: all cores for them
        return {"load_average_before": load_before,
                "single_process": single, "concurrency": {kind: concurrency(root, kind) for kind in BACKENDS},
                "load_average_after": os.getloadavg()}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def median_of(runs: list[dict], *keys: str) -> float:
    values = []
    for run in runs:
        for key in keys:
            run = run[key]
        values.append(run)
    return statistics.median(values)


def tables(result: dict[str, Any]) -> str:
    runs = result["runs"]
    ops = list(runs[0]["single_process"]["files"])
    pin = result["settings"]["single_process_pinned_to_cpu"]
    where = "unpinned" if pin is None else f"pinned to CPU {pin}"
    lines = [f"Single process ({where}), µs (median over {len(runs)} run(s); spread = the p50's max-min "
             "over runs, relative to its median)", "",
             "| operation | backend | mean | p50 | p99 | p50 / files p50 | p50 spread |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for op in ops:
        files_p50 = median_of(runs, "single_process", "files", op, "p50_us")
        for kind in BACKENDS:
            p50s = [run["single_process"][kind][op]["p50_us"] for run in runs]
            p50 = statistics.median(p50s)
            lines.append(f"| {op} | {kind} | {median_of(runs, 'single_process', kind, op, 'mean_us'):.0f} | "
                         f"{p50:.0f} | {median_of(runs, 'single_process', kind, op, 'p99_us'):.0f} | "
                         f"{p50 / files_p50:.2f} | {(max(p50s) - min(p50s)) / p50:.0%} |")
    lines += ["", f"Concurrency: {PROCESSES} spawned processes × {WRITES_PER_PROCESS} acknowledged CAS-or-create "
              f"writes on {SHARED_NAMES} shared names (each run's value, run 1 / run 2 ...)", "",
              "| backend | writes/s | wall s | attempts | conflicts | attempt p50 µs | attempt p99 µs | correct |",
              "|---|---:|---:|---:|---:|---:|---:|---|"]
    for kind in BACKENDS:
        cs = [run["concurrency"][kind] for run in runs]

        def each(fmt: str, get, cs=cs) -> str:
            return " / ".join(fmt.format(get(c)) for c in cs)

        lines.append(f"| {kind} | {each('{:.0f}', lambda c: c['writes_per_s'])} "
                     f"| {each('{:.2f}', lambda c: c['wall_s'])} "
                     f"| {each('{}', lambda c: c['attempts'])} | {each('{}', lambda c: c['conflicts'])} "
                     f"| {each('{:.0f}', lambda c: c['attempt_latency']['p50_us'])} "
                     f"| {each('{:.0f}', lambda c: c['attempt_latency']['p99_us'])} "
                     f"| {each('{}', lambda c: c['correctness']['ok'])} |")
    lc = result["lines"]
    lines += ["", f"Lines: a SqliteStore removes {lc['replaced_total']} of local.py's {lc['local.py']} lines "
              f"(lock, counter file, record files, damaged-record repair); {lc['kept_total']} lines of file helpers "
              f"stay for blobs and jobs; the bench's sqlite class is {lc['sqlite_class_in_this_bench']} lines."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="full repetitions, for the spread")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per run")
    parser.add_argument("--writes", type=int, default=100, help="writes of each kind per backend and round")
    parser.add_argument("--reads", type=int, default=400, help="record(name) and changes() calls per round")
    parser.add_argument("--lists", type=int, default=40, help="records() calls per round and size")
    parser.add_argument("--pin", type=int, default=None, help="pin the single-process part to this CPU")
    parser.add_argument("--out", type=Path, default=RESULTS / "local_store.json")
    args = parser.parse_args()
    began = time.monotonic()
    result: dict[str, Any] = {
        "machine": machine(),
        "settings": {"runs": args.runs, "rounds": args.rounds, "writes": args.writes, "reads": args.reads,
                     "lists": args.lists, "single_process_pinned_to_cpu": args.pin,
                     "sqlite_rows": {"sqlite-FULL": "journal_mode=WAL, synchronous=FULL (durable like the files)",
                                     "sqlite-NORMAL": "journal_mode=WAL, synchronous=NORMAL (a power cut may "
                                                      "roll back the last acknowledged writes)"}},
        "runs": [one_run(args) for _ in range(args.runs)],
        "lines": line_counts(),
    }
    result["seconds"] = time.monotonic() - began
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(tables(result) + f"\n\n{result['seconds']:.0f} s; wrote {args.out}\n")


if __name__ == "__main__":
    main()

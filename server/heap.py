"""The Python heap of a long-running server process."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Keep what start-up made (torch, transformers, the model's Python objects: ~500,000 objects)
    out of the cyclic collector's full collections. Under load each full collection traversed them
    all, stalling a process for ~200 ms about once a second, which made the tail latency; later
    objects are collected as before (vLLM's engine freezes its start-up heap too)."""
    gc.collect()
    gc.freeze()

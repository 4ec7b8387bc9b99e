"""The Python heap of a long-running server process."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Keep what start-up made (torch, transformers, the model's Python objects: ~500,000 objects)
    out of the cyclic collector's full collections, each of which would traverse them all: under
    load a stall of ~200 ms about once a second in every process, the tail latency. Later objects
    are collected as before (vLLM's engine freezes its start-up heap too)."""
    gc.collect()
    gc.freeze()

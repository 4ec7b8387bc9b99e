"""anchorserve's engine: ICL classification over compressed "label words are anchors" caches.

No HTTP here; `server/` wraps this package. Exports load lazily, so light users (the HTTP
protocol models, the clients) can import `anchor_cache.task` without pulling in torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ATTENTION_NAME": "attention",
    "AttentionPlan": "attention",
    "AnchorCache": "cache",
    "build_anchor_cache": "cache",
    "Classifier": "classifier",
    "Prediction": "classifier",
    "AnchorServeError": "errors",
    "CacheMismatchError": "errors",
    "Cancelled": "errors",
    "ConflictError": "errors",
    "UnavailableError": "errors",
    "ModelFilesMissing": "errors",
    "NotFoundError": "errors",
    "ValidationError": "errors",
    "LoadedModel": "models",
    "load_model": "models",
    "PRESETS": "task",
    "Demonstration": "task",
    "DemonstrationSource": "task",
    "Method": "task",
    "TaskSpec": "task",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'anchor_cache' has no attribute {name!r}")
    return getattr(import_module(f"anchor_cache.{_EXPORTS[name]}"), name)

"""anchorserve's engine: ICL classification over compressed "label words are anchors" caches.

No HTTP here; `server/` wraps this package.
"""

from anchor_cache.attention import ATTENTION_NAME, AttentionPlan
from anchor_cache.cache import AnchorCache, build_anchor_cache
from anchor_cache.classifier import Classifier, Prediction
from anchor_cache.errors import AnchorServeError, CacheMismatchError, ModelNotFoundError, ValidationError
from anchor_cache.models import LoadedModel, load_model
from anchor_cache.task import PRESETS, Demonstration, DemonstrationSource, Method, TaskSpec

__all__ = [
    "ATTENTION_NAME",
    "PRESETS",
    "AnchorCache",
    "AnchorServeError",
    "AttentionPlan",
    "CacheMismatchError",
    "Classifier",
    "Demonstration",
    "DemonstrationSource",
    "LoadedModel",
    "Method",
    "ModelNotFoundError",
    "Prediction",
    "TaskSpec",
    "ValidationError",
    "build_anchor_cache",
    "load_model",
]

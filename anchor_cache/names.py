"""Names and the cache folder that the command line and the settings need before the engine is
imported, so that `--help` and a mistyped argument answer at once: torch and the models load only
for a command that runs. The modules that use these names are checked against them
(tests/test_cli.py)."""

import os
from pathlib import Path

DEFAULT_MODEL = "default"  # the `model` setting of the built-in SmolLM2-135M-Instruct
# the paper's analyses (anchor_cache.analysis.KINDS), as the API spells them
ANALYSES = ("saliency", "isolation", "deep_layers", "error_diagnosis")
# what `eval --methods` takes (anchor_cache.evaluate.VARIANTS)
VARIANT_NAMES = (
    "vanilla", "hidden_anchor", "text_anchor", "hidden_random", "hidden_random_top", "zero_shot", "many_shot", "knn",
    "linear_head", "vanilla_reweighted", "hidden_anchor_reweighted", "calibrated",
    "hidden_anchor_reweighted_calibrated", "linear_head_reweighted", "auto", "hidden_anchor_calibrated",
)

# the class priors a task serves under (anchor_cache.priors.Prior)
PRIORS = ("pool", "uniform", "adapt")


def cache_dir() -> Path:
    """Where converted models and persisted anchor caches live (`ANCHORSERVE_CACHE_DIR`)."""
    return Path(os.environ.get("ANCHORSERVE_CACHE_DIR", Path.home() / ".cache" / "anchorserve"))

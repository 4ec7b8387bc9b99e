"""The paper's analyses, run on any task and dataset: numbers (JSON-ready) and pictures (PNG).

    saliency          §2.1  S_wp, S_pq, S_ww per layer
    isolation         §2.2  loyalty after isolating label words in the first/last k layers
    deep_layers       §2.3  AUCROC_l and R_l of the target's attention to label words
    error_diagnosis   §3.3  predicted vs real class confusion and their Spearman correlation

All of them go through the one registered attention function (`anchor_cache.attention`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from anchor_cache.analysis import deep_layers, error_diagnosis, isolation, saliency
from anchor_cache.analysis.common import AnalysisData, AnalysisParams, JobControl
from anchor_cache.errors import ValidationError
from anchor_cache.models import LoadedModel


@dataclass(frozen=True)
class Kind:
    params: type[AnalysisParams]
    run: Callable[[LoadedModel, AnalysisData, Any, JobControl], tuple[dict, dict]]


KINDS: dict[str, Kind] = {
    "saliency": Kind(saliency.SaliencyParams, saliency.run),
    "isolation": Kind(isolation.IsolationParams, isolation.run),
    "deep_layers": Kind(deep_layers.DeepLayersParams, deep_layers.run),
    "error_diagnosis": Kind(error_diagnosis.ErrorDiagnosisParams, error_diagnosis.run),
}


@dataclass(frozen=True)
class AnalysisOutput:
    results: dict[str, Any]
    plots: dict[str, bytes]  # name → PNG


def json_safe(value: Any) -> Any:
    """NaN and infinities (an AUC with one class, say) become null: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def parse_params(kind: str, params: dict[str, Any] | BaseModel | None) -> AnalysisParams:
    if kind not in KINDS:
        raise ValidationError(f"unknown analysis {kind!r}; choose from {sorted(KINDS)}")
    model = KINDS[kind].params
    if isinstance(params, model):
        return params
    try:
        return model.model_validate(params.model_dump() if isinstance(params, BaseModel) else params or {})
    except PydanticValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ValidationError(f"bad {kind} params: {problems}") from None


def run_analysis(
    lm: LoadedModel, kind: str, data: AnalysisData, params: dict[str, Any] | AnalysisParams | None = None,
    control: JobControl | None = None,
) -> AnalysisOutput:
    """Run one analysis; raises ValidationError on bad parameters, Cancelled when stopped."""
    parsed = parse_params(kind, params)
    parsed.check(lm.model.config.num_hidden_layers)
    start = time.perf_counter()
    results, plots = KINDS[kind].run(lm, data, parsed, control or JobControl())
    header = {"kind": kind, "task": data.task.name, "model": lm.name, "params": parsed.model_dump(),
              "layers": lm.model.config.num_hidden_layers, "seconds": round(time.perf_counter() - start, 3)}
    return AnalysisOutput(results=json_safe(header | results), plots=plots)


__all__ = ["KINDS", "AnalysisData", "AnalysisOutput", "JobControl", "parse_params", "run_analysis"]

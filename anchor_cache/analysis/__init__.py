"""The paper's analyses, run on any task and dataset: numbers (JSON-ready) and pictures (PNG).

    saliency          §2.1  S_wp, S_pq, S_ww per layer
    isolation         §2.2  loyalty after isolating label words in the first/last k layers
    deep_layers       §2.3  AUCROC_l and R_l of the target's attention to label words
    error_diagnosis   §3.3  predicted vs real class confusion and their Spearman correlation

All of them go through the one registered attention function (`anchor_cache.attention`). Every
result carries `warnings`, a list of sentences saying what degenerated (a model that predicted one
class, a correlation with too few pairs, prompts left out for length); it is empty when all is well.
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


def parse_params(
    kind: str, params: dict[str, Any] | BaseModel | None, n_layers: int | None = None
) -> AnalysisParams:
    """Check an analysis's parameters once, at the edge (CLI, server, bench): their shape, and with
    the model's depth `n_layers` the checks that need it. `run_analysis` takes the result as it is."""
    if kind not in KINDS:
        raise ValidationError(f"unknown analysis {kind!r}; choose from {sorted(KINDS)}")
    model = KINDS[kind].params
    if isinstance(params, model):
        parsed = params
    else:
        try:
            parsed = model.model_validate(params.model_dump() if isinstance(params, BaseModel) else params or {})
        except PydanticValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ValidationError(f"bad {kind} params: {problems}") from None
    if n_layers is not None:
        parsed.check(n_layers)
    return parsed


def run_analysis(
    lm: LoadedModel, kind: str, data: AnalysisData, params: AnalysisParams, control: JobControl | None = None
) -> AnalysisOutput:
    """Run one analysis with params from `parse_params(kind, raw, n_layers)`; raises Cancelled when
    stopped, and ValidationError only for what depends on the data (e.g. prompts past max_tokens)."""
    if not isinstance(params, KINDS[kind].params):
        raise TypeError(f"run_analysis takes {KINDS[kind].params.__name__} from parse_params, got {type(params)}")
    start = time.perf_counter()
    results, plots = KINDS[kind].run(lm, data, params, control or JobControl())
    header = {"kind": kind, "task": data.task.name, "model": lm.name, "params": params.model_dump(),
              "layers": lm.model.config.num_hidden_layers, "seconds": round(time.perf_counter() - start, 3),
              "warnings": results.pop("warnings")}
    return AnalysisOutput(results=json_safe(header | results), plots=plots)


__all__ = ["KINDS", "AnalysisData", "AnalysisOutput", "JobControl", "parse_params", "run_analysis"]

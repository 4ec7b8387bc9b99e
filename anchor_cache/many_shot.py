"""Many-shot anchors: many demonstrations at the cost of their label words, not their text.

The demonstrations are split into groups of one per class (as the task's own context is), and each
group is encoded on its own from position 0, as "structured prompting" (Hao et al., 2022) does, so
no group runs past the model's context however many there are. Each group keeps only its
formatting and label-word K/V (Hidden_anchor), and the groups' caches are merged side by side
(cache.merge_anchor_caches): the query attends to every group's anchors. As in structured prompting,
every anchor key carries a logit bias of log(1/G) (`AnchorCache.key_bias`): G groups then hold the
attention mass one group would, next to the query's own tokens, instead of G times as much (each
group repeats the same formatting tokens, the start-of-text sink among them). The cache grows with
the number of label words; re-weighting β (label keys of every group) and calibration work unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from anchor_cache.cache import AnchorCache, build_anchor_cache, merge_anchor_caches
from anchor_cache.keep import anchor_keep
from anchor_cache.models import LoadedModel
from anchor_cache.prompt import TaskPrompt
from anchor_cache.task import Demonstration, TaskSpec


def groups_of(task: TaskSpec, demonstrations: Sequence[Demonstration]) -> list[list[Demonstration]]:
    """Group g holds the g-th demonstration of each class (classes in label order); the last groups
    hold fewer classes when the classes have unequal counts."""
    by_class: list[list[Demonstration]] = [[] for _ in task.labels]
    for demo in demonstrations:
        by_class[task.label_index(demo.label)].append(demo)
    depth = max(len(rows) for rows in by_class)
    return [[rows[g] for rows in by_class if g < len(rows)] for g in range(depth)]


def many_shot_cache(lm: LoadedModel, task: TaskSpec, demonstrations: Sequence[Demonstration]) -> AnchorCache:
    caches = []
    for group in groups_of(task, demonstrations):
        ctx = TaskPrompt.build(task, group, lm.tokenizer).context
        caches.append(build_anchor_cache(lm, ctx.ids, anchor_keep(ctx), ctx.label_positions, ctx.classes))
    merged = merge_anchor_caches(caches)
    if len(caches) == 1:  # log(1/1) = 0: exactly Hidden_anchor, on its boolean-mask paths
        return merged
    bias = torch.full((merged.num_tokens,), -math.log(len(caches)), device=lm.device)
    return dataclasses.replace(merged, key_bias=bias)

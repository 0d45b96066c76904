"""Score a model the harness built through EleutherAI's lm-evaluation-harness, the field's harness.

Why: a number from the field's own harness (its prompts, its log-likelihood scoring, its task
YAMLs: MMLU, ARC, HellaSwag, …) is comparable with the papers'; the harness's own `evaluate`
is not. The model object is handed over as it is (base + adapter, or merged), wrapped in
lm-eval's `HFLM`, so nothing is saved and reloaded on the way. Local task YAMLs are found
with `include_path`; hub tasks need the network (docs/export.md#lm-eval).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Optional

from torch import nn

from lorabench.errors import ConfigError

SCORE_PREFIX = "lm_eval"  # keys: lm_eval/<task>/<metric>


def lm_eval_scores(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    include_path: Optional[Path] = None,
    batch_size: int = 8,
    num_fewshot: Optional[int] = None,
    limit: Optional[int] = None,
) -> dict[str, float]:
    """`lm_eval/<task>/<metric>` for every task (accuracy etc. as lm-eval reports them; the
    standard errors lm-eval adds are dropped). `tokenizer` is a transformers tokenizer."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--lm-eval-include: {include_path} is not a directory of task YAMLs")
    manager = task_manager(str(include_path), False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # not all local: index lm-eval's own too
        manager = task_manager(str(include_path) if include_path else None, True)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"--lm-eval: unknown task(s) {unknown}; lm-eval knows {len(manager.all_tasks)} tasks "
            "(local YAMLs: --lm-eval-include DIR)"
        )
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local json/csv datasets only; hub tasks then fail fast
    results = simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
        log_samples=False, bootstrap_iters=0, verbosity="ERROR",
    )
    out: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")  # "acc,none" → acc
            if name == "alias" or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            out[f"{SCORE_PREFIX}/{task}/{name}"] = float(value)
    return out


@functools.lru_cache(maxsize=4)
def task_manager(include_path: Optional[str], include_defaults: bool) -> Any:
    """lm-eval's task index: `include_path`'s YAMLs, plus with `include_defaults` the ~15k bundled
    ones (indexing those takes tens of seconds, so only when a task is not local; once per process)."""
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    return TaskManager(include_path=include_path, include_defaults=include_defaults)

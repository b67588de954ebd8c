"""How a model trains: the LoRA adapters and the training settings, with the step budget per
job kind. Validated with pydantic; the recipe embeds them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from langmerge.yamlfile import Strict


class Lora(Strict):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class StepBudget(Strict):
    """Optimiser steps per job kind: an expert sees only its language's data, so at equal epochs
    it takes 1/N of the joint model's steps."""

    expert: int | None = Field(None, ge=1)
    joint: int | None = Field(None, ge=1)


# The training settings whose default depends on the task (docs/training.md says why):
# a classification head trained from scratch with the backbone's LoRA needs a higher rate and
# more passes (kept honest by the best checkpoint) than generation, whose LoRA only nudges an
# LLM that already writes text.
TASK_DEFAULTS = {
    "classification": {"learning_rate": 1e-3, "epochs": 10.0},
    "generation": {"learning_rate": 2e-4, "epochs": 3.0},
}


class Training(Strict):
    """How a model trains. The defaults are chosen to train a healthy model on data nobody tuned
    them for (docs/training.md says why each is what it is)."""

    epochs: float | None = Field(None, gt=0)  # default by task kind: TASK_DEFAULTS
    steps: int | StepBudget | None = None  # optimiser steps instead of epochs (all or per kind)
    min_steps: int = Field(200, ge=0)  # at least this many steps, whatever the epochs give
    learning_rate: float | None = Field(None, gt=0)  # default by task kind: TASK_DEFAULTS
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    batch_size: int = Field(8, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    max_length: int = Field(128, ge=8)
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    group_by_length: bool = True  # batches of similar length: little padding, same loss
    best_checkpoint: bool = True  # keep the step with the best validation score, not the last
    eval_steps: int | None = Field(None, ge=1)  # validation every N steps (default: each epoch)
    checkpoint_steps: int = Field(200, ge=1)  # an interrupted job resumes from the last one
    threads: int | None = Field(None, ge=1)  # CPU threads (default: OMP_NUM_THREADS, else all)

    def budget(self, kind: str, examples: int, processes: int = 1) -> int:
        """The optimiser steps of a `kind` job (expert or joint) on `examples` examples, each
        step taking a batch on each of `processes` processes."""
        batch = self.batch_size * self.gradient_accumulation * processes
        per_epoch = math.ceil(examples / batch)
        fixed = self.steps if isinstance(self.steps, int) else getattr(self.steps, kind, None)
        if fixed is not None:
            return fixed
        return max(self.min_steps, math.ceil(self.epochs * per_epoch), 1)


@dataclass(frozen=True)
class FitSettings:
    """What training one model needs besides its data: the task kind, the LoRA adapters, the
    training settings, and how validation is scored (batch size; for classification the metric
    that ranks checkpoints)."""

    task_kind: str
    lora: Lora
    training: Training
    eval_batch_size: int = 32
    metric: str | None = None

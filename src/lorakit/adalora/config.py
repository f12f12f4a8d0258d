"""``AdaLoraConfig``: the configuration of AdaLoRA, field for field as in Hugging Face PEFT.

AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
https://arxiv.org/abs/2303.10512) parameterises each update in SVD form ``P diag(E) Q`` and prunes the least
important singular triplets during training, so that the total rank falls from ``init_r`` per layer to
``target_r`` per layer on average, distributed over the layers by importance.

The JSON written next to the weights is PEFT's (``peft_type: "ADALORA"``); ``rank_pattern`` is PEFT's too: after
budgeting it maps ``<module path>.lora_E`` to one boolean per initial singular triplet (True = kept), so a saved
adapter holds only the kept triplets and reloads at its pruned size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from lorakit.config import LoraConfig, PeftType


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of an AdaLoRA adapter (Zhang et al. 2023).

    A wrapped layer computes ``h = W0 x + lora_alpha / ranknum * B diag(E) A dropout(x)`` with ``A`` (r x in,
    right singular vectors), ``E`` (r x 1, singular values) and ``B`` (out x r, left singular vectors);
    ``ranknum`` is the initial rank ``init_r`` and stays fixed while triplets are pruned (PEFT's scaling).

    Training has three phases (paper eq. 12): for ``step <= tinit`` the budget stays at ``init_r`` per layer;
    up to ``total_step - tfinal`` it falls cubically to ``target_r`` per layer, pruning every ``deltaT`` steps;
    afterwards the final ranks stay fixed and the kept triplets are fine-tuned.

    Args:
        target_r: average rank per layer at the end of budgeting.
        init_r: rank of every layer at the start.
        tinit: warm-up steps before any pruning.
        tfinal: final steps with fixed ranks.
        deltaT: interval (in steps) between two budget allocations.
        beta1: EMA factor of the sensitivity (smoothed importance, eq. 8).
        beta2: EMA factor of the uncertainty (eq. 9).
        orth_reg_weight: weight of the orthogonality regularizer ``||A A^T - I||_F + ||B^T B - I||_F`` (eq. 4)
            added to the model's loss.
        total_step: the number of optimizer steps of the run (required: the schedule depends on it).
        rank_pattern: filled in by training (``<module path>.lora_E`` -> list of kept flags); leave it unset.
        Every other field (``target_modules``, ``lora_alpha``, ``lora_dropout``, ...) is :class:`LoraConfig`'s;
        ``r`` is not used (as in PEFT), use ``init_r``.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None  # type: ignore[assignment]
    peft_type: PeftType = field(default=PeftType.ADALORA, init=False)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field and what is accepted."""
        pattern, self.rank_pattern = self.rank_pattern, {}
        try:
            super().validate()  # every LoRA field; LoRA's integer rank_pattern check does not apply here
        finally:
            self.rank_pattern = pattern
        if self.r != 8:
            warnings.warn("AdaLoRA ignores r; set the starting rank with init_r.", stacklevel=3)
        if self.use_dora or self.use_rslora:
            raise ValueError(
                "AdaLoRA does not combine with use_dora or use_rslora; use a LoraConfig for those."
            )
        if self.init_lora_weights not in (True, False):
            raise ValueError(
                f"AdaLoRA's init_lora_weights must be True or False, got {self.init_lora_weights!r}."
            )
        _check_positive_int("init_r", self.init_r)
        _check_positive_int("target_r", self.target_r)
        _check_positive_int("deltaT", self.deltaT)
        if self.target_r > self.init_r:
            raise ValueError(
                f"target_r ({self.target_r}) must not exceed init_r ({self.init_r}): AdaLoRA only prunes ranks."
            )
        if self.total_step is None or isinstance(self.total_step, bool) or int(self.total_step) <= 0:
            raise ValueError(
                f"AdaLoRA needs total_step, the number of optimizer steps of the run (> 0), got {self.total_step!r}."
            )
        if not (
            isinstance(self.tinit, int)
            and isinstance(self.tfinal, int)
            and self.tinit >= 0
            and self.tfinal >= 0
        ):
            raise ValueError(
                f"tinit and tfinal must be integers >= 0, got {self.tinit!r} and {self.tfinal!r}."
            )
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(
                f"tinit={self.tinit}, tfinal={self.tfinal} and total_step={self.total_step} leave no budgeting "
                f"phase (it needs tinit < total_step - tfinal); lower tinit/tfinal or raise total_step."
            )
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 < float(value) < 1.0:
                raise ValueError(f"{name} must be in (0, 1) (an EMA factor), got {value!r}.")
        if not math.isfinite(float(self.orth_reg_weight)) or self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be a finite number >= 0, got {self.orth_reg_weight!r}.")
        _check_rank_pattern(self.rank_pattern, self.init_r)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        if data.get("target_modules") is not None and not isinstance(data["target_modules"], str):
            data["target_modules"] = sorted(data["target_modules"])
        return data


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_rank_pattern(pattern: Any, init_r: int) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, dict):
        raise ValueError(
            f"rank_pattern must map module names to lists of booleans, got {type(pattern).__name__}."
        )
    for key, flags in pattern.items():
        if not isinstance(flags, list) or not all(isinstance(flag, bool) for flag in flags):
            raise ValueError(
                f"rank_pattern[{key!r}] must be a list of booleans (one per initial singular triplet), got {flags!r}."
            )
        if len(flags) != init_r:
            raise ValueError(
                f"rank_pattern[{key!r}] has {len(flags)} entries but init_r is {init_r}; "
                f"the config and the pattern do not belong together."
            )


def adalora_config_for_run(
    *,
    total_step: int,
    r: int,
    target_modules: list[str] | str,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    task_type: str | None = None,
    modules_to_save: list[str] | None = None,
    init_r: int | None = None,
    tinit: int | None = None,
    tfinal: int | None = None,
    deltaT: int | None = None,
) -> AdaLoraConfig:
    """An :class:`AdaLoraConfig` for a run of ``total_step`` optimizer steps that ends at average rank ``r``.

    Defaults follow the paper's setups: start at 1.5x the final rank, warm up for 10% of the steps, prune
    until 70% of the run (the final 30% fine-tune the kept triplets), re-allocate every 10 steps on long runs.
    """
    if not isinstance(total_step, int) or total_step < 3:
        raise ValueError(
            f"AdaLoRA needs a run of at least 3 optimizer steps to budget ranks, got {total_step!r}."
        )
    init_r = init_r if init_r is not None else max(r + 1, math.ceil(1.5 * r))
    tinit = tinit if tinit is not None else total_step // 10
    tfinal = tfinal if tfinal is not None else min(total_step * 3 // 10, total_step - tinit - 1)
    deltaT = deltaT if deltaT is not None else (10 if total_step >= 500 else 1)
    return AdaLoraConfig(
        task_type=task_type,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        init_r=init_r,
        target_r=r,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=deltaT,
        total_step=total_step,
    )

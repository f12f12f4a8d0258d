"""AdaLoRA's rank allocator: importance scores of singular triplets and the cubic budget schedule.

Zhang et al. 2023, sec. 3.2-3.3. For every trainable entry ``w`` of ``A``, ``E`` and ``B`` at step ``t``:

    I(w)  = |w * dL/dw|                                          (sensitivity, eq. 6)
    Ī(w)  = beta1 Ī(w) + (1 - beta1) I(w)                        (smoothed sensitivity, eq. 8)
    Ū(w)  = beta2 Ū(w) + (1 - beta2) |I(w) - Ī(w)|               (uncertainty, eq. 9)
    s(w)  = Ī(w) * Ū(w)                                          (eq. 7)

and the score of triplet ``i`` of a layer is ``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`` (eq. 10). The budget
(total number of kept triplets over all layers) follows the cubic schedule (eq. 12)

    b(t) = b0                                              for t <= tinit
    b(t) = bT + (b0 - bT) * (1 - (t - tinit) / (T - tfinal - tinit))^3   (truncated to an integer) in between
    b(t) = bT                                              for t > T - tfinal

with ``b0 = sum of initial ranks`` and ``bT = target_r * number of layers``. Every ``deltaT`` steps of the middle
phase the ``b0 - b(t)`` lowest-scored triplets are masked (``E_i = 0``; a masked triplet may be revived by the next
allocation); at ``t = T - tfinal`` the final allocation is fixed, and afterwards it is re-applied every step.
These conventions (``<=`` comparisons, masking ties, integer truncation) are PEFT's, so both libraries prune the
same triplets.
"""

from __future__ import annotations

import torch

from lorakit.adalora.config import AdaLoraConfig
from lorakit.adalora.layers import AdaLoraLayer

FACTORS = ("lora_A", "lora_E", "lora_B")


class RankAllocator:
    """Tracks importance EMAs of one adapter's layers and masks ``E`` to follow the budget schedule."""

    def __init__(
        self, config: AdaLoraConfig, adapter_name: str, layers: dict[str, AdaLoraLayer], fixed: bool = False
    ):
        """``fixed``: the layers were built at an already allocated (pruned) size; train on, allocate no more."""
        if not layers:
            raise ValueError("AdaLoRA found no layer to allocate ranks over; check target_modules.")
        self.config = config
        self.adapter_name = adapter_name
        self.layers = dict(layers)
        self.fixed = fixed
        self.init_budget = sum(layer.r[adapter_name] for layer in self.layers.values())
        self.target_budget = config.target_r * len(self.layers)
        self.reset_importance()

    # ---------------------------------------------------------------------------------------------- schedule
    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``: the cubic schedule of eq. 12 and whether this step re-allocates."""
        config = self.config
        tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
        if step <= tinit:
            return self.init_budget, False
        if step > total - tfinal:
            return self.target_budget, True
        remaining = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_budget - self.target_budget) * remaining**3 + self.target_budget)
        return budget, step % config.deltaT == 0

    # -------------------------------------------------------------------------------------------- importance
    def reset_importance(self) -> None:
        self.sensitivity: dict[str, torch.Tensor] = {}  # Ī, per parameter entry
        self.uncertainty: dict[str, torch.Tensor] = {}  # Ū, per parameter entry

    def _parameters(self):
        for path, layer in self.layers.items():
            for factor in FACTORS:
                yield f"{path}.{factor}", getattr(layer, factor)[self.adapter_name]

    @torch.no_grad()
    def update_importance(self) -> None:
        """One EMA step of sensitivity and uncertainty from the current ``param * grad`` (eq. 6, 8, 9)."""
        beta1, beta2 = self.config.beta1, self.config.beta2
        for key, param in self._parameters():
            if param.grad is None:
                raise RuntimeError(
                    f"{key} has no gradient. Call update_and_allocate(step) after loss.backward() and "
                    f"optimizer.step(), before optimizer.zero_grad()."
                )
            importance = (param * param.grad).abs()
            smoothed = self.sensitivity.get(key, torch.zeros_like(param))
            smoothed = beta1 * smoothed + (1 - beta1) * importance
            previous_unc = self.uncertainty.get(key, torch.zeros_like(param))
            self.sensitivity[key] = smoothed
            self.uncertainty[key] = beta2 * previous_unc + (1 - beta2) * (importance - smoothed).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """Score of each singular triplet per layer: ``s(E_i) + mean_j s(A_ij) + mean_k s(B_ki)`` (eq. 10)."""
        if not self.sensitivity:
            raise RuntimeError(
                "No importance scores yet: update_and_allocate must run on earlier training steps."
            )
        scores = {}
        for path in self.layers:
            s_A, s_E, s_B = (
                self.sensitivity[f"{path}.{f}"] * self.uncertainty[f"{path}.{f}"] for f in FACTORS
            )
            scores[path] = s_E.view(-1) + (s_A.mean(dim=1) + s_B.mean(dim=0))
        return scores

    # ------------------------------------------------------------------------------------------------ masking
    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, list[bool]]:
        """Zero ``E`` of every triplet scored at or below the ``(b0 - budget)``-th lowest score.

        Returns the rank pattern: ``<layer path>.lora_E`` -> kept flag per triplet.
        """
        scores = self.triplet_scores()
        to_prune = self.init_budget - budget
        if to_prune > 0:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k=to_prune).values.item()
        else:
            threshold = float("-inf")
        pattern = {}
        for path, layer in self.layers.items():
            keep = scores[path] > threshold
            layer.lora_E[self.adapter_name].masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[f"{path}.lora_E"] = keep.tolist()
        return pattern

    @torch.no_grad()
    def apply_pattern(self, pattern: dict[str, list[bool]]) -> None:
        """Re-zero the pruned triplets of a fixed rank pattern (the final fine-tuning phase)."""
        for path, layer in self.layers.items():
            flags = pattern.get(f"{path}.lora_E")
            lora_E = layer.lora_E[self.adapter_name]
            if flags is None:
                continue
            if len(flags) != lora_E.shape[0]:
                if sum(flags) == lora_E.shape[0]:
                    continue  # the layer was already shrunk to its kept triplets
                raise ValueError(
                    f"rank_pattern for {path!r} has {len(flags)} flags; the layer has rank {lora_E.shape[0]}."
                )
            keep = torch.tensor(flags, dtype=torch.bool, device=lora_E.device)
            lora_E.masked_fill_(~keep.view(-1, 1), 0.0)

    def update_and_allocate(self, step: int) -> dict[str, list[bool]] | None:
        """One call per optimizer step: update importances, re-allocate when due; returns a new rank pattern."""
        if self.fixed:
            return None
        final_step = self.config.total_step - self.config.tfinal
        if step < final_step:
            self.update_importance()
            budget, mask_now = self.budget_schedule(step)
            return self.mask_to_budget(budget) if mask_now else None
        if step == final_step:
            pattern = self.mask_to_budget(self.target_budget)
            self.reset_importance()
            return pattern
        if self.config.rank_pattern:
            self.apply_pattern(self.config.rank_pattern)
        return None

    # ---------------------------------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Importance EMAs as tensors (``<param>/sensitivity``, ``<param>/uncertainty``), for checkpoints."""
        state = {f"{k}/sensitivity": v.detach().cpu().clone() for k, v in self.sensitivity.items()}
        state.update({f"{k}/uncertainty": v.detach().cpu().clone() for k, v in self.uncertainty.items()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset_importance()
        expected = {key: param for key, param in self._parameters()}
        for name, tensor in state.items():
            key, _, kind = name.rpartition("/")
            if key not in expected or kind not in ("sensitivity", "uncertainty"):
                raise ValueError(f"AdaLoRA allocator state has key {name!r}, which this model does not have.")
            target = getattr(self, kind)
            target[key] = tensor.to(device=expected[key].device, dtype=expected[key].dtype)

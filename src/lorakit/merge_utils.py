"""Merging task tensors ("task vectors") into one: task arithmetic, TIES, DARE and magnitude pruning.

``add_weighted_adapter`` (:mod:`lorakit.weighted`) applies these to a stack of same-shaped tensors
``t_1, ..., t_n`` (LoRA A factors, B factors, or dense updates ``dW_i``) with weights ``w_1, ..., w_n``, with the
numbers of PEFT 0.21's ``peft.utils.merge_utils``:

* ``linear`` (task arithmetic, Ilharco et al. 2023, "Editing Models with Task Arithmetic"): ``sum_i w_i t_i``.
* ``magnitude_prune``: trim each ``t_i`` (below), then ``sum_i w_i trim(t_i)``.
* ``ties`` (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS):

  1. *trim*: keep the ``k = int(density * numel)`` entries of ``t_i`` largest in magnitude, zero the rest;
  2. *elect sign*: per entry, ``gamma = sign(sum_i trim(t_i))`` (``majority_sign_method="total"``, the paper's
     rule: the sign with the larger total mass) or ``sign(sum_i sign(trim(t_i)))`` (``"frequency"``: the sign
     held by more tensors); a tie elects ``+``. The election uses the unweighted trimmed tensors;
  3. *disjoint merge*: per entry, the mean of ``w_i trim(t_i)`` over the tensors whose entry is non-zero with
     the elected sign (0 where none is).

* ``dare_linear`` (Yu et al. 2024, "Language Models are Super Mario: Absorbing Abilities from Homologous Models
  as a Free Lunch", ICML; DARE = Drop And REscale): drop each entry of ``t_i`` independently with probability
  ``1 - density`` and divide the kept ones by ``density`` (so ``E[dare(t_i)] = t_i``), then ``sum_i w_i
  dare(t_i)``.
* ``dare_ties``: DARE's drop and rescale in place of TIES's trim, then TIES's sign election and disjoint merge.

DARE draws from torch's global generator (seed it with ``torch.manual_seed`` for a repeatable merge): one
``torch.bernoulli`` over a tensor of ``t_i``'s shape, dtype and device per tensor, tensors in order, which is
exactly what PEFT draws, so equally seeded runs of the two agree. ``density = 1`` keeps everything and draws
nothing (PEFT warns and skips the pruning).
"""

from __future__ import annotations

import numbers

import torch

MERGE_KINDS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")
_SPARSIFY = {"ties": "trim", "magnitude_prune": "trim", "dare_linear": "drop", "dare_ties": "drop"}
_ELECTS_SIGN = ("ties", "dare_ties")


def check_merge_options(kind: str, density, majority_sign_method: str) -> None:
    """Raise ValueError when ``kind`` needs a ``density`` in (0, 1] or a known ``majority_sign_method``."""
    if kind not in MERGE_KINDS:
        raise ValueError(f"Unknown merge kind {kind!r}; expected one of {', '.join(MERGE_KINDS)}.")
    if kind in _SPARSIFY:
        if density is None or isinstance(density, bool) or not isinstance(density, numbers.Real):
            raise ValueError(
                f"combination_type {kind!r} needs `density`, the fraction of entries kept: a number in (0, 1]; "
                f"got {density!r}."
            )
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1] (the fraction of entries kept), got {density}.")
    if kind in _ELECTS_SIGN and majority_sign_method not in SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got {majority_sign_method!r}."
        )


def trim(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim: ``tensor`` with all but its ``int(density * numel)`` largest-magnitude entries set to 0."""
    if density >= 1:
        return tensor
    count = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat.abs(), k=count).indices] = 1
    return tensor * keep.view(tensor.shape)


def drop_and_rescale(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` (global generator), divide the kept ones by it."""
    if density >= 1:
        return tensor
    kept = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * kept / density


def elect_sign(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Boolean mask of the entries of ``stacked`` (tensors on dim 0) whose sign is the elected one.

    ``total``: ``sign(sum_i t_i)``; ``frequency``: ``sign(sum_i sign(t_i))``; ties go to ``+``. Zero entries never
    agree (their sign is 0).
    """
    signs = stacked.sign()
    if method == "total":
        mass = stacked.sum(dim=0)
    elif method == "frequency":
        mass = signs.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be one of {', '.join(SIGN_METHODS)}, got {method!r}.")
    elected = torch.where(mass >= 0, 1, -1)
    return signs == elected


def disjoint_mean(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """Per entry, the mean of ``weighted`` (stacked on dim 0) over the tensors in ``agree``; 0 where none are."""
    total = (weighted * agree).sum(dim=0)
    count = agree.sum(dim=0).clamp(min=1)
    return total / count


def merge(
    tensors: list[torch.Tensor],
    weights: list[float],
    kind: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
) -> torch.Tensor:
    """Merge same-shaped ``tensors`` with ``weights`` by ``kind`` (one of :data:`MERGE_KINDS`, see the module doc).

    The weights multiply as a float32 tensor, as in PEFT, so the result is float32 or wider; cast it back if needed.
    """
    check_merge_options(kind, density, majority_sign_method)
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(
            f"Got {len(tensors)} tensors and {len(weights)} weights; give one weight per tensor."
        )
    sparsify = _SPARSIFY.get(kind)
    if sparsify == "trim":
        tensors = [trim(t, density) for t in tensors]
    elif sparsify == "drop":
        tensors = [drop_and_rescale(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    factors = torch.tensor(weights).to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * factors
    if kind in _ELECTS_SIGN:
        return disjoint_mean(weighted, elect_sign(stacked, majority_sign_method))
    return weighted.sum(dim=0)

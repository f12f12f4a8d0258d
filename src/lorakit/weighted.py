"""Combining LoRA adapters into a new one: PEFT's ``add_weighted_adapter``, all eleven combination types.

Each source adapter ``i`` of a layer has factors ``A_i`` (r_i x in), ``B_i`` (out x r_i), scaling ``s_i`` and a
user weight ``w_i``; its update is ``dW_i = s_i B_i A_i``. The new adapter has scaling 1 (``lora_alpha = r``) and
factors ``A'``, ``B'`` chosen per combination type, exactly as PEFT 0.21 computes them:

* ``cat`` (exact): ``A' = [w_1 s_1 A_1; ...; w_n s_n A_n]`` (rows stacked), ``B' = [B_1 ... B_n]`` (columns
  stacked), so ``B' A' = sum_i w_i s_i B_i A_i``; rank ``sum_i r_i``.
* ``svd`` (best rank-k approximation, Eckart-Young): ``dW = sum_i w_i dW_i = U S V^T``, then
  ``B' = U[:, :k] diag(S[:k])`` and ``A' = V^T[:k]``, with ``k = svd_rank`` (default: the largest source rank).
  ``svd_clamp = q`` clips the entries of ``U S`` and ``V^T`` to ``[-h, h]``, ``h`` their ``q``-quantile.
* ``linear`` (a rough approximation, equal ranks only): with ``c_i = w_i s_i``,
  ``A' = sum_i sign(c_i) sqrt(|c_i|) A_i`` and ``B' = sum_i sqrt(|c_i|) B_i``; ``B' A'`` has the wanted terms
  ``c_i B_i A_i`` plus cross terms ``B_i A_j``, which is why PEFT recommends ``cat`` or ``svd``.

* ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (equal ranks only): ``linear`` with the plain
  weighted sums replaced by the merge of that name (:mod:`lorakit.merge_utils`: TIES, DARE, magnitude pruning),
  applied to the A stack with weights ``sign(c_i) sqrt(|c_i|)`` and separately to the B stack with weights
  ``sqrt(|c_i|)``; ``density`` is the fraction of entries kept, ``majority_sign_method`` TIES's sign election.
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: ``svd`` with ``sum_i w_i dW_i``
  replaced by that merge of the updates ``dW_i`` (scaling included, in the base weight's layout) with weights
  ``w_i``.

The DARE types draw from torch's global generator, layer by layer in model order (for the factor types all A
factors, then all B factors), tensor by tensor as PEFT does: seeded alike, lorakit and PEFT give the same adapter.

Embedding factors follow the same formulas (``lora_embedding_A`` is A, ``lora_embedding_B`` is B); convolution
factors are flattened to (out, in * kernel) for the SVD. With one source adapter the type is ``linear``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch

from lorakit.config import LoraConfig, PeftType
from lorakit.inject import ALL_LINEAR, save_wrappers
from lorakit.layers import LoraLayer
from lorakit.merge_utils import MERGE_KINDS, check_merge_options, merge

FACTOR_TYPES = MERGE_KINDS  # merge the A and B stacks: linear, ties, dare_linear, dare_ties, magnitude_prune
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # merge, then SVD
SUPPORTED_TYPES = ("svd", "linear", "cat", *FACTOR_TYPES[1:], *SVD_TYPES[1:])


def _merge_kind(combination_type: str) -> str:
    """The merge of the source tensors: ``ties_svd`` -> ``ties``, ``svd`` -> ``linear``, ``ties`` -> ``ties``."""
    if combination_type == "svd":
        return "linear"
    return combination_type.removesuffix("_svd")


def _max_rank(config: LoraConfig) -> int:
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


def _new_target_modules(tuner, adapters: list[str]):
    """PEFT's rule: a union of name lists, or the regexes joined with ``|``; ``all-linear`` as explicit names."""
    targets = [tuner.peft_config[a].target_modules for a in adapters]
    if any(t == ALL_LINEAR for t in targets):
        return sorted(
            name for name, layer in tuner.adapter_layers() if any(a in layer.adapter_names for a in adapters)
        )
    if len({isinstance(t, str) for t in targets}) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. Combining adapters with "
            "`target_modules` type being a mix of list/set and string is not supported."
        )
    if isinstance(targets[0], str):
        return "|".join(f"({t})" for t in targets)
    return sorted(set().union(*targets))


def combined_config(
    tuner,
    adapters: list[str],
    combination_type: str,
    svd_rank: int | None,
    density: float | None = None,
    majority_sign_method: str = "total",
):
    """Check the request as PEFT does; return (effective combination type, the new adapter's config).

    With one source adapter the type is ``linear`` (PEFT's rule), so ``density`` is then not needed.
    """
    if combination_type not in SUPPORTED_TYPES:
        raise ValueError(
            f"Invalid combination_type: {combination_type!r}; supported: {', '.join(SUPPORTED_TYPES)}."
        )
    for adapter in adapters:
        if adapter not in tuner.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist")
    configs = [tuner.peft_config[a] for a in adapters]
    if any(getattr(c, "peft_type", None) != PeftType.LORA for c in configs):
        raise ValueError(
            "add_weighted_adapter combines LoRA adapters only (not AdaLoRA or bottleneck Adapters)."
        )
    if any(c.use_dora for c in configs):
        raise ValueError(
            "add_weighted_adapter combines the low-rank updates B A; a DoRA adapter also has a magnitude vector, "
            "which this cannot combine (PEFT silently drops it). Merge DoRA adapters with merge_and_unload instead."
        )
    shared = [w for _, w in save_wrappers(tuner.model) if sum(a in w.modules_to_save for a in adapters) > 1]
    if shared:
        raise ValueError(
            "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
            f"{len(shared)} such instance(s)."
        )
    if len(adapters) == 1:
        combination_type = "linear"
    if combination_type != "cat":
        check_merge_options(_merge_kind(combination_type), density, majority_sign_method)
    ranks = [_max_rank(c) for c in configs]
    if combination_type in FACTOR_TYPES:
        if len(set(ranks)) != 1:
            raise ValueError(
                f"All adapters must have the same r value when using combination_type {combination_type} (it "
                f"combines the A and B factors entry by entry); got ranks {ranks}. For different ranks use cat or "
                f"one of {', '.join(SVD_TYPES)}."
            )
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    config = dataclasses.replace(
        configs[0],
        r=new_rank,
        lora_alpha=new_rank,
        target_modules=_new_target_modules(tuner, adapters),
        alpha_pattern={},
        rank_pattern={},
        use_rslora=False,  # scaling 1: PEFT keeps use_rslora and so scales the result by sqrt(r)
    )
    return combination_type, config


def _factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of adapter ``name`` on ``layer``, or None if the layer does not hold it."""
    lora_A = getattr(layer, "lora_A", None)
    if lora_A is not None and name in lora_A:
        return lora_A[name].weight, layer.lora_B[name].weight
    embedding_A = getattr(layer, "lora_embedding_A", None)
    if embedding_A is not None and name in embedding_A:
        return embedding_A[name], layer.lora_embedding_B[name]
    return None


def _weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``sum_i weights[i] * tensors[i]`` (PEFT's task arithmetic: a stack times a float32 weight vector)."""
    stacked = torch.stack(tensors)
    factors = torch.tensor(weights).to(stacked.device).view(-1, *([1] * (stacked.dim() - 1)))
    return (stacked * factors).sum(dim=0)


def combine_cat(factors: list, coefficients: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A' = [c_i A_i]`` stacked on rows, ``B' = [B_i]`` stacked on columns (``c_i = w_i s_i``)."""
    new_A = torch.cat([A.detach() * c for (A, _), c in zip(factors, coefficients)], dim=0)
    new_B = torch.cat([B.detach() for _, B in factors], dim=1)
    return new_A, new_B


def combine_factors(
    factors: list,
    coefficients: list[float],
    kind: str = "linear",
    density: float | None = None,
    majority_sign_method: str = "total",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A' = merge(A_i; sign(c_i) sqrt(|c_i|))``, then ``B' = merge(B_i; sqrt(|c_i|))``, ``merge`` by ``kind``.

    ``kind="linear"`` is the plain weighted sum; see :func:`lorakit.merge_utils.merge` for the others.
    """
    roots = [math.sqrt(abs(c)) for c in coefficients]
    signed = [r if c >= 0 else -r for r, c in zip(roots, coefficients)]
    dtype = factors[0][0].dtype
    options = dict(kind=kind, density=density, majority_sign_method=majority_sign_method)
    # all A factors before any B factor: PEFT's order of DARE's random draws
    new_A = merge([A.detach() for A, _ in factors], signed, **options).to(dtype)
    new_B = merge([B.detach() for _, B in factors], roots, **options).to(dtype)
    return new_A, new_B


def combine_linear(factors: list, coefficients: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A' = sum sign(c_i) sqrt(|c_i|) A_i``, ``B' = sum sqrt(|c_i|) B_i``."""
    return combine_factors(factors, coefficients, "linear")


def svd_factors(
    delta: torch.Tensor,
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta = U S V^T`` (out, in) truncated to ``rank``: ``(A', B') = (V^T[:k], U[:, :k] diag(S[:k]))``."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh, U


def combine_svd(
    deltas: list[torch.Tensor],
    weights: list[float],
    rank: int,
    clamp: float | None = None,
    full_matrices: bool = True,
    driver: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum w_i dW_i`` truncated to ``rank`` by :func:`svd_factors`; ``deltas`` in (out, in) layout."""
    delta = _weighted_sum([d.detach() for d in deltas], weights)
    return svd_factors(delta, rank, clamp, full_matrices, driver)


def _write(target: torch.Tensor, value: torch.Tensor, what: str) -> None:
    """Copy ``value`` into ``target``, zero-padding the rank dimension when the new adapter is wider."""
    if value.dim() != target.dim():
        value = (
            value.reshape(value.shape[0], *target.shape[1:])
            if what == "A"
            else value.reshape(target.shape[0], value.shape[1], *target.shape[2:])
        )
    if any(v > t for v, t in zip(value.shape, target.shape)):
        raise ValueError(
            f"The combined {what} has shape {tuple(value.shape)}, larger than {tuple(target.shape)}."
        )
    with torch.no_grad():
        target.zero_()
        target[tuple(slice(0, n) for n in value.shape)] = value.to(target.dtype)


def _fill_layer(
    layer: LoraLayer, path: str, new: str, adapters, weights, combination_type, svd_options, merge_options
) -> None:
    present = [(a, w) for a, w in zip(adapters, weights) if _factors(layer, a) is not None]
    if not present:
        raise ValueError(
            f"Layer {path!r} got the new adapter {new!r} but holds none of the adapters {adapters}."
        )
    target_A, target_B = _factors(layer, new)
    if combination_type in SVD_TYPES:
        # merged in the base weight's layout (DARE's draws follow it, as PEFT's), then viewed as (out, in)
        deltas = [layer.delta_weight(a).detach() for a, _ in present]
        delta = merge(deltas, [w for _, w in present], _merge_kind(combination_type), **merge_options)
        delta = layer._to_rows(delta)
        new_A, new_B = svd_factors(delta.reshape(delta.shape[0], -1), layer.r[new], **svd_options)
        if new_A[0].numel() != target_A[0].numel() or new_B.shape[0] != target_B.shape[0]:
            raise ValueError(
                f"combination_type={combination_type!r} does not support the layer type of {path!r}."
            )
    else:
        factors = [_factors(layer, a) for a, _ in present]
        coefficients = [w * layer.scaling[a] for a, w in present]
        if combination_type == "cat":
            new_A, new_B = combine_cat(factors, coefficients)
        else:
            new_A, new_B = combine_factors(factors, coefficients, combination_type, **merge_options)
    _write(target_A, new_A, "A")
    _write(target_B, new_B, "B")


def add_weighted_adapter(
    tuner,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> None:
    """Add adapter ``adapter_name`` to ``tuner`` (a LoraModel) combining ``adapters`` with ``weights``.

    The new adapter is not active and does not train (``set_adapter`` it). An existing ``adapter_name`` is left
    alone with a warning (PEFT returns silently). ``density`` and ``majority_sign_method`` belong to the
    TIES / DARE / magnitude-pruning types (``density`` in (0, 1] required there); the DARE types draw from torch's
    global generator.
    """
    if adapter_name in tuner.peft_config:
        warnings.warn(
            f"Adapter {adapter_name!r} already exists; add_weighted_adapter leaves it as it is.", stacklevel=3
        )
        return
    if len(weights) != len(adapters):
        raise ValueError(
            f"Got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter."
        )
    combination_type, config = combined_config(
        tuner, adapters, combination_type, svd_rank, density, majority_sign_method
    )
    tuner.add_adapter(adapter_name, config)
    svd_options = dict(clamp=svd_clamp, full_matrices=svd_full_matrices, driver=svd_driver)
    merge_options = dict(density=density, majority_sign_method=majority_sign_method)
    try:
        for path, layer in tuner.adapter_layers():
            if _factors(layer, adapter_name) is not None:
                _fill_layer(
                    layer, path, adapter_name, adapters, weights, combination_type, svd_options, merge_options
                )
    except Exception:
        tuner.delete_adapter(adapter_name)  # no half-built adapter left behind
        raise
    tuner.set_requires_grad(adapter_name, requires_grad=False)

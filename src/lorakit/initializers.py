"""Data-dependent LoRA initialisations: PiSSA, OLoRA and LoftQ, as pure tensor functions.

Every function takes the base weight ``W`` in ``(out_features, in_features)`` layout (the caller transposes GPT-2
``Conv1D`` weights and dequantizes 4-bit ones), the rank ``r`` and the LoRA ``scaling`` (``alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA), computes in float32 without autograd and returns float32 tensors
``A (r, in)`` and ``B (out, r)`` for a layer computing ``x W'^T + scaling * x A^T B^T``, plus the new base weight
``W'`` (PiSSA, OLoRA: a float residual; LoftQ: an :class:`~lorakit.quant.nf4.NF4Tensor`) such that
``W' + scaling * B @ A`` equals ``W`` (PiSSA, OLoRA: up to rounding; LoftQ: approximately), so the adapted model
starts at the base model's function.

PiSSA and OLoRA reproduce the arithmetic of PEFT 0.21.2's ``LoraLayer.pissa_init`` / ``olora_init`` operation for
operation, so the results are bit-identical to PEFT's for the same input (for a ``Conv1D`` pass the transposed
view ``weight.T``, as PEFT does: a ``.contiguous()`` copy changes the randomized SVD's matmuls by ~1e-7).
:func:`parse_init` validates the ``init_lora_weights`` values lorakit accepts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch

from lorakit.quant.nf4 import NF4Tensor, quantize_nf4

__all__ = ["ACCEPTED_INIT_VALUES", "loftq", "olora", "parse_init", "pissa", "quantization_error"]

ACCEPTED_INIT_VALUES = (True, False, "gaussian", "pissa", "pissa_niter_K", "olora", "loftq")
"""The ``init_lora_weights`` values :func:`parse_init` accepts (``K`` is a positive integer)."""

_NITER = re.compile(r"pissa_niter_([0-9]+)", re.ASCII)


def parse_init(value: Any) -> tuple[str, int | None]:
    """Validate an ``init_lora_weights`` value and return ``(kind, niter)``.

    ``True -> ("default", None)`` (A kaiming-uniform, B zero), ``False -> ("random", None)``,
    ``"gaussian" -> ("gaussian", None)``, ``"pissa" -> ("pissa", None)`` (full SVD),
    ``"pissa_niter_K" -> ("pissa", K)`` (randomized SVD with ``K`` subspace iterations), ``"olora"`` and
    ``"loftq"`` map to themselves. Anything else (including ``1``, ``"True"``, ``"pissa_niter_0"``, ``"corda"``,
    ``"eva"``) raises ``ValueError`` naming the accepted values.
    """
    if isinstance(value, bool):
        return ("default" if value else "random"), None
    if isinstance(value, str):
        if value in ("gaussian", "pissa", "olora", "loftq"):
            return value, None
        match = _NITER.fullmatch(value)
        if match and int(match.group(1)) > 0:
            return "pissa", int(match.group(1))
    raise ValueError(
        "init_lora_weights must be one of True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K a positive "
        f"integer, e.g. 'pissa_niter_4'), 'olora' or 'loftq'; got {value!r}."
    )


def _check(weight: torch.Tensor, r: int, scaling: float) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating-point (out, in) tensor, got {_describe(weight)}.")
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= min(weight.shape):
        raise ValueError(
            f"r must be an integer in [1, {min(weight.shape)}] for a {tuple(weight.shape)} weight, got {r!r}."
        )
    if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"scaling must be a positive finite number (lora_alpha / r), got {scaling!r}.")
    return weight.detach().to(torch.float32)


def _describe(weight: Any) -> str:
    if isinstance(weight, torch.Tensor):
        return f"{weight.dtype} tensor of shape {tuple(weight.shape)}"
    return type(weight).__name__


@torch.no_grad()
def pissa(
    weight: torch.Tensor, r: int, scaling: float, niter: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PiSSA (Meng, Wang & Zhang 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
    Language Models", arXiv:2404.02948, eqs. 2-4): the adapter takes the ``r`` principal singular triplets of W.

    With ``W = U S V^T`` and ``S_r' = S_r / scaling``::

        A = diag(sqrt(S_r')) V_r^T   (r, in)      B = U_r diag(sqrt(S_r'))   (out, r)
        residual = W - scaling * B @ A            (= U_[r:] S_[r:] V_[r:]^T up to rounding)

    ``niter=None`` uses the exact ``torch.linalg.svd(W, full_matrices=False)`` (PEFT's ``"pissa"``);
    ``niter=K`` uses the randomized ``torch.svd_lowrank(W, q=r, niter=K)`` (Halko et al. 2011; PEFT's
    ``"pissa_niter_K"``), which draws its Gaussian test matrix from the global generator of ``W``'s device, so
    seed it (``torch.manual_seed``) for reproducible results. Returns ``(A, B, residual)``, all float32.
    """
    weight = _check(weight, r, scaling)
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
            raise ValueError(f"niter must be a positive integer or None (full SVD), got {niter!r}.")
        Ur, Sr, V = torch.svd_lowrank(weight, r, niter=niter)
        Sr, Vhr = Sr / scaling, V.t()
    A = torch.diag(torch.sqrt(Sr)) @ Vhr  # the same operations, in the same order, as PEFT's pissa_init
    B = Ur @ torch.diag(torch.sqrt(Sr))
    return A, B, weight - scaling * B @ A


@torch.no_grad()
def olora(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OLoRA (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models",
    arXiv:2406.01775, §3): the adapter starts from the first ``r`` columns of ``W``'s QR factorisation.

    With ``Q, R = torch.linalg.qr(W)`` (reduced)::

        A = R[:r]   (r, in)      B = Q[:, :r]   (out, r, orthonormal columns)
        residual = W - scaling * B @ A

    Note that the scaling is not folded into ``A``/``B`` (unlike PiSSA): the residual absorbs ``scaling`` times
    the projection of ``W`` onto its first ``r`` QR directions, exactly as PEFT's ``olora_init`` does.
    Returns ``(A, B, residual)``, all float32.
    """
    weight = _check(weight, r, scaling)
    Q, R = torch.linalg.qr(weight)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, weight - scaling * B @ A


def _low_rank(matrix: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, R)`` with ``L = U_r sqrt(S_r)`` and ``R = sqrt(S_r) Vh_r``, the best rank-``r`` approximation split
    symmetrically (PEFT's ``loftq_utils._low_rank_decomposition``; the column scaling here gives the same bits
    as its product with a diagonal matrix)."""
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = torch.sqrt(S[:r])
    return U[:, :r] * root, root.unsqueeze(1) * Vh[:r]


@torch.no_grad()
def loftq(
    weight: torch.Tensor,
    r: int,
    scaling: float = 1.0,
    num_iter: int = 1,
    *,
    num_bits: int = 4,
    quantize: Callable[[torch.Tensor], Any] = quantize_nf4,
) -> tuple[torch.Tensor, torch.Tensor, NF4Tensor]:
    """LoftQ (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models",
    arXiv:2310.08659, Algorithm 1): quantize ``W`` jointly with a rank-``r`` adapter so that
    ``dequant(Q) + scaling * B @ A`` approximates ``W`` better than ``dequant(NF4(W))`` alone.

    Starting from ``L_0 R_0 = 0``, for ``t = 1..num_iter``::

        Q_t = NF4(W - L_{t-1} R_{t-1})                      # eq. 6
        U S Vh = svd(W - dequant(Q_t));  L_t = U_r sqrt(S_r),  R_t = sqrt(S_r) Vh_r   # eq. 7

    and returns ``A = R_T / sqrt(scaling)``, ``B = L_T / sqrt(scaling)`` (so ``scaling * B @ A = L_T R_T`` for any
    ``lora_alpha``; with ``scaling == 1`` this is PEFT 0.21.2's ``loftq_init`` arithmetic, which ignores the
    scaling) and ``Q_T`` as the quantizer's result (by default lorakit's double-quantized NF4 with blocks of 64,
    which :meth:`lorakit.quant.Linear4bit.load_quantized` takes as it is). ``quantize`` may be any callable
    mapping an fp32 tensor to an object with ``.dequantize()`` (e.g. ``functools.partial(quantize_nf4,
    blocksize=128)``). Only ``num_bits=4`` is supported. Returns ``(A, B, quantized)``.
    """
    weight = _check(weight, r, scaling)
    if num_bits != 4:
        raise ValueError(f"LoftQ in lorakit supports only num_bits=4 (NF4), got {num_bits!r}.")
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be a positive integer, got {num_iter!r}.")
    target = weight
    for step in range(num_iter):
        quantized = quantize(target)
        L, R = _low_rank(weight - quantized.dequantize().to(torch.float32), r)
        if step + 1 < num_iter:
            target = weight - torch.mm(L, R)
    root = math.sqrt(scaling)
    return R / root, L / root, quantized


@torch.no_grad()
def quantization_error(
    weight: torch.Tensor,
    quantized: Any,
    A: torch.Tensor | None = None,
    B: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> float:
    """Frobenius norm ``||W - dequant(Q) - scaling * B @ A||_F`` (without the adapter term when ``A`` and ``B``
    are ``None``). ``quantized`` is an :class:`NF4Tensor` (anything with ``.dequantize()``) or a plain tensor."""
    if (A is None) != (B is None):
        raise ValueError("Pass both A and B, or neither.")
    deq = quantized.dequantize() if hasattr(quantized, "dequantize") else quantized
    error = weight.detach().to(torch.float32) - deq.to(torch.float32)
    if A is not None:
        error = error - scaling * B.to(torch.float32) @ A.to(torch.float32)
    return float(torch.linalg.matrix_norm(error))

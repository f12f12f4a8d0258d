"""The low-rank update as one autograd function, and the mixed-adapter batched product.

``lora_update_(base_out, x, A, B, scaling, p)`` returns ``base_out + scaling * (drop_p(x) A^T) B^T`` (the LoRA
update of Hu et al. 2021, eq. 3) computed in place into ``base_out``. Compared with composing
``nn.Dropout -> nn.Linear -> nn.Linear`` it saves memory and time in training:

* the dropped input is never stored: the function keeps ``x`` (which q/k/v, or gate/up, share: one stored copy
  for all of them instead of one dropped copy per adapter), a one-byte keep-mask (also shared by adapters fed the
  same tensor inside :func:`shared_dropout_scope`, so one random draw serves q, k and v) and the small
  ``h = drop(x) A^T`` (tokens x r);
* ``B`` and the scaling are applied with one ``addmm_`` into the base output, with no extra output-size tensor.

Gradients, with ``g`` the output gradient, ``D`` the dropout mask divided by ``1 - p``, ``xd = D * x``:
``dB = s g^T h``, ``dh = s g B``, ``dA = dh^T xd``, ``dx = D * (dh A)``, and ``g`` itself for ``base_out``.
The factor ``1 / (1 - p)`` of ``D`` is applied to the small (tokens x r) ``h`` and ``dh``, so each big
(tokens x in) tensor is multiplied by the mask once and never scaled.

The boundary: a layer whose update is exactly this product calls :func:`lora_update_` and nothing else of
this module -- LoRA over ``nn.Linear``, GPT-2 ``Conv1D`` and 4-bit Linear layers (:mod:`lorakit.linear_layer`),
DoRA over them without dropout (``B`` scaled row-wise by ``m / n``, :mod:`lorakit.variants.dora`) and AdaLoRA's
``SVDLinear`` (``A * E`` and ``B * alpha / (ranknum + 1e-5)``). Convolutions, embeddings and
``nn.MultiheadAttention`` compute other products and do not use it. :func:`reference_lora_update` is the plain
formula; tests/test_kernel_boundary.py checks the kernel and every one of those layers against it, outputs and
gradients.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F


class SharedMasks:
    """Dropout keep-masks by input tensor, for one forward: adapters fed the same tensor reuse one mask.

    A mask is found by the input's identity and checked against a weak reference and the tensor's version
    counter, so a new tensor that reuses a freed tensor's id, or an input modified in place, draws a new mask.
    """

    def __init__(self) -> None:
        self._masks: dict[int, tuple[weakref.ref, int, float, torch.Tensor]] = {}

    def get(self, x: torch.Tensor, p: float) -> torch.Tensor | None:
        cached = self._masks.get(id(x))
        if cached is not None and cached[0]() is x and cached[1] == x._version and cached[2] == p:
            return cached[3]
        return None

    def put(self, x: torch.Tensor, p: float, mask: torch.Tensor) -> None:
        self._masks[id(x)] = (weakref.ref(x), x._version, p, mask)


_scope: contextvars.ContextVar[SharedMasks | None] = contextvars.ContextVar(
    "lorakit_shared_masks", default=None
)


@contextlib.contextmanager
def shared_dropout_scope() -> Iterator[None]:
    """Inside the block, adapters fed the very same input tensor (q/k/v, gate/up) share one dropout mask.

    LoraModel opens it around each forward (not under gradient checkpointing, whose recomputation runs
    outside the block and must draw the same masks as the first pass). The masks live in a context variable,
    so threads and nested scopes each see their own.
    """
    token = _scope.set(SharedMasks())
    try:
        yield
    finally:
        _scope.reset(token)


_MASK_LEVELS = 1 << 16  # dropout probabilities are resolved to 1/65536


def effective_dropout(p: float) -> float:
    """The dropout probability the keep-mask really uses: ``p`` rounded to a multiple of 1/65536."""
    return round(p * _MASK_LEVELS) / _MASK_LEVELS


def _draw_keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Keep each element with probability ``1 - effective_dropout(p)``, from the global generator.

    One 64-bit random word gives four 16-bit uniforms, each compared with a threshold: about seven times
    cheaper on CPU than ``bernoulli_``, whose per-element random draw dominates the cost of dropout.
    """
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    uniforms = words.view(torch.int16)[:count].view(shape)  # uniform on [-32768, 32767]
    return uniforms >= round(p * _MASK_LEVELS) - _MASK_LEVELS // 2


def _dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep-mask, one byte per input element; shared within a :func:`shared_dropout_scope`."""
    shared = _scope.get()
    mask = shared.get(x, p) if shared is not None else None
    if mask is None:
        mask = _draw_keep_mask(x.shape, p, x.device)
        if shared is not None:
            shared.put(x, p, mask)
    return mask


def _masked(x2: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x * mask`` (one pass over the big tensor); the ``1 / (1 - p)`` factor goes on the small ones."""
    return x2 if mask is None else torch.mul(x2, mask.reshape(x2.shape))


def _keep_scale(mask: torch.Tensor | None, p: float) -> float:
    return 1.0 if mask is None else 1 / (1 - p)


def _add_low_rank_(base_out: torch.Tensor, h: torch.Tensor, weight_B: torch.Tensor, scaling: float) -> None:
    """``base_out += scaling * h B^T``, one fused ``addmm_`` when the dtypes agree."""
    out2 = base_out.view(-1, base_out.shape[-1])
    if out2.dtype == h.dtype:
        out2.addmm_(h, weight_B.T, alpha=scaling)
    else:
        out2.add_((h @ weight_B.T).mul_(scaling).to(out2.dtype))


class _LoraUpdate(torch.autograd.Function):
    """Autocast is handled here by explicit casts to one compute dtype, so forward and backward agree."""

    @staticmethod
    def forward(ctx, base_out, x, weight_A, weight_B, scaling, p, mask, compute_dtype):
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
            h = _masked(x2, mask) @ weight_A.to(compute_dtype).T  # (tokens, r)
            if mask is not None:
                h.mul_(_keep_scale(mask, p))  # (x * m / (1 - p)) A^T, scaled on the small side
            _add_low_rank_(base_out, h, weight_B.to(compute_dtype), scaling)
        ctx.mark_dirty(base_out)
        ctx.save_for_backward(x, weight_A, weight_B, h, mask)
        ctx.scaling, ctx.p, ctx.compute_dtype = scaling, p, compute_dtype
        return base_out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_A, weight_B, h, mask = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        dtype = ctx.compute_dtype
        grad_x = grad_A = grad_B = None
        with torch.autocast(grad_out.device.type, enabled=False):
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
            # Layouts chosen for CPU BLAS (equal on GPU): with N = r tiny, ``g^T h`` and ``g B`` read the
            # big (tokens x out) ``g`` transposed or with a (out x r) right operand, 2-7x slower on MKL than
            # ``(h^T g)^T`` and ``g (B^T)^T`` with ``B^T`` made contiguous (r x out, a few KB).
            if need_B:
                grad_B = (h.T @ g).mul_(ctx.scaling).T.to(weight_B.dtype)
            if need_x or need_A:
                # dh = s g B, times the dropout factor 1/(1-p) here, on (tokens x r), not on the big tensors
                factor = ctx.scaling * _keep_scale(mask, ctx.p)
                grad_h = F.linear(g, weight_B.T.to(dtype).contiguous()).mul_(factor)
                if need_A:
                    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
                    grad_A = (grad_h.T @ _masked(x2, mask)).to(weight_A.dtype)
                if need_x:
                    grad_x = _masked(grad_h @ weight_A.to(dtype), mask).view(x.shape).to(x.dtype)
        return grad_out, grad_x, grad_A, grad_B, None, None, None, None


def lora_update_(
    base_out: torch.Tensor,
    x: torch.Tensor,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    scaling: float,
    p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """``base_out + scaling * (dropout_p(x) @ A^T) @ B^T``, written into ``base_out`` when possible.

    Under ``torch.compile`` the plain out-of-place formula is traced instead (with ``F.dropout``): the compiler
    fuses it itself, and the eager tricks (a shared mask found by tensor identity, an in-place autograd
    function) would only break the graph.
    """
    if torch.compiler.is_compiling():
        dropped = F.dropout(x, p, training) if training and p > 0 else x
        update = (dropped.to(weight_A.dtype) @ weight_A.T) @ weight_B.T
        return base_out + (update * scaling).to(base_out.dtype)
    p = effective_dropout(p) if training else 0.0
    if not base_out.is_contiguous():
        base_out = base_out.contiguous()
    mask = _dropout_keep_mask(x, p) if p > 0 else None
    autocasting = torch.is_autocast_enabled(x.device.type)
    compute_dtype = torch.get_autocast_dtype(x.device.type) if autocasting else weight_A.dtype
    if torch.is_grad_enabled():
        return _LoraUpdate.apply(base_out, x, weight_A, weight_B, scaling, p, mask, compute_dtype)
    # inference: the same arithmetic with no autograd bookkeeping (the hot path of unmerged generation)
    with torch.autocast(x.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        x2 = x.reshape(-1, x.shape[-1]).to(compute_dtype)
        h = _masked(x2, mask) @ weight_A.to(compute_dtype).T
        _add_low_rank_(base_out, h, weight_B.to(compute_dtype), scaling * _keep_scale(mask, p))
    return base_out


def reference_lora_update(
    base_out: torch.Tensor,
    x: torch.Tensor,
    weight_A: torch.Tensor,
    weight_B: torch.Tensor,
    scaling: float,
    keep_mask: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """The plain formula the kernel must equal: ``base_out + scaling * ((x * D) A^T) B^T``, ``D = mask / (1 - p)``.

    Out of place, through autograd's own ops; the equivalence tests compare :func:`lora_update_` with it
    (outputs and every gradient) for each layer kind that runs through the kernel.
    """
    dropped = x if keep_mask is None else x * keep_mask / (1 - p)
    update = (dropped.to(weight_A.dtype) @ weight_A.T) @ weight_B.T
    return base_out + (update * scaling).to(base_out.dtype)


def stack_adapters(
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float]], names: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapters' ``A`` (padded to the largest rank) and ``s B`` stacked, plus a zero last slot ("no adapter").

    Returns ``stacked_A`` (n + 1, r_max, in) and ``stacked_B`` (n + 1, out, r_max); zero padding leaves every
    product unchanged: ``x A_pad^T (s B_pad)^T = s x A^T B^T``.
    """
    weight_A, weight_B, _ = weights[names[0]]
    max_r = max(weights[n][0].shape[0] for n in names)
    stacked_A = weight_A.new_zeros((len(names) + 1, max_r, weight_A.shape[1]))
    stacked_B = weight_B.new_zeros((len(names) + 1, weight_B.shape[0], max_r))
    for slot, name in enumerate(names):
        weight_A, weight_B, scaling = weights[name]
        rank = weight_A.shape[0]
        stacked_A[slot, :rank] = weight_A
        stacked_B[slot, :, :rank] = weight_B * scaling
    return stacked_A, stacked_B


def mixed_batch_update_(
    result: torch.Tensor,
    x: torch.Tensor,
    row_adapters: Sequence[str],
    names: list[str],
    stacked: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Row ``i`` of ``result`` gets ``(x_i A_{a(i)}^T) (s B_{a(i)})^T`` added, ``a(i) = row_adapters[i]``.

    ``stacked`` comes from :func:`stack_adapters` over ``names``; rows naming no adapter there (``"__base__"``)
    use the zero slot. Gathered batched product: two ``bmm`` over the whole batch, the second one a
    ``baddbmm_`` into ``result`` (in place when dtypes agree), instead of a loop over per-adapter sub-batches.
    """
    stacked_A, stacked_B = stacked
    slot_of = {name: slot for slot, name in enumerate(names)}
    index = torch.tensor([slot_of.get(n, len(names)) for n in row_adapters], device=x.device)
    batch = x.shape[0]
    autocasting = torch.is_autocast_enabled(x.device.type)
    # in the autocast dtype under autocast (as the autograd path), in the adapters' dtype otherwise
    dtype = torch.get_autocast_dtype(x.device.type) if autocasting else stacked_A.dtype
    with torch.autocast(x.device.type, enabled=False) if autocasting else contextlib.nullcontext():
        x3 = x.reshape(batch, -1, x.shape[-1]).to(dtype)
        h = torch.bmm(x3, stacked_A[index].transpose(1, 2).to(dtype))  # (batch, tokens, r_max)
        B_rows = stacked_B[index].transpose(1, 2).to(dtype)  # (batch, r_max, out)
        if result.dtype == dtype and result.is_contiguous():
            result.view(batch, -1, result.shape[-1]).baddbmm_(h, B_rows)
            return result
        return result + torch.bmm(h, B_rows).reshape(result.shape).to(result.dtype)

"""Equivalence at the kernel boundary: the fused ``lora_update_`` against the plain formula, everywhere it runs.

1. ``lora_update_`` against ``reference_lora_update`` directly: outputs and the gradients on ``x``, ``A``, ``B`` and
   ``base_out``, in fp32, under bf16 autocast and with a bf16 model over fp32 adapters; with and without dropout
   (the reference gets the very mask the kernel used), with and without autograd, contiguous or not.
2. Each layer kind that runs through the kernel -- LoRA and DoRA over ``nn.Linear``, GPT-2 ``Conv1D`` and the
   4-bit ``Linear4bit``, AdaLoRA's ``SVDLinear`` over the same bases -- against its formula written out here from
   the layer's own weights (``W0`` dequantized for 4-bit), forward and gradients.
3. The shared dropout masks: one per input tensor inside a scope, none shared outside it, per thread.

Every comparison also checks that a wrong formula (wrong scaling, another mask, no magnitude, no ``E``) is
detected at the same tolerance, so the tolerances are tight enough for the comparisons to mean something.
"""

from __future__ import annotations

import contextlib
import threading
import weakref

import pytest
import torch
from torch import nn

import lorakit.adalora.layers
import lorakit.linear_layer
import lorakit.variants.dora
from lorakit.adalora.layers import make_svd_layer
from lorakit.layer_kinds import Conv1D
from lorakit.layers import make_lora_layer
from lorakit.lora_ops import (
    SharedMasks,
    _dropout_keep_mask,
    effective_dropout,
    lora_update_,
    reference_lora_update,
    shared_dropout_scope,
)
from lorakit.quant import Linear4bit

FP32_TOL = 1e-6  # max |got - want| / max |want|
# bf16: unit roundoff 2^-8; a few roundings plus cancellation in the token sums of dA and dB reach 1.3e-2 against
# float64 for the kernel and for the reference formula itself (same inputs, same mask), so 2e-2, both between the
# two and against float64. A 1.5x scaling or another dropout mask is still told apart at this tolerance.
BF16_TOL = 2e-2

# ------------------------------------------------------------------------------------------------ helpers


def rel_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``, in float64 (0 for empty tensors)."""
    got, want = got.detach().double(), want.detach().double()
    if want.numel() == 0:
        return 0.0
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def assert_equivalent(got: dict, want: dict, tol: float, wrong: list[dict] = ()) -> None:
    """``got`` and ``want`` (name -> tensor) agree within ``tol``; each ``wrong`` differs from ``got`` beyond it.

    For a ``wrong`` dict, every tensor it holds must be told apart (give it only what the error changes).
    """
    assert got.keys() == want.keys()
    for name in got:
        assert got[name] is not None and want[name] is not None, name
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, (name, got[name].dtype, want[name].dtype)
        diff = rel_diff(got[name], want[name])
        assert diff <= tol, f"{name}: relative difference {diff:.3g} > {tol:g}"
    for other in wrong:
        for name, tensor in other.items():
            diff = rel_diff(got[name], tensor)
            assert diff > tol, f"a wrong formula is not told apart on {name} ({diff:.3g} <= {tol:g})"


# --------------------------------------------------------------------- 1. the kernel against the reference

IN, OUT = 32, 24

#: name -> (dtype of x, dtype of base_out, autocast to bf16); adapters are fp32 throughout
PRECISIONS = {
    "fp32": (torch.float32, torch.float32, False),
    "autocast-bf16": (torch.float32, torch.bfloat16, True),  # base_out from an autocast matmul
    "autocast-bf16-fp32-base": (torch.float32, torch.float32, True),
    "bf16-model": (torch.bfloat16, torch.bfloat16, False),  # bf16 model, fp32 adapters, no autocast
}
#: name -> (the leaves that require grad, the grad mode the call runs in)
GRAD_MODES = {
    "grad": (("x", "A", "B", "base_out"), contextlib.nullcontext),
    "adapters-only": (("A", "B"), contextlib.nullcontext),  # frozen input, as under the first adapted layer
    "inputs-only": (("x", "base_out"), contextlib.nullcontext),  # a frozen adapter inside a trained network
    "no-requires-grad": ((), contextlib.nullcontext),
    "no_grad": ((), torch.no_grad),  # the inference fast path
    "inference_mode": ((), torch.inference_mode),
}


def _kernel_inputs(lead: tuple[int, ...], r: int, x_dtype, base_dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(*lead, IN, generator=gen).to(x_dtype),
        "A": torch.randn(r, IN, generator=gen) / IN**0.5,
        "B": torch.randn(OUT, r, generator=gen),
        "base": torch.randn(*lead, OUT, generator=gen).to(base_dtype),
        "upstream": torch.randn(*lead, OUT, generator=gen),
    }


def _strided(tensor: torch.Tensor, requires_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A leaf holding ``tensor`` with its last dimension first, and the non-contiguous view of it as ``tensor``."""
    leaf = tensor.movedim(-1, 0).contiguous().requires_grad_(requires_grad)
    return leaf, leaf.movedim(0, -1)


def _run_update(update, data, *, grad_mode, contiguous, autocast, strided_x=False, mask_draw=None):
    """``update(base_out, x, A, B)`` on fresh leaves; returns (output, gradients, the mask drawn, base_out).

    ``mask_draw(x)`` runs first, inside a shared-dropout scope around the call, so the kernel reuses that mask.
    A non-contiguous ``base_out`` (or ``x``) is a transposed view of its leaf.
    """
    with_grad, grad_context = GRAD_MODES[grad_mode]
    leaves = {name: data[name].clone().requires_grad_(name in with_grad) for name in ("A", "B")}
    leaves["x"], x = _strided(data["x"], "x" in with_grad) if strided_x else (data["x"].clone(),) * 2
    x.requires_grad_("x" in with_grad)
    if contiguous:
        leaves["base_out"] = data["base"].clone().requires_grad_("base_out" in with_grad)
        base_out = leaves["base_out"].clone()  # not a leaf: the kernel may write into it
    else:
        leaves["base_out"], base_out = _strided(data["base"], "base_out" in with_grad)
    assert x.is_contiguous() != strided_x or x.numel() == 0
    assert base_out.is_contiguous() == contiguous or base_out.numel() == 0
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with shared_dropout_scope():
        mask = mask_draw(x) if mask_draw is not None else None
        with grad_context(), cast:
            out = update(base_out, x, leaves["A"], leaves["B"])
    grads = {}
    if with_grad:
        (out.float() * data["upstream"]).sum().backward()
        grads = {name: leaves[name].grad for name in with_grad}
    return out, grads, mask, base_out


def _check_kernel(data, scaling, p, tol, **run) -> torch.Tensor | None:
    """The kernel against the reference (same mask) and the float64 formula; wrong formulas told apart.

    Returns the keep-mask the kernel used (``None`` without dropout).
    """
    p_eff = effective_dropout(p)
    draw = (lambda x: _dropout_keep_mask(x, p_eff)) if p > 0 else None

    def kernel(base_out, x, A, B):
        return lora_update_(base_out, x, A, B, scaling, p, training=True)

    got, got_grads, mask, base_out = _run_update(kernel, data, mask_draw=draw, **run)
    got = {"out": got, **got_grads}
    if run["contiguous"] and base_out.numel():  # the update is written into base_out
        assert got["out"].data_ptr() == base_out.data_ptr()

    def reference(s, keep_mask, inputs=data, **options):
        def update(base_out, x, A, B):
            return reference_lora_update(base_out, x, A, B, s, keep_mask=keep_mask, p=p_eff)

        out, grads, _, _ = _run_update(update, inputs, **(run | options))
        return {"out": out, **grads}

    # the exact value: the same formula in float64, no autocast; the kernel is within rounding tolerance of it
    exact = reference(scaling, mask, {k: v.double() for k, v in data.items()}, autocast=False)
    for name, value in got.items():
        diff = rel_diff(value, exact[name])
        assert diff <= tol, f"{name}: relative difference {diff:.3g} from the exact value > {tol:g}"

    wrong = []
    if data["x"].numel():  # an empty update is the same whatever the formula
        wrong.append(reference(1.5 * scaling, mask))
        if p > 0:
            wrong.append(reference(scaling, _dropout_keep_mask(data["x"], p_eff)))  # another draw
        for case in wrong:
            case.pop("base_out", None)  # dL/d base_out is the upstream gradient whatever the update
    assert_equivalent(got, reference(scaling, mask), tol, wrong)
    return mask


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided-base"])
@pytest.mark.parametrize("scaling", [0.5, 2.0])
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("lead", [(2, 5), (10,)], ids=["batch-seq", "tokens"])
def test_kernel_equals_reference(lead, r, scaling, contiguous, p, grad_mode, precision):
    x_dtype, base_dtype, autocast = PRECISIONS[precision]
    tol = FP32_TOL if precision == "fp32" else BF16_TOL
    data = _kernel_inputs(lead, r, x_dtype, base_dtype)
    run = dict(grad_mode=grad_mode, contiguous=contiguous, autocast=autocast)
    mask = _check_kernel(data, scaling, p, tol, **run)
    if p > 0:
        assert mask.dtype == torch.bool and mask.shape == data["x"].shape
        assert 0 < (~mask).sum() < mask.numel()  # some inputs dropped, some kept


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("case", ["one-vector", "strided-x", "strided-x-and-base", "no-tokens", "empty-seq"])
def test_kernel_equals_reference_on_odd_inputs(case, p):
    lead = {"one-vector": (), "no-tokens": (0,), "empty-seq": (3, 0)}.get(case, (2, 5))
    data = _kernel_inputs(lead, 4, torch.float32, torch.float32)
    run = dict(grad_mode="grad", contiguous=case != "strided-x-and-base", autocast=False)
    _check_kernel(data, 2.0, p, FP32_TOL, strided_x=case.startswith("strided-x"), **run)


@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
def test_kernel_drops_nothing_out_of_training(grad_mode):
    data = _kernel_inputs((2, 5), 4, torch.float32, torch.float32)
    run = dict(grad_mode=grad_mode, contiguous=True, autocast=False)
    got, got_grads, _, _ = _run_update(
        lambda b, x, A, B: lora_update_(b, x, A, B, 2.0, 0.5, training=False), data, **run
    )
    out, grads, _, _ = _run_update(lambda b, x, A, B: reference_lora_update(b, x, A, B, 2.0), data, **run)
    mask = _dropout_keep_mask(data["x"], 0.5)
    dropped, _, _, _ = _run_update(
        lambda b, x, A, B: reference_lora_update(b, x, A, B, 2.0, mask, 0.5), data, **run
    )
    assert_equivalent({"out": got, **got_grads}, {"out": out, **grads}, FP32_TOL, [{"out": dropped}])


def test_compiled_fallback_equals_reference(monkeypatch):
    """Under ``torch.compile`` the kernel traces the plain formula instead (here: forced, without compiling)."""
    data = _kernel_inputs((2, 5), 4, torch.float32, torch.float32)
    run = dict(grad_mode="grad", contiguous=True, autocast=False)
    out, grads, _, _ = _run_update(lambda b, x, A, B: reference_lora_update(b, x, A, B, 2.0), data, **run)
    wrong, _, _, _ = _run_update(lambda b, x, A, B: reference_lora_update(b, x, A, B, 3.0), data, **run)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got, got_grads, _, _ = _run_update(lambda b, x, A, B: lora_update_(b, x, A, B, 2.0), data, **run)
    assert_equivalent({"out": got, **got_grads}, {"out": out, **grads}, FP32_TOL, [{"out": wrong}])


# --------------------------------------------------------------------- 2. each layer kind against its formula

ALPHA = 8
BASE_KINDS = ("linear", "conv1d", "4bit", "4bit-bf16")
DROPOUT_MODES = pytest.mark.parametrize(
    "p, training", [(0.0, True), (0.1, True), (0.1, False)], ids=["train", "dropout", "eval"]
)


def _base_layer(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "conv1d":  # GPT-2's layer: weight stored (in, out)
        layer = Conv1D(OUT, IN)
        with torch.no_grad():
            layer.weight.normal_(std=IN**-0.5)
            layer.bias.normal_()
        return layer
    linear = nn.Linear(IN, OUT)
    if kind == "linear":
        return linear
    compute_dtype = torch.bfloat16 if kind == "4bit-bf16" else torch.float32
    return Linear4bit.from_linear(linear, compute_dtype=compute_dtype)


def _base_weight(kind: str, base: nn.Module) -> torch.Tensor:
    """``W0`` as (out, in), from the layer's own storage (dequantized in the compute dtype for 4-bit)."""
    if kind == "linear":
        return base.weight.detach()
    if kind == "conv1d":
        return base.weight.detach().T
    return base.dequantize()


def _base_formula(kind: str, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W0^T + b``; a bf16 4-bit layer computes it in bf16 (input cast down, output cast back)."""
    weight, bias = _base_weight(kind, base), base.bias.detach()
    if kind == "4bit-bf16":
        return (x.to(torch.bfloat16) @ weight.T + bias.to(torch.bfloat16)).to(x.dtype)
    return x @ weight.T + bias


@pytest.fixture
def kernel_calls(monkeypatch) -> list[str]:
    """The fused kernel's calls from the layer modules, so each layer test knows the kernel is what it checked."""
    calls = []
    for module in (lorakit.linear_layer, lorakit.variants.dora, lorakit.adalora.layers):
        original = module.lora_update_

        def counted(*args, _original=original, _name=module.__name__, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "lora_update_", counted)
    return calls


def _layer_tol(kind: str, dora: bool = False) -> float:
    """fp32, except DoRA over a bf16 4-bit base: its fused path rescales the base output the layer computed in bf16,
    ``(m/n) (W0 x + b - b)``, where the formula has ``(m/n - 1) W0 x`` in fp32 (measured: 2.6e-3 at most, on the gradient of m)."""
    return BF16_TOL if dora and kind == "4bit-bf16" else FP32_TOL


def _leaves(tensors: dict) -> dict:
    return {name: t.detach().clone().requires_grad_() for name, t in tensors.items()}


def _formula_result(out: torch.Tensor, leaves: dict, upstream: torch.Tensor) -> dict:
    (out * upstream).sum().backward()
    return {"out": out.detach(), **{name: leaf.grad for name, leaf in leaves.items()}}


def _layer_result(layer: nn.Module, x: torch.Tensor, params: dict, upstream, draw_p: float | None) -> tuple:
    """The layer's output and gradients; with ``draw_p`` the kernel's mask is drawn first (shared scope)."""
    x = x.clone().requires_grad_()
    with shared_dropout_scope():
        mask = _dropout_keep_mask(x, draw_p) if draw_p else None
        out = layer(x)
    (out * upstream).sum().backward()
    return {"out": out.detach(), "x": x.grad, **{n: p.grad for n, p in params.items()}}, mask


def _inputs(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, IN, generator=gen), torch.randn(2, 5, OUT, generator=gen)


@DROPOUT_MODES
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("kind", BASE_KINDS)
def test_lora_layer_equals_formula(kind, r, p, training, kernel_calls):
    base = _base_layer(kind)
    layer = make_lora_layer(base)
    layer.update_layer("default", r, ALPHA, p, False, use_dora=False)
    layer.train(training)
    params = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight}
    x, upstream = _inputs()
    p_eff = effective_dropout(p) if training else 0.0
    got, mask = _layer_result(layer, x, params, upstream, p_eff)
    assert kernel_calls == ["lorakit.linear_layer"]

    def formula(scaling, keep=mask):
        leaves = _leaves({"x": x, **params})
        xd = leaves["x"] if keep is None else leaves["x"] * keep / (1 - p_eff)
        update = (xd @ leaves["lora_A"].T) @ leaves["lora_B"].T
        return _formula_result(_base_formula(kind, base, leaves["x"]) + scaling * update, leaves, upstream)

    wrong = [formula(1.5 * ALPHA / r)]
    if mask is not None:
        wrong.append({"out": formula(ALPHA / r, _dropout_keep_mask(x, p_eff))["out"]})
    assert_equivalent(got, formula(ALPHA / r), _layer_tol(kind), wrong)


@pytest.mark.parametrize("mode", ["eval", "eval-dropout", "train", "train-dropout"])
@pytest.mark.parametrize("kind", BASE_KINDS)
def test_dora_layer_equals_formula(kind, mode, kernel_calls):
    """``h = W0 x + b + (m/n - 1) W0 xd + (m/n) s B A xd``, ``n = ||W0 + s BA||_row`` (no gradient).

    Eval and undropped training run through the fused kernel; training with dropout takes the plain path
    (``nn.Dropout``), whose mask is read off the dropout module's output (``xd`` is zero exactly where dropped).
    """
    r, p = 4, (0.1 if "dropout" in mode else 0.0)
    base = _base_layer(kind)
    layer = make_lora_layer(base)
    layer.update_layer("default", r, ALPHA, p, False, use_dora=True)
    layer.train(mode.startswith("train"))
    params = {
        "lora_A": layer.lora_A["default"].weight,
        "lora_B": layer.lora_B["default"].weight,
        "magnitude": layer.lora_magnitude_vector["default"].weight,
    }
    with torch.no_grad():  # m != n, else m/n = 1 and a missing or misplaced m/n goes unseen
        params["magnitude"].mul_(torch.rand(OUT, generator=torch.Generator().manual_seed(3)) + 0.5)
    dropped = []
    if mode == "train-dropout":
        layer.lora_dropout["default"].register_forward_hook(lambda mod, args, out: dropped.append(out != 0))
    x, upstream = _inputs()
    got, _ = _layer_result(layer, x, params, upstream, None)
    assert kernel_calls == ([] if mode == "train-dropout" else ["lorakit.variants.dora"])
    assert len(dropped) == (1 if mode == "train-dropout" else 0)
    keep = dropped[0] if dropped else None
    if keep is not None:
        assert 0 < (~keep).sum() < keep.numel()
    weight = _base_weight(kind, base).float()

    def formula(scaling, use_magnitude=True):
        leaves = _leaves({"x": x, **params})
        xd = leaves["x"] if keep is None else leaves["x"] * keep / (1 - p)
        lora_A, lora_B = leaves["lora_A"], leaves["lora_B"]
        with torch.no_grad():
            norm = torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1)
        scale = leaves["magnitude"] / norm if use_magnitude else torch.ones(OUT)
        out = (
            _base_formula(kind, base, leaves["x"])
            + (scale - 1) * (xd @ weight.T)
            + scale * scaling * ((xd @ lora_A.T) @ lora_B.T)
        )
        return _formula_result(out, leaves, upstream)

    want = formula(ALPHA / r)
    bad_scaling = formula(1.5 * ALPHA / r)
    no_magnitude = formula(ALPHA / r, use_magnitude=False)  # plain LoRA
    wrong = [
        {k: bad_scaling[k] for k in ("out", "x", "lora_A", "lora_B")},
        {k: no_magnitude[k] for k in ("out", "x", "lora_A", "lora_B")},
    ]
    assert_equivalent(got, want, _layer_tol(kind, dora=True), wrong)


@DROPOUT_MODES
@pytest.mark.parametrize("r", [1, 4])
@pytest.mark.parametrize("kind", BASE_KINDS)
def test_adalora_svd_linear_equals_formula(kind, r, p, training, kernel_calls):
    """``h = W0 x + b + ((xd A^T) * E^T) B^T * alpha / (ranknum + 1e-5)``."""
    base = _base_layer(kind)
    layer = make_svd_layer(base, "proj")
    assert layer.fan_in_fan_out == (kind == "conv1d")
    layer.update_layer("default", r, ALPHA, p, False, ranknum=r)
    layer.train(training)
    params = {name: getattr(layer, name)["default"] for name in ("lora_A", "lora_E", "lora_B")}
    x, upstream = _inputs()
    p_eff = effective_dropout(p) if training else 0.0
    got, mask = _layer_result(layer, x, params, upstream, p_eff)
    assert kernel_calls == ["lorakit.adalora.layers"]

    def formula(factor, use_e=True, keep=mask):
        leaves = _leaves({"x": x, **params})
        xd = leaves["x"] if keep is None else leaves["x"] * keep / (1 - p_eff)
        h = xd @ leaves["lora_A"].T
        if use_e:
            h = h * leaves["lora_E"].T
        update = (h @ leaves["lora_B"].T) * factor
        return _formula_result(_base_formula(kind, base, leaves["x"]) + update, leaves, upstream)

    factor = ALPHA / (r + 1e-5)  # ranknum = r, PEFT's 1e-5
    no_e = formula(factor, use_e=False)
    wrong = [formula(1.5 * factor), {k: no_e[k] for k in ("out", "x", "lora_A", "lora_B")}]
    if mask is not None:
        wrong.append({"out": formula(factor, keep=_dropout_keep_mask(x, p_eff))["out"]})
    assert_equivalent(got, formula(factor), _layer_tol(kind), wrong)


# ------------------------------------------------------------------------------------------ 3. shared masks

P = effective_dropout(0.1)


def test_adapters_fed_the_same_input_share_one_mask_inside_a_scope():
    """q and k see the same x: the first draws the mask, the second reuses it; both equal the formula with it."""
    x, _ = _inputs()
    layers = []
    for seed in (10, 11):
        torch.manual_seed(seed)
        layer = make_lora_layer(nn.Linear(IN, OUT))
        layer.update_layer("default", 4, ALPHA, 0.1, False)
        layers.append(layer.train())
    with shared_dropout_scope():
        outs = [layer(x) for layer in layers]
        mask = _dropout_keep_mask(x, P)  # the mask the first layer drew, from the scope's cache
        assert _dropout_keep_mask(x, P) is mask
    other = _dropout_keep_mask(x, P)  # outside: a fresh draw
    assert not torch.equal(mask, other)
    for layer, out in zip(layers, outs):
        weight_A, weight_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        base = layer.base_layer
        want = reference_lora_update(base(x), x, weight_A, weight_B, ALPHA / 4, mask, P)
        wrong = reference_lora_update(base(x), x, weight_A, weight_B, ALPHA / 4, other, P)
        assert_equivalent({"out": out}, {"out": want}, FP32_TOL, [{"out": wrong}])


def test_a_new_tensor_an_in_place_change_or_another_p_draws_a_new_mask():
    x = torch.randn(10, IN)
    with shared_dropout_scope():
        mask = _dropout_keep_mask(x, P)
        assert _dropout_keep_mask(x, P) is mask
        same_values = x.clone()
        assert not torch.equal(_dropout_keep_mask(same_values, P), mask)  # another tensor, equal values
        assert _dropout_keep_mask(x.view(10, IN), P) is not mask  # a view is another tensor too
        assert _dropout_keep_mask(x, 0.2) is not mask
        fresh = _dropout_keep_mask(x, P)  # the 0.2 draw replaced x's entry
        assert fresh is not mask
        with torch.no_grad():
            x.mul_(1.0)  # same values, version bumped
        bumped = _dropout_keep_mask(x, P)
        assert bumped is not fresh and not torch.equal(bumped, fresh)
        assert _dropout_keep_mask(x, P) is bumped


def test_a_cached_mask_is_not_served_to_a_tensor_that_reuses_a_dead_tensors_id():
    masks = SharedMasks()
    x, y = torch.randn(4, 4), torch.randn(4, 4)
    masks.put(x, P, torch.ones(4, 4, dtype=torch.bool))
    assert masks.get(x, P) is not None
    # what id reuse looks like: y's id maps to an entry recorded for another tensor
    masks._masks[id(y)] = masks._masks.pop(id(x))
    assert masks.get(y, P) is None
    masks._masks[id(y)] = (weakref.ref(x), y._version, P, torch.ones(4, 4, dtype=torch.bool))
    assert masks.get(y, P) is None


def test_outside_a_scope_nothing_is_shared():
    x, _ = _inputs()
    first, second = _dropout_keep_mask(x, P), _dropout_keep_mask(x, P)
    assert first is not second and not torch.equal(first, second)
    weight_A, weight_B = torch.randn(4, IN), torch.randn(OUT, 4)
    base = torch.zeros(2, 5, OUT)
    outs = [lora_update_(base.clone(), x, weight_A, weight_B, 2.0, 0.1, training=True) for _ in range(2)]
    assert rel_diff(outs[0], outs[1]) > FP32_TOL
    with shared_dropout_scope():  # the same calls inside a scope: one mask, equal outputs
        outs = [lora_update_(base.clone(), x, weight_A, weight_B, 2.0, 0.1, training=True) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_nested_scopes_have_their_own_masks():
    x = torch.randn(10, IN)
    with shared_dropout_scope():
        outer = _dropout_keep_mask(x, P)
        with shared_dropout_scope():
            inner = _dropout_keep_mask(x, P)
            assert inner is not outer and _dropout_keep_mask(x, P) is inner
        assert _dropout_keep_mask(x, P) is outer


def test_threads_with_their_own_scopes_do_not_see_each_others_masks():
    x = torch.randn(64, IN)  # one tensor, used by both threads and the main thread
    barrier = threading.Barrier(2)
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def worker(name: str) -> None:
        try:
            with shared_dropout_scope():
                first = _dropout_keep_mask(x, P)
                barrier.wait(timeout=30)  # both threads now hold a mask for x in their scopes
                again = _dropout_keep_mask(x, P)
                barrier.wait(timeout=30)
            results[name] = (first, again)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    with shared_dropout_scope():
        main = _dropout_keep_mask(x, P)
        threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert _dropout_keep_mask(x, P) is main
    assert not errors, errors
    (a_first, a_again), (b_first, b_again) = results["a"], results["b"]
    assert a_again is a_first and b_again is b_first  # each thread reuses its own mask
    assert not torch.equal(a_first, b_first)  # and never the other thread's
    assert not torch.equal(a_first, main) and not torch.equal(b_first, main)

"""The fused LoRA update and the mixed-adapter batch against the straightforward formulas."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import Linear
from lorakit.lora_ops import _draw_keep_mask, effective_dropout, lora_update_, shared_dropout_scope
from tests.conftest import LLAMA_PROJECTIONS, tiny_llama


def _reference(base_out, x, A, B, scaling, scale_mask=None):
    xd = x if scale_mask is None else x * scale_mask.view_as(x)
    return base_out + scaling * (xd @ A.T) @ B.T


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_update_and_its_gradients_equal_the_formula(p):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, requires_grad=True)
    W = torch.randn(7, 6)
    A = torch.randn(3, 6, requires_grad=True)
    B = torch.randn(7, 3, requires_grad=True)
    upstream = torch.randn(2, 5, 7)

    torch.manual_seed(42)
    out = lora_update_(x @ W.T, x, A, B, 1.5, p, training=True)
    (out * upstream).sum().backward()
    fused = [out.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()]
    for t in (x, A, B):
        t.grad = None

    torch.manual_seed(42)  # the same draw as inside lora_update_
    mask = None
    if p > 0:
        mask = _draw_keep_mask(x.shape, effective_dropout(p), x.device) / (1 - effective_dropout(p))
        assert 0.15 < (mask == 0).float().mean() < 0.45  # about p of the inputs dropped
    ref = _reference(x @ W.T, x, A, B, 1.5, mask)
    (ref * upstream).sum().backward()
    for got, want in zip(fused, [ref.detach(), x.grad, A.grad, B.grad]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_keep_mask_is_bernoulli_with_the_requested_rate(p):
    torch.manual_seed(0)
    count = 1_000_003  # not a multiple of 4: the tail of the last random word is cut off
    mask = _draw_keep_mask(torch.Size((count,)), effective_dropout(p), torch.device("cpu"))
    assert mask.dtype == torch.bool and mask.shape == (count,)
    assert abs(effective_dropout(p) - p) <= 0.5 / 65536
    sigma = (p * (1 - p) / count) ** 0.5
    assert abs((~mask).float().mean().item() - p) < 5 * sigma
    # neighbouring elements (bits of the same random word) are independent
    pairs = mask[: count - 1 : 2] & mask[1::2]
    assert abs(pairs.float().mean().item() - (1 - p) ** 2) < 5 * (p * (2 - p) / (count / 2)) ** 0.5
    torch.manual_seed(0)
    again = _draw_keep_mask(torch.Size((count,)), effective_dropout(p), torch.device("cpu"))
    assert torch.equal(mask, again)  # seeded by the global generator: runs are reproducible


def test_dropped_input_is_not_stored_for_backward():
    """q, k and v share their input: the graph keeps that input once, not one dropped copy per adapter."""
    torch.manual_seed(0)
    tokens, width, r = 64, 32, 4
    layers = []
    for _ in range(3):
        layer = Linear(nn.Linear(width, width))
        layer.update_layer("default", r, 8, 0.1, True)
        layer.base_layer.requires_grad_(False)
        layers.append(layer.train())
    x = torch.randn(tokens, width, requires_grad=True)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = [layer(x) for layer in layers]
    parameters = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    activation_bytes = sum(nbytes for ptr, nbytes in saved.items() if ptr not in parameters)
    # x once (tokens*width floats) and each adapter's h (tokens*r floats) and keep-mask (tokens*width bytes);
    # PEFT keeps a dropped float copy of x per adapter on top
    assert activation_bytes == 4 * (tokens * width + 3 * tokens * r) + 3 * tokens * width
    # inside the scope LoraModel opens around each forward, the three share one mask (one random draw)
    saved.clear()
    with shared_dropout_scope(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = [layer(x) for layer in layers]
    activation_bytes = sum(nbytes for ptr, nbytes in saved.items() if ptr not in parameters)
    assert activation_bytes == 4 * (tokens * width + 3 * tokens * r) + tokens * width
    sum(o.sum() for o in outputs).backward()
    assert all(layer.lora_A["default"].weight.grad is not None for layer in layers)


def test_bf16_base_with_fp32_adapter():
    torch.manual_seed(0)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    A, B = torch.randn(2, 8), torch.randn(8, 2)
    base = torch.randn(4, 8, dtype=torch.bfloat16)
    out = lora_update_(base.clone(), x, A, B, 0.5)
    torch.testing.assert_close(
        out, _reference(base.float(), x.float(), A, B, 0.5).bfloat16(), atol=0.05, rtol=0.02
    )


def _llama_with_adapters(tmp_path, n_adapters=4):
    """PEFT makes n random adapters and saves them; the same files load into lorakit."""
    theirs = None
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        config = peft.LoraConfig(
            target_modules=LLAMA_PROJECTIONS + ["embed_tokens"], r=2 + 2 * i, init_lora_weights=False
        )
        if theirs is None:
            theirs = peft.get_peft_model(tiny_llama(), config, adapter_name=f"a{i}")
        else:
            theirs.add_adapter(f"a{i}", config)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a0", adapter_name="a0")
    for i in range(1, n_adapters):
        ours.load_adapter(tmp_path / f"a{i}", adapter_name=f"a{i}")
    return ours.eval(), theirs.eval()


def test_mixed_adapter_batch_equals_one_adapter_at_a_time_and_peft(tmp_path):
    ours, theirs = _llama_with_adapters(tmp_path)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (8, 10), generator=generator)
    rows = ["a0", "a1", "__base__", "a3", "a2", "a0", "a3", "__base__"]
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=rows).logits
        for i, name in enumerate(rows):
            if name == "__base__":
                with ours.disable_adapter():
                    expected = ours(input_ids=ids[i : i + 1]).logits
            else:
                ours.set_adapter(name)
                expected = ours(input_ids=ids[i : i + 1]).logits
            torch.testing.assert_close(mixed[i : i + 1], expected, atol=1e-5, rtol=0)
        peft_mixed = theirs(input_ids=ids, adapter_names=rows).logits
    torch.testing.assert_close(mixed, peft_mixed, atol=1e-5, rtol=0)


def test_mixed_batch_errors(tmp_path):
    ours, _ = _llama_with_adapters(tmp_path, n_adapters=2)
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="Unknown adapter.*'zz'"):
        ours(input_ids=ids, adapter_names=["a0", "zz"])
    with pytest.raises(ValueError, match="3 entries but the batch has 2 rows"):
        ours(input_ids=ids, adapter_names=["a0", "a1", "a0"])
    ours.train()
    with pytest.raises(ValueError, match="for inference"):
        ours(input_ids=ids, adapter_names=["a0", "a1"])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_runs_the_low_rank_path_in_the_autocast_dtype(dtype):
    torch.manual_seed(0)
    layer = Linear(nn.Linear(16, 16))
    layer.update_layer("default", 4, 8, 0.0, False)
    x = torch.randn(2, 5, 16, requires_grad=True)
    reference = layer(x)
    reference.square().sum().backward()
    want = [
        x.grad.clone(),
        layer.lora_A["default"].weight.grad.clone(),
        layer.lora_B["default"].weight.grad.clone(),
    ]
    layer.zero_grad()
    x.grad = None
    with torch.autocast("cpu", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32  # adapter weights and grads stay fp32
    got = [x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.03)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0.2, rtol=0.05)


def test_mixed_batch_sees_in_place_weight_changes(tmp_path):
    """An in-place weight change between two mixed batches shows in the second (nothing stale is kept)."""
    ours, _ = _llama_with_adapters(tmp_path, n_adapters=2)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    rows = ["a0", "a1"]
    with torch.inference_mode():
        before = ours(input_ids=ids, adapter_names=rows).logits.clone()
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["a1"].weight.mul_(3.0)
        after = ours(input_ids=ids, adapter_names=rows).logits
        ours.set_adapter("a1")
        expected = ours(input_ids=ids[1:]).logits
    assert (after[1] - before[1]).abs().max() > 1e-3  # the change is visible ...
    torch.testing.assert_close(after[1:], expected, atol=1e-5, rtol=0)  # ... and exactly the new adapter's
    torch.testing.assert_close(after[:1], before[:1], atol=1e-5, rtol=0)  # row 0 (a0) is untouched


def test_mixed_batch_with_grad_enabled_back_propagates_to_each_rows_adapter(tmp_path):
    """Gradients of a mixed batch equal those of running each row with its own adapter."""
    ours, _ = _llama_with_adapters(tmp_path, n_adapters=3)
    ids = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(2))
    rows = ["a2", "__base__", "a0"]
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    for param in ours.parameters():
        param.requires_grad_(False)
    for name in ("a0", "a2"):
        q_proj.lora_A[name].weight.requires_grad_(True)
    ours(input_ids=ids, adapter_names=rows).logits.sum().backward()
    mixed = {n: q_proj.lora_A[n].weight.grad.clone() for n in ("a0", "a2")}
    assert q_proj.lora_A["a1"].weight.grad is None  # no row used a1: not in the graph at all
    for index, name in ((0, "a2"), (2, "a0")):
        q_proj.lora_A[name].weight.grad = None
        ours.set_adapter(name)
        for param in ours.parameters():
            param.requires_grad_(False)
        q_proj.lora_A[name].weight.requires_grad_(True)
        ours(input_ids=ids[index : index + 1]).logits.sum().backward()
        assert mixed[name].abs().sum() > 0
        torch.testing.assert_close(mixed[name], q_proj.lora_A[name].weight.grad, rtol=1e-4, atol=1e-5)


def test_mixed_batch_under_autocast_and_with_a_bf16_base(tmp_path):
    """bf16 compute (autocast) and a bf16 base with fp32 adapters both match one adapter at a time."""
    ids = torch.randint(0, 128, (4, 6), generator=torch.Generator().manual_seed(3))
    rows = ["a1", "a0", "__base__", "a1"]

    def per_row(model):
        out = []
        for index, name in enumerate(rows):
            if name == "__base__":
                with model.disable_adapter():
                    out.append(model(input_ids=ids[index : index + 1]).logits)
            else:
                model.set_adapter(name)
                out.append(model(input_ids=ids[index : index + 1]).logits)
        return torch.cat(out).float()

    ours, _ = _llama_with_adapters(tmp_path / "autocast", n_adapters=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = ours(input_ids=ids, adapter_names=rows).logits.float()
        expected = per_row(ours)
    torch.testing.assert_close(mixed, expected, atol=0.05, rtol=0.02)

    ours, _ = _llama_with_adapters(tmp_path / "bf16", n_adapters=2)
    ours.base_model.model.to(torch.bfloat16)  # base weights bf16, the result of each base layer bf16
    for name, param in ours.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # adapters stay fp32 (the fallback, out-of-place branch)
    with torch.no_grad():
        mixed = ours(input_ids=ids, adapter_names=rows).logits.float()
        expected = per_row(ours)
    torch.testing.assert_close(mixed, expected, atol=0.05, rtol=0.02)

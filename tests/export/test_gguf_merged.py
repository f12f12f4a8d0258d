"""``export_gguf_merged``: base GGUF + adapter merged, read back and loaded again.

Adapted tensors must equal ``W + s B A`` in GGUF row order (within the output dtype's rounding); every other tensor
and every metadata key must be the base's, byte for byte. The merged tiny GGUF loaded by transformers (which undoes
llama's q/k permutation) must give lorakit's PeftModel logits: LoRA, rsLoRA, DoRA and AdaLoRA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit import AdaLoraConfig, LoraConfig
from lorakit.export import export_gguf_merged
from lorakit.export.base import permute_rows, unpermute_rows
from lorakit.models import load_model
from lorakit.models.embedded import embedded_gguf_path
from tests.export.helpers import (
    TINY_TARGETS,
    dequantized,
    fields,
    gguf_name,
    gguf_reader,
    save,
    smollm2_factors,
    tensors,
    tiny_base,
    tiny_peft,
    write_adapter,
)

SMOLLM2_MODULES = {
    "model.layers.0.self_attn.q_proj": (576, 576),
    "model.layers.0.self_attn.k_proj": (192, 576),
    "model.layers.3.self_attn.v_proj": (192, 576),
    "model.layers.5.mlp.down_proj": (576, 1536),
}


def _assert_same_except(base_path, merged_path, replaced: set[str]):
    base, merged = gguf_reader(base_path), gguf_reader(merged_path)
    assert fields(merged) == fields(base)
    assert [t.name for t in merged.tensors] == [t.name for t in base.tensors]
    base_tensors = tensors(base)
    for tensor in merged.tensors:
        if tensor.name in replaced:
            continue
        original = base_tensors[tensor.name]
        assert tensor.tensor_type == original.tensor_type, tensor.name
        assert np.array_equal(tensor.data.view(np.uint8), original.data.view(np.uint8)), tensor.name


@pytest.mark.parametrize(
    "config",
    [
        LoraConfig(r=4, lora_alpha=8, target_modules=TINY_TARGETS, init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=6, use_rslora=True, target_modules=TINY_TARGETS, init_lora_weights=False),
        LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=TINY_TARGETS, init_lora_weights=False),
        AdaLoraConfig(init_r=6, target_r=4, total_step=10, lora_alpha=8, target_modules=TINY_TARGETS),
    ],
    ids=["lora", "rslora", "dora", "adalora"],
)
def test_tiny_merged_gguf_gives_peft_model_logits(tmp_path, config):
    base = tiny_base(tmp_path)
    peft = tiny_peft(base, config, scale=0.3, magnitude_noise=0.5)
    folder = save(peft, tmp_path / "adapter")
    report = export_gguf_merged(folder, tmp_path / "merged.gguf")
    assert len(report.tensors) == 2 * len(TINY_TARGETS)
    _assert_same_except(base, tmp_path / "merged.gguf", set(report.tensors))
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        base_logits = load_model(str(base), cache_dir=tmp_path / "cache")(input_ids=ids).logits
        got = load_model(str(tmp_path / "merged.gguf"), cache_dir=tmp_path / "cache")(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize("outtype, atol", [("f32", 1e-6), ("f16", 2e-3)])
def test_quantized_base_merged_tensors_and_byte_identical_rest(tmp_path, outtype, atol):
    """The embedded Q4_1 SmolLM2: merged tensors = dequant(W) + permuted s B A, the rest (Q4_1, Q8_0, F32) as is."""
    factors = smollm2_factors(SMOLLM2_MODULES, rank=8)
    folder = write_adapter(tmp_path / "adapter", factors, r=8, lora_alpha=16)
    report = export_gguf_merged(folder, tmp_path / "merged.gguf", outtype=outtype)
    names = {gguf_name(module): module for module in SMOLLM2_MODULES}
    assert set(report.tensors) == set(names)
    _assert_same_except(embedded_gguf_path(), tmp_path / "merged.gguf", set(names))
    base, merged = tensors(gguf_reader(embedded_gguf_path())), tensors(gguf_reader(tmp_path / "merged.gguf"))
    for tensor, module in names.items():
        assert base[tensor].tensor_type.name == "Q4_1"
        assert merged[tensor].tensor_type.name == outtype.upper()
        assert list(merged[tensor].shape) == list(base[tensor].shape)
        a = factors[f"base_model.model.{module}.lora_A.weight"].astype(np.float64)
        b = factors[f"base_model.model.{module}.lora_B.weight"].astype(np.float64)
        delta = 16 / 8 * b @ a
        heads = 9 if "attn_q" in tensor else 3 if "attn_k" in tensor else None
        if heads:
            delta = permute_rows(delta, heads)
        expected = dequantized(base[tensor]) + delta
        np.testing.assert_allclose(merged[tensor].data.astype(np.float64), expected, rtol=0, atol=atol)


def test_gguf_q_k_rows_are_hf_rows_permuted():
    """The base GGUF's attn_q / attn_k, un-permuted, are the weights lorakit trains on (transformers' load)."""
    from tests.models.real_smollm2 import converted

    model = converted()[1]
    state = model.state_dict()
    base = tensors(gguf_reader(embedded_gguf_path()))
    for layer in (0, 17):
        for proj, tensor, heads in (
            ("q_proj", "attn_q", 9),
            ("k_proj", "attn_k", 3),
            ("v_proj", "attn_v", None),
        ):
            weight = dequantized(base[f"blk.{layer}.{tensor}.weight"])
            if heads:
                weight = unpermute_rows(weight, heads)
            hf = state[f"model.layers.{layer}.self_attn.{proj}.weight"].double().numpy()
            np.testing.assert_array_equal(weight, hf)


def test_untied_embedding_and_head_merged(tmp_path):
    from tests.export.helpers import untied_tiny_base

    base = untied_tiny_base(tmp_path)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "k_proj"], init_lora_weights=False
    )
    peft = tiny_peft(base, config, scale=0.3, untied=True)
    folder = save(peft, tmp_path / "adapter")
    report = export_gguf_merged(folder, tmp_path / "merged.gguf")
    assert set(report.tensors) == {
        "token_embd.weight",
        "output.weight",
        "blk.0.attn_k.weight",
        "blk.1.attn_k.weight",
    }
    _assert_same_except(base, tmp_path / "merged.gguf", set(report.tensors))
    ids = torch.randint(0, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        got = load_model(str(tmp_path / "merged.gguf"), cache_dir=tmp_path / "cache")(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)

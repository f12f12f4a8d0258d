"""``export_gguf_adapter``: the LoRA GGUF read back with gguf.GGUFReader, checked against the adapter and against
lorakit's own merge through llama.cpp's formula ``W + (alpha / r) lora_b @ lora_a``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lorakit import LoraConfig
from lorakit.export import export_gguf_adapter
from lorakit.export.base import permute_rows, unpermute_rows
from lorakit.models.embedded import embedded_gguf_path
from tests.export.helpers import (
    TINY_HEADS,
    TINY_KV_HEADS,
    TINY_TARGETS,
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

LAYERS = 2


def _heads(tensor: str) -> int | None:
    return TINY_HEADS if "attn_q" in tensor else TINY_KV_HEADS if "attn_k" in tensor else None


def _llama_cpp_weight(base: dict, adapter: dict, tensor: str, alpha: float) -> np.ndarray:
    """What llama.cpp computes with: the base GGUF weight plus (alpha / r) lora_b @ lora_a, r = lora_b's rank."""
    a = adapter[f"{tensor}.lora_a"].data.astype(np.float64)
    b = adapter[f"{tensor}.lora_b"].data.astype(np.float64)
    rank = adapter[f"{tensor}.lora_b"].shape[0]  # ne[0] of lora_b
    return base[tensor].data.astype(np.float64) + alpha / rank * (b @ a)


def _hf_weight_in_gguf_order(merged_state: dict, module: str, tensor: str) -> np.ndarray:
    weight = merged_state[f"{module}.weight"].double().numpy()
    heads = _heads(tensor)
    return weight if heads is None else permute_rows(weight, heads)


def _modules():
    for layer in range(LAYERS):
        for target in TINY_TARGETS:
            group = "self_attn" if target.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            yield f"model.layers.{layer}.{group}.{target}"


def test_metadata_names_shapes_and_values(tmp_path):
    base = tiny_base(tmp_path)
    peft = tiny_peft(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=TINY_TARGETS, init_lora_weights=False)
    )
    folder = save(peft, tmp_path / "adapter")
    report = export_gguf_adapter(folder, tmp_path / "adapter.gguf")
    reader = gguf_reader(tmp_path / "adapter.gguf")
    meta = fields(reader)
    assert meta["general.architecture"] == "llama"
    assert meta["general.type"] == "adapter"
    assert meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0
    assert report.alpha == 8.0
    written = tensors(reader)
    expected = {f"{gguf_name(m)}.lora_{ab}" for m in _modules() for ab in "ab"}
    assert set(written) == expected
    state = {k: v.detach().double().numpy() for k, v in peft.state_dict().items()}
    for module in _modules():
        tensor = gguf_name(module)
        a, b = (
            state[f"base_model.model.{module}.lora_A.default.weight"],
            state[f"base_model.model.{module}.lora_B.default.weight"],
        )
        lora_a, lora_b = written[f"{tensor}.lora_a"], written[f"{tensor}.lora_b"]
        # GGUF lists dims reversed: lora_a ne = [in, r] (numpy (r, in)), lora_b ne = [r, out] (numpy (out, r))
        assert list(lora_a.shape) == [a.shape[1], 4] and lora_a.data.shape == a.shape
        assert list(lora_b.shape) == [4, b.shape[0]] and lora_b.data.shape == b.shape
        assert lora_a.tensor_type.name == "F32" and lora_b.tensor_type.name == "F32"
        np.testing.assert_array_equal(lora_a.data, a.astype(np.float32))
        heads = _heads(tensor)
        if heads is None:
            np.testing.assert_array_equal(lora_b.data, b.astype(np.float32))
        else:  # rows permuted as llama.cpp stores attn_q / attn_k
            np.testing.assert_array_equal(lora_b.data, permute_rows(b, heads).astype(np.float32))
            assert not np.array_equal(lora_b.data, b.astype(np.float32))
            np.testing.assert_array_equal(unpermute_rows(lora_b.data, heads), b.astype(np.float32))


@pytest.mark.parametrize(
    "settings",
    [
        dict(r=4, lora_alpha=8),
        dict(r=4, lora_alpha=6, use_rslora=True),
        dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
        dict(r=4, lora_alpha=8, rank_pattern={"up_proj": 6}, alpha_pattern={"k_proj": 2}),
    ],
    ids=["lora", "rslora", "rslora-patterns", "lora-patterns"],
)
def test_llama_cpp_formula_gives_lorakit_merge(tmp_path, settings):
    """W_gguf + (alpha / r) lora_b lora_a, as llama.cpp computes, equals lorakit's merged weight (GGUF row order)."""
    base = tiny_base(tmp_path)
    config = LoraConfig(target_modules=TINY_TARGETS, init_lora_weights=False, **settings)
    peft = tiny_peft(base, config, scale=0.3)
    folder = save(peft, tmp_path / "adapter")
    report = export_gguf_adapter(folder, tmp_path / "adapter.gguf")
    merged = peft.merge_and_unload().state_dict()
    adapter, base_tensors = tensors(gguf_reader(tmp_path / "adapter.gguf")), tensors(gguf_reader(base))
    alpha = fields(gguf_reader(tmp_path / "adapter.gguf"))["adapter.lora.alpha"]
    r, lora_alpha = settings["r"], settings["lora_alpha"]
    assert alpha == pytest.approx(lora_alpha * math.sqrt(r) if settings.get("use_rslora") else lora_alpha)
    for module in _modules():
        tensor = gguf_name(module)
        ours = _llama_cpp_weight(base_tensors, adapter, tensor, alpha)
        np.testing.assert_allclose(ours, _hf_weight_in_gguf_order(merged, module, tensor), rtol=0, atol=2e-5)
    folded = [note for note in report.notes if "folded into lora_b" in note]
    assert bool(folded) == bool(
        settings.get("rank_pattern") and settings.get("use_rslora") or settings.get("alpha_pattern")
    )


def test_f16_outtype(tmp_path):
    base = tiny_base(tmp_path)
    peft = tiny_peft(base, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], init_lora_weights=False))
    folder = save(peft, tmp_path / "adapter")
    export_gguf_adapter(folder, tmp_path / "adapter.gguf", outtype="f16")
    written = tensors(gguf_reader(tmp_path / "adapter.gguf"))
    a = peft.state_dict()["base_model.model.model.layers.0.self_attn.v_proj.lora_A.default.weight"].numpy()
    lora_a = written["blk.0.attn_v.weight.lora_a"]
    assert lora_a.tensor_type.name == "F16" and lora_a.data.dtype == np.float16
    np.testing.assert_array_equal(lora_a.data, a.astype(np.float16))
    assert fields(gguf_reader(tmp_path / "adapter.gguf"))["general.file_type"] == 1  # MOSTLY_F16


def test_embedded_smollm2_names_and_shapes(tmp_path):
    """An adapter recorded on the embedded SmolLM2 maps onto the names and shapes of its Q4_1 GGUF (no model load)."""
    modules = {
        "model.layers.0.self_attn.q_proj": (576, 576),
        "model.layers.29.self_attn.k_proj": (192, 576),
        "model.layers.5.mlp.down_proj": (576, 1536),
        "model.layers.7.mlp.gate_proj": (1536, 576),
    }
    factors = smollm2_factors(modules)
    folder = write_adapter(tmp_path / "adapter", factors, r=8, lora_alpha=16)
    export_gguf_adapter(folder, tmp_path / "adapter.gguf")
    written = tensors(gguf_reader(tmp_path / "adapter.gguf"))
    assert set(written) == {
        f"{name}.lora_{ab}"
        for name in (
            "blk.0.attn_q.weight",
            "blk.29.attn_k.weight",
            "blk.5.ffn_down.weight",
            "blk.7.ffn_gate.weight",
        )
        for ab in "ab"
    }
    base = tensors(gguf_reader(embedded_gguf_path()))
    for module, (out, inp) in modules.items():
        tensor = gguf_name(module)
        assert list(base[tensor].shape) == [inp, out]  # the base's ne
        assert list(written[f"{tensor}.lora_a"].shape) == [inp, 8]
        assert list(written[f"{tensor}.lora_b"].shape) == [8, out]
    q_b = factors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(written["blk.0.attn_q.weight.lora_b"].data, permute_rows(q_b, 9))
    k_b = factors["base_model.model.model.layers.29.self_attn.k_proj.lora_B.weight"]
    np.testing.assert_array_equal(written["blk.29.attn_k.weight.lora_b"].data, permute_rows(k_b, 3))


def test_permutation_round_trip():
    rows = np.arange(24 * 3).reshape(24, 3)
    for heads in (1, 2, 3, 6):
        assert np.array_equal(unpermute_rows(permute_rows(rows, heads), heads), rows)
    # head dim 4: rows (0, 1 | 2, 3) -> interleaved halves (0, 2, 1, 3)
    assert permute_rows(np.arange(8), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_embedding_and_output_head_on_an_untied_base(tmp_path):
    """token_embd's pair is stored as llama.cpp's llm_build_inp_embd reads it: lora_a = A^T (num_embeddings, r),
    rows gathered by token id, lora_b = B (dim, r); the output head's pair as any Linear's."""
    from tests.export.helpers import untied_tiny_base

    base = untied_tiny_base(tmp_path)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"], init_lora_weights=False
    )
    peft = tiny_peft(base, config, scale=0.3, untied=True)
    folder = save(peft, tmp_path / "adapter")
    export_gguf_adapter(folder, tmp_path / "adapter.gguf")
    state = {k: v.detach().double().numpy() for k, v in peft.state_dict().items()}
    merged = peft.merge_and_unload().state_dict()
    adapter, base_tensors = tensors(gguf_reader(tmp_path / "adapter.gguf")), tensors(gguf_reader(base))
    a = state["base_model.model.model.embed_tokens.lora_embedding_A.default"]
    b = state["base_model.model.model.embed_tokens.lora_embedding_B.default"]
    lora_a, lora_b = adapter["token_embd.weight.lora_a"], adapter["token_embd.weight.lora_b"]
    np.testing.assert_array_equal(lora_a.data, a.T.astype(np.float32))
    np.testing.assert_array_equal(lora_b.data, b.astype(np.float32))
    rank = lora_b.shape[0]  # llama.cpp's r: lora_b's ne[0]
    assert rank == 4 and list(base_tensors["token_embd.weight"].shape) == [lora_b.shape[1], lora_a.shape[1]]
    # embedding of token t: E[t] + (alpha / r) lora_b @ lora_a[t]
    ours = base_tensors["token_embd.weight"].data + 8 / rank * (
        lora_a.data.astype(np.float64) @ lora_b.data.T
    )
    np.testing.assert_allclose(ours, merged["model.embed_tokens.weight"].double().numpy(), rtol=0, atol=2e-5)
    head = _llama_cpp_weight(base_tensors, adapter, "output.weight", 8.0)
    np.testing.assert_allclose(head, merged["lm_head.weight"].double().numpy(), rtol=0, atol=2e-5)

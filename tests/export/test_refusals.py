"""What a llama.cpp LoRA GGUF (or a merged GGUF) cannot hold is refused with the reason and a way out."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lorakit import AdaLoraConfig, AdapterConfig, LoraConfig
from lorakit.export import ExportError, export_gguf_adapter, export_gguf_merged
from tests.export.helpers import save, smollm2_factors, tiny_base, tiny_peft, write_adapter
from tests.models.gguf_builder import tiny_llama


@pytest.fixture
def base(tmp_path):
    return tiny_base(tmp_path)


def _adapter(base, tmp_path, config, **kwargs):
    return save(tiny_peft(base, config, scale=0.1, **kwargs), tmp_path / "adapter")


def test_dora_adapter_is_refused_and_points_to_merged(base, tmp_path):
    folder = _adapter(base, tmp_path, LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ExportError, match=r"DoRA.*magnitude.*--merged"):
        export_gguf_adapter(folder, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()
    export_gguf_merged(folder, tmp_path / "merged.gguf")  # representable once merged


def test_adalora_adapter_is_refused_with_the_conversion(base, tmp_path):
    folder = _adapter(
        base, tmp_path, AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=["q_proj"])
    )
    with pytest.raises(ExportError, match=r"AdaLoRA.*diag\(E\).*--merged.*A' = diag\(E\) A.*lora_alpha'"):
        export_gguf_adapter(folder, tmp_path / "out.gguf")


def test_bottleneck_adapter_is_refused(base, tmp_path):
    folder = _adapter(base, tmp_path, AdapterConfig(target_modules=["o_proj"], bottleneck_size=4))
    for export in (export_gguf_adapter, export_gguf_merged):
        with pytest.raises(ExportError, match="bottleneck adapter"):
            export(folder, tmp_path / "out.gguf")


def test_modules_to_save_is_refused(base, tmp_path):
    folder = _adapter(base, tmp_path, LoraConfig(target_modules=["q_proj"], modules_to_save=["model.norm"]))
    for export in (export_gguf_adapter, export_gguf_merged):
        with pytest.raises(ExportError, match="modules_to_save"):
            export(folder, tmp_path / "out.gguf")


def test_trained_biases_are_refused(tmp_path):
    tensors = smollm2_factors({"model.layers.0.self_attn.v_proj": (192, 576)})
    tensors["base_model.model.model.layers.0.self_attn.v_proj.bias"] = np.zeros(192, np.float32)
    folder = write_adapter(tmp_path / "adapter", tensors, bias="lora_only")
    with pytest.raises(ExportError, match="trains biases"):
        export_gguf_adapter(folder, tmp_path / "out.gguf")


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_lora_on_tied_embeddings_is_refused(base, tmp_path, target):
    folder = _adapter(base, tmp_path, LoraConfig(target_modules=[target, "q_proj"]))
    with pytest.raises(ExportError, match="tied|ties"):
        export_gguf_adapter(folder, tmp_path / "out.gguf")
    with pytest.raises(ExportError, match="tied|ties"):
        export_gguf_merged(folder, tmp_path / "out.gguf")


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_2"])
def test_residual_inits_are_refused_with_the_conversion(tmp_path, init):
    folder = write_adapter(
        tmp_path / "adapter",
        smollm2_factors({"model.layers.0.mlp.up_proj": (1536, 576)}),
        init_lora_weights=init,
    )
    with pytest.raises(ExportError, match="path_initial_model_for_weight_conversion"):
        export_gguf_adapter(folder, tmp_path / "out.gguf")


def test_loftq_is_refused(tmp_path):
    folder = write_adapter(
        tmp_path / "adapter",
        smollm2_factors({"model.layers.0.mlp.up_proj": (1536, 576)}),
        init_lora_weights="loftq",
    )
    with pytest.raises(ExportError, match="LoftQ"):
        export_gguf_merged(folder, tmp_path / "out.gguf")


def test_hugging_face_base_for_merged_explains_the_two_steps(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "hf-base")
    folder = save(
        tiny_peft(tmp_path / "hf-base", LoraConfig(target_modules=["v_proj"]), scale=0.1),
        tmp_path / "adapter",
    )
    with pytest.raises(ExportError, match=r"lorakit merge.*convert_hf_to_gguf\.py"):
        export_gguf_merged(folder, tmp_path / "out.gguf")
    # the adapter GGUF needs only the base's config
    report = export_gguf_adapter(folder, tmp_path / "adapter.gguf")
    assert report.arch == "llama" and "blk.0.attn_v.weight" in report.tensors


def test_adapter_from_another_base_is_refused(tmp_path):
    """A tiny-model adapter against the embedded SmolLM2: the shapes do not fit."""
    base = tiny_base(tmp_path)
    folder = _adapter(base, tmp_path, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ExportError, match="another base model"):
        export_gguf_adapter(folder, tmp_path / "out.gguf", model="smollm2")


def test_unsupported_architecture_is_refused(tmp_path):
    from tests.conftest import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    folder = write_adapter(
        tmp_path / "adapter",
        smollm2_factors({"transformer.h.0.attn.c_attn": (96, 32)}),
        base_model_name_or_path=str(tmp_path / "gpt2"),
    )
    with pytest.raises(ExportError, match="architecture 'gpt2'"):
        export_gguf_adapter(folder, tmp_path / "out.gguf")


def test_existing_output_needs_force(base, tmp_path):
    folder = _adapter(base, tmp_path, LoraConfig(target_modules=["q_proj"]))
    (tmp_path / "out.gguf").write_bytes(b"old")
    with pytest.raises(ExportError, match="--force"):
        export_gguf_adapter(folder, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == b"old"
    export_gguf_adapter(folder, tmp_path / "out.gguf", force=True)
    assert (tmp_path / "out.gguf").read_bytes()[:4] == b"GGUF"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_not_an_adapter_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="adapter_config.json"):
        export_gguf_adapter(tmp_path / "empty", tmp_path / "out.gguf")
    config = json.dumps({"peft_type": "LORA"})
    (tmp_path / "nested" / "one").mkdir(parents=True)
    (tmp_path / "nested" / "one" / "adapter_config.json").write_text(config)
    with pytest.raises(ExportError, match="sub-folders: one"):
        export_gguf_adapter(tmp_path / "nested", tmp_path / "out.gguf")

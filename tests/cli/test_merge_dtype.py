"""``lorakit merge`` keeps the base model's stored dtype by default (``--precision auto``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.models.loading import stored_dtype

from ..train.helpers import tiny_llama, tiny_tokenizer


def _saved_dtypes(folder: Path) -> set[torch.dtype]:
    dtypes = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            dtypes |= {handle.get_tensor(key).dtype for key in handle.keys()}
    return dtypes


@pytest.fixture(scope="module")
def bf16_assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama saved in bf16 and a non-trivial LoRA adapter for it."""
    root = tmp_path_factory.mktemp("merge-dtype")
    tiny_llama(seed=0).to(torch.bfloat16).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    torch.manual_seed(5)
    base = AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(root / "adapter")
    return {"model": root / "model", "adapter": root / "adapter"}


def test_stored_dtype_reads_the_safetensors_headers(bf16_assets, tmp_path) -> None:
    assert _saved_dtypes(bf16_assets["model"]) == {torch.bfloat16}
    assert stored_dtype(str(bf16_assets["model"])) == torch.bfloat16
    tiny_llama(seed=0).save_pretrained(tmp_path / "fp32")
    assert stored_dtype(str(tmp_path / "fp32")) == torch.float32


def test_merge_keeps_bf16_by_default(bf16_assets, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(bf16_assets["adapter"]), "--output_dir", str(out)]) == 0
    assert "(bfloat16)" in capsys.readouterr().out
    assert _saved_dtypes(out) == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    # The merge is done in fp32 and rounded once: W' = bf16(W + (alpha/r) B A).
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bf16_assets["model"], dtype=torch.float32),
        bf16_assets["adapter"],
    )
    expected = adapted.merge_and_unload().model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.model.layers[0].self_attn.q_proj.weight, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("flag", "dtype"), [("fp32", torch.float32), ("fp16", torch.float16)])
def test_explicit_precision_wins(bf16_assets, tmp_path, flag: str, dtype: torch.dtype) -> None:
    out = tmp_path / flag
    assert main(["merge", "--adapter", str(bf16_assets["adapter"]), "--out", str(out), "--dtype", flag]) == 0
    assert _saved_dtypes(out) == {dtype}

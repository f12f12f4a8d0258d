"""Side by side with Hugging Face PEFT: files written by one library load in the other with equal logits."""

from __future__ import annotations

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from tests.conftest import LLAMA_PROJECTIONS, tiny_bert_classifier, tiny_gpt2, tiny_llama

CASES = {
    "llama-7-projections": (tiny_llama, dict(task_type="CAUSAL_LM", target_modules=LLAMA_PROJECTIONS)),
    "gpt2-conv1d": (
        tiny_gpt2,
        dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "bert-seq-cls": (tiny_bert_classifier, dict(task_type="SEQ_CLS", target_modules=["query", "value"])),
    "llama-embedding": (tiny_llama, dict(task_type="CAUSAL_LM", target_modules=["embed_tokens", "q_proj"])),
    "llama-dora": (tiny_llama, dict(task_type="CAUSAL_LM", target_modules=LLAMA_PROJECTIONS, use_dora=True)),
    "gpt2-dora": (
        tiny_gpt2,
        dict(task_type="CAUSAL_LM", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True),
    ),
    "llama-embedding-dora": (
        tiny_llama,
        dict(task_type="CAUSAL_LM", target_modules=["embed_tokens"], use_dora=True),
    ),
    "llama-rslora-patterns": (
        tiny_llama,
        dict(
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "v_proj"],
            r=4,
            lora_alpha=16,
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 4},
        ),
    ),
    "llama-bias-all": (
        tiny_llama,
        dict(task_type="CAUSAL_LM", target_modules=["q_proj"], bias="all", modules_to_save=["lm_head"]),
    ),
}


def _logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _train_a_few_steps(model, input_ids, steps=3):
    """A few AdamW steps so that B (and every other trainable weight) moves away from its init."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for _ in range(steps):
        loss = model(input_ids=input_ids).logits.float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _with_llama_bias(model):
    # The bias="all" case needs biases to exist; Llama has none by default.
    if isinstance(model, type(tiny_llama())) and model.model.layers[0].self_attn.q_proj.bias is None:
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias = torch.nn.Parameter(torch.randn(32) * 0.1)
    return model


def _build(case):
    builder, kwargs = CASES[case]
    model = builder(seed=0)
    if kwargs.get("bias") == "all":
        model = _with_llama_bias(model)
    return model, kwargs


@pytest.mark.parametrize("case", list(CASES))
def test_lorakit_adapter_loads_in_peft(case, input_ids, tmp_path):
    model, kwargs = _build(case)
    ours = lorakit.get_peft_model(model, lorakit.LoraConfig(**kwargs))
    _train_a_few_steps(ours, input_ids)
    b_weights = [p for n, p in ours.named_parameters() if "lora_B" in n or "lora_embedding_B" in n]
    assert b_weights and all(p.abs().sum() > 0 for p in b_weights)
    ours.save_pretrained(tmp_path)

    base, _ = _build(case)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(_logits(theirs, input_ids), _logits(ours, input_ids), atol=1e-5, rtol=0)
    # and the file holds exactly the keys PEFT itself would write for this model
    # (PEFT also stores the whole base embedding when an embedding is adapted; lorakit does not need to)
    expected = {
        k for k in peft.get_peft_model_state_dict(theirs) if not k.endswith("embed_tokens.base_layer.weight")
    }
    assert set(load_file(tmp_path / "adapter_model.safetensors").keys()) == expected


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lorakit(case, input_ids, tmp_path):
    model, kwargs = _build(case)
    theirs = peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    _train_a_few_steps(theirs, input_ids)
    theirs.save_pretrained(tmp_path)

    base, _ = _build(case)
    ours = lorakit.PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs, input_ids), atol=1e-5, rtol=0)
    # the loaded adapter really changes the model (a load that silently did nothing would fail here)
    fresh, _ = _build(case)
    assert (_logits(ours, input_ids) - _logits(fresh, input_ids)).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["llama-7-projections", "gpt2-conv1d", "llama-dora", "llama-embedding-dora"])
def test_merge_and_unload_matches_peft(case, input_ids, tmp_path):
    model, kwargs = _build(case)
    theirs = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kwargs))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(_build(case)[0], tmp_path)
    merged_ours = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    for (name, ours_p), (_, theirs_p) in zip(
        merged_ours.state_dict().items(), merged_theirs.state_dict().items()
    ):
        torch.testing.assert_close(ours_p, theirs_p, atol=1e-5, rtol=0, msg=name)


def test_trainable_parameter_report_matches_peft():
    kwargs = CASES["llama-7-projections"][1]
    ours = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kwargs))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours_names = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_names = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert ours_names == theirs_names

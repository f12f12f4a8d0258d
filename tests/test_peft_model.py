"""PeftModel behaviour: the numbers the foundation issue pins, several adapters, save/load round trips."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, PeftModel, TaskType, get_peft_model
from lorakit.layers import LoraLayer
from tests.conftest import LLAMA_PROJECTIONS, compile_backend, tiny_bert_classifier, tiny_gpt2, tiny_llama


class TwoLayerMLP(nn.Module):
    """The model of the seed notes (shared/seeds/002): fc1 -> relu -> fc2, LoRA on fc1 only."""

    def __init__(self, input_size=10, hidden_size=20, output_size=2):
        super().__init__()
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, output_size)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_plain_mlp_trains_only_the_adapter_and_counts_r_times_in_plus_out():
    torch.manual_seed(0)
    model = TwoLayerMLP()
    x, y = torch.randn(32, 10), torch.randint(0, 2, (32,))
    reference = model(x).detach()
    peft_model = get_peft_model(model, LoraConfig(target_modules=["fc1"], r=4, lora_alpha=8))
    assert torch.equal(peft_model(x), reference)  # exactly the base model at init
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == 4 * (10 + 20)
    assert total == 10 * 20 + 20 + 20 * 2 + 2 + trainable
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        loss = F.cross_entropy(peft_model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in peft_model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), f"base weight {name} changed"
        else:
            assert not torch.equal(param, adapter[name]), f"adapter weight {name} did not change"


def test_llama_trainable_count_is_sum_of_r_in_plus_out():
    model = tiny_llama()
    shapes = {
        n: (m.in_features, m.out_features)
        for n, m in model.named_modules()
        if n.split(".")[-1] in LLAMA_PROJECTIONS
    }
    peft_model = get_peft_model(model, LoraConfig(target_modules=LLAMA_PROJECTIONS, r=8))
    assert peft_model.get_nb_trainable_parameters()[0] == sum(8 * (i + o) for i, o in shapes.values())


def test_every_adapter_param_changes_and_base_is_bit_identical_on_llama(input_ids):
    peft_model = get_peft_model(
        tiny_llama(), LoraConfig(task_type="CAUSAL_LM", target_modules=LLAMA_PROJECTIONS)
    )
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(2):
        peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    named = dict(peft_model.named_parameters())
    assert all(torch.equal(named[n], p) for n, p in frozen.items())
    assert all(not torch.equal(named[n], p) for n, p in adapter.items())


def test_merge_unmerge_and_merge_and_unload(input_ids):
    model = tiny_llama()
    base_logits = _logits(model, input_ids)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = get_peft_model(model, LoraConfig(target_modules=LLAMA_PROJECTIONS, init_lora_weights=False))
    unmerged = _logits(peft_model, input_ids)
    assert (unmerged - base_logits).abs().max() > 1e-3
    peft_model.merge_adapter()
    torch.testing.assert_close(_logits(peft_model, input_ids), unmerged, atol=1e-5, rtol=0)
    with pytest.warns(UserWarning, match="already merged"):
        peft_model.merge_adapter()
    torch.testing.assert_close(_logits(peft_model, input_ids), unmerged, atol=1e-5, rtol=0)
    peft_model.unmerge_adapter()
    restored = peft_model.get_base_model()
    for name, layer in restored.named_modules():
        if isinstance(layer, LoraLayer):
            torch.testing.assert_close(
                layer.base_layer.weight, base_state[f"{name}.weight"], atol=1e-6, rtol=0
            )
    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged, input_ids), unmerged, atol=1e-5, rtol=0)


def test_unload_gives_back_the_base_model(input_ids):
    model = tiny_llama()
    base_logits = _logits(model, input_ids)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    plain = peft_model.unload()
    assert not any(isinstance(m, LoraLayer) for m in plain.modules())
    assert torch.equal(_logits(plain, input_ids), base_logits)


def test_several_adapters_add_switch_disable_delete(input_ids, tmp_path):
    model = tiny_llama()
    base_logits = _logits(model, input_ids)
    peft_model = get_peft_model(
        model, LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    torch.manual_seed(5)
    peft_model.add_adapter(
        "other", LoraConfig(target_modules=["k_proj", "v_proj"], r=4, init_lora_weights=False)
    )
    assert peft_model.active_adapter == "default"
    first = _logits(peft_model, input_ids)
    peft_model.set_adapter("other")
    second = _logits(peft_model, input_ids)
    assert (first - second).abs().max() > 1e-3
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model, input_ids), base_logits, atol=0, rtol=0)
    # both at once: the updates add up
    peft_model.set_adapter(["default", "other"])
    both = _logits(peft_model, input_ids)
    assert (both - first).abs().max() > 1e-4 and (both - second).abs().max() > 1e-4
    peft_model.merge_adapter(["default", "other"])
    torch.testing.assert_close(_logits(peft_model, input_ids), both, atol=1e-5, rtol=0)
    peft_model.unmerge_adapter()
    # save both: default at the top, "other" in a sub-folder; reload each elsewhere
    peft_model.set_adapter("other")
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "other", adapter_name="other")
    torch.testing.assert_close(_logits(reloaded, input_ids), second, atol=1e-6, rtol=0)
    reloaded.load_adapter(tmp_path, adapter_name="default")
    reloaded.set_adapter("default")
    torch.testing.assert_close(_logits(reloaded, input_ids), first, atol=1e-6, rtol=0)
    reloaded.delete_adapter("other")
    assert list(reloaded.peft_config) == ["default"]
    assert not any("other" in n for n, _ in reloaded.named_parameters())
    with pytest.raises(ValueError, match="already exists"):
        reloaded.add_adapter("default", LoraConfig(target_modules=["q_proj"]))


def test_from_pretrained_is_frozen_unless_trainable(tmp_path):
    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_seq_cls_trains_and_saves_the_classifier_head(tmp_path):
    model = tiny_bert_classifier()
    peft_model = get_peft_model(
        model, LoraConfig(task_type=TaskType.SEQ_CLS, target_modules=["query", "value"])
    )
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert "base_model.model.classifier.modules_to_save.default.weight" in trainable
    peft_model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= keys


def test_wrapper_behaves_like_the_model(input_ids):
    model = tiny_gpt2()
    peft_model = get_peft_model(model, LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True))
    assert peft_model.config is model.config
    out = peft_model.generate(input_ids=input_ids[:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)
    peft_model.to(torch.float64)
    assert peft_model(input_ids=input_ids).logits.dtype == torch.float64


def test_inference_mode_freezes_everything():
    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert peft_model.get_nb_trainable_parameters()[0] == 0


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_options_decide_which_biases_train(bias):
    model = tiny_gpt2()  # GPT-2 has biases everywhere
    peft_model = get_peft_model(model, LoraConfig(target_modules=["c_attn"], bias=bias, fan_in_fan_out=True))
    trainable_biases = {n for n, p in peft_model.named_parameters() if p.requires_grad and n.endswith("bias")}
    if bias == "lora_only":
        assert trainable_biases and all("c_attn.base_layer.bias" in n for n in trainable_biases)
    else:
        assert any("c_fc" in n for n in trainable_biases) and any("c_attn" in n for n in trainable_biases)


def test_gradient_checkpointing_gives_the_same_gradients(input_ids):
    def lora_grads(checkpointing):
        model = tiny_llama()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = get_peft_model(
            model, LoraConfig(target_modules=LLAMA_PROJECTIONS, init_lora_weights=False)
        )
        peft_model.train()
        peft_model(input_ids=input_ids, labels=input_ids).loss.backward()
        return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}

    plain, checkpointed = lora_grads(False), lora_grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_forward_advertises_the_wrapped_models_arguments_and_survives_deepcopy(input_ids):
    import copy
    import inspect

    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    assert list(inspect.signature(peft_model.forward).parameters)[:2] == ["input_ids", "attention_mask"]
    clone = copy.deepcopy(peft_model)
    assert clone.forward.__self__ is clone
    with torch.no_grad():
        for param in clone.parameters():
            param.add_(0.1)
    assert (_logits(clone, input_ids) - _logits(peft_model, input_ids)).abs().max() > 1e-3


def test_compile_keeps_outputs_gradients_and_state_dict_keys(input_ids):
    """PeftModel.compile() traces the plain LoRA formula: same logits and adapter gradients as eager."""
    config = LoraConfig(target_modules=LLAMA_PROJECTIONS, r=4, init_lora_weights=False)
    torch.manual_seed(0)
    eager = get_peft_model(tiny_llama(), config)
    compiled = get_peft_model(tiny_llama(), config)
    compiled.load_state_dict(eager.state_dict())
    keys = list(compiled.state_dict())
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled.compile(backend=compile_backend())
    for model in (eager, compiled):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # the plain formula traced
    assert list(compiled.state_dict()) == keys  # no "_orig_mod." prefix: adapters save as before
    grads = {n: p.grad for n, p in eager.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    for name, param in compiled.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-5)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(input_ids=input_ids).logits, eager(input_ids=input_ids).logits, atol=1e-5, rtol=0
        )


def test_compiled_training_with_dropout_traces_one_graph_and_trains(input_ids):
    """With dropout > 0 the compiled model draws its own masks (F.dropout): no graph break, the adapters learn."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(target_modules=LLAMA_PROJECTIONS, r=4, lora_dropout=0.3))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model.compile(backend=compile_backend())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():  # eval: dropout off, so two calls agree exactly
        torch.testing.assert_close(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)

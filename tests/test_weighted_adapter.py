"""add_weighted_adapter side by side with PEFT: the new adapter's updates and logits, for linear, cat and svd."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit.weighted import combine_cat, combine_linear, combine_svd
from tests.conftest import tiny_gpt2, tiny_llama

WEIGHTS = [0.7, -0.4]

# (builder, config of "default", config of "other", combination options)
CASES = {
    "linear-llama": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16),
        dict(combination_type="linear"),
    ),
    "cat-llama-ranks-and-targets-differ": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8),
        dict(target_modules=["k_proj", "v_proj"], r=2, lora_alpha=4),
        dict(combination_type="cat"),
    ),
    "svd-llama": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8),
        dict(target_modules=["v_proj", "down_proj"], r=6, lora_alpha=3),
        dict(combination_type="svd"),
    ),
    "svd-llama-rank-and-clamp": (
        tiny_llama,
        dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8),
        dict(target_modules=["v_proj"], r=6, lora_alpha=3),
        dict(combination_type="svd", svd_rank=3, svd_clamp=0.9),
    ),
    "svd-llama-regex-targets": (
        tiny_llama,
        dict(target_modules=r".*\.(q_proj|v_proj)", r=4, lora_alpha=8),
        dict(target_modules=r".*\.o_proj", r=4, lora_alpha=8),
        dict(combination_type="svd", svd_full_matrices=False),
    ),
    "svd-gpt2-conv1d": (
        tiny_gpt2,
        dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True),
        dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=4, fan_in_fan_out=True),
        dict(combination_type="svd"),
    ),
    "cat-gpt2-conv1d": (
        tiny_gpt2,
        dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True),
        dict(target_modules=["c_attn", "c_fc"], r=4, lora_alpha=4, fan_in_fan_out=True),
        dict(combination_type="cat"),
    ),
    "linear-gpt2-conv1d": (
        tiny_gpt2,
        dict(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True),
        dict(target_modules=["c_attn"], r=4, lora_alpha=4, fan_in_fan_out=True),
        dict(combination_type="linear"),
    ),
}


def _logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _pair(case, tmp_path):
    """PEFT and lorakit models holding the same two non-zero adapters "default" and "other"."""
    builder, first, second, _ = CASES[case]
    torch.manual_seed(0)
    theirs = peft.get_peft_model(builder(), peft.LoraConfig(init_lora_weights=False, **first))
    theirs.add_adapter("other", peft.LoraConfig(init_lora_weights=False, **second))
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(builder(), tmp_path, is_trainable=True)
    ours.load_adapter(tmp_path / "other", "other")
    return theirs, ours


def _deltas(model, name):
    """Module path (without wrapper prefixes) -> ``scaling * B A`` of adapter ``name`` in (out, in) layout."""
    result = {}
    for path, module in model.named_modules():
        lora_A = getattr(module, "lora_A", {})
        embedding_A = getattr(module, "lora_embedding_A", {})
        if name in lora_A:
            delta = module.lora_B[name].weight @ module.lora_A[name].weight
        elif name in embedding_A:
            delta = module.lora_embedding_B[name] @ module.lora_embedding_A[name]
        else:
            continue
        result[path] = delta * module.scaling[name]
    return result


@pytest.mark.parametrize("case", list(CASES))
def test_weighted_adapter_matches_peft(case, input_ids, tmp_path):
    theirs, ours = _pair(case, tmp_path)
    options = CASES[case][3]
    theirs.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", **options)
    ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", **options)
    their_deltas, our_deltas = _deltas(theirs, "mix"), _deltas(ours, "mix")
    assert our_deltas.keys() == their_deltas.keys() and our_deltas
    for path, delta in our_deltas.items():
        assert delta.abs().max() > 1e-4, path  # a real update, not zeros
        torch.testing.assert_close(delta, their_deltas[path], atol=1e-5, rtol=0, msg=path)
    assert not any(p.requires_grad for n, p in ours.named_parameters() if ".mix." in n)  # frozen, as PEFT
    theirs.set_adapter("mix")
    ours.set_adapter("mix")
    torch.testing.assert_close(_logits(ours, input_ids), _logits(theirs, input_ids), atol=1e-5, rtol=0)


def test_cat_is_exactly_the_weighted_sum_of_updates(tmp_path):
    _, ours = _pair("cat-llama-ranks-and-targets-differ", tmp_path)
    ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type="cat")
    layer = ours.get_base_model().model.layers[0].self_attn.v_proj  # holds both sources
    expected = WEIGHTS[0] * layer.delta_weight("default") + WEIGHTS[1] * layer.delta_weight("other")
    torch.testing.assert_close(layer.delta_weight("mix"), expected, atol=1e-6, rtol=0)
    assert layer.r["mix"] == 4 + 2 and layer.scaling["mix"] == 1.0


def test_combiners_state_their_formulas():
    torch.manual_seed(0)
    A1, B1, A2, B2 = torch.randn(3, 8), torch.randn(7, 3), torch.randn(3, 8), torch.randn(7, 3)
    new_A, new_B = combine_cat([(A1, B1), (A2, B2)], [0.5, -2.0])
    torch.testing.assert_close(new_B @ new_A, 0.5 * B1 @ A1 - 2.0 * B2 @ A2)
    new_A, new_B = combine_linear([(A1, B1), (A2, B2)], [0.5, -2.0])
    torch.testing.assert_close(new_A, 0.5**0.5 * A1 - 2.0**0.5 * A2)
    torch.testing.assert_close(new_B, 0.5**0.5 * B1 + 2.0**0.5 * B2)
    delta = B1 @ A1 + B2 @ A2  # rank 6 > 4: the truncation is the best rank-4 approximation
    new_A, new_B = combine_svd([delta], [1.0], rank=4)
    singular = torch.linalg.svdvals(delta)
    error = torch.linalg.matrix_norm(new_B @ new_A - delta, ord=2)
    torch.testing.assert_close(error, singular[4], atol=1e-5, rtol=0)


def test_the_combined_adapter_saves_and_loads_in_peft(input_ids, tmp_path):
    _, ours = _pair("svd-llama", tmp_path / "sources")
    ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type="svd")
    ours.set_adapter("mix")
    ours.save_pretrained(tmp_path / "saved", selected_adapters=["mix"])
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "saved" / "mix")
    torch.testing.assert_close(_logits(theirs, input_ids), _logits(ours, input_ids), atol=1e-5, rtol=0)


def test_refusals_name_what_is_supported(tmp_path):
    _, ours = _pair("linear-llama", tmp_path)
    for kind in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        with pytest.raises(ValueError, match="not implemented in lorakit yet; supported: svd, linear, cat"):
            ours.add_weighted_adapter(
                ["default", "other"], WEIGHTS, "mix", combination_type=kind, density=0.5
            )
    with pytest.raises(ValueError, match="Invalid combination_type"):
        ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type="avg")
    with pytest.raises(ValueError, match="Adapter missing does not exist"):
        ours.add_weighted_adapter(["default", "missing"], WEIGHTS, "mix")
    with pytest.raises(ValueError, match="one weight per adapter"):
        ours.add_weighted_adapter(["default", "other"], [1.0], "mix")
    assert "mix" not in ours.peft_config
    dora = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    dora.add_adapter("second", lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        dora.add_weighted_adapter(["default", "second"], WEIGHTS, "mix", combination_type="cat")


def test_linear_needs_equal_ranks_and_an_existing_name_is_kept(tmp_path):
    _, ours = _pair("cat-llama-ranks-and-targets-differ", tmp_path)
    with pytest.raises(ValueError, match="same r value"):
        ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type="linear")
    before = {n: p.clone() for n, p in ours.named_parameters() if ".other." in n}
    with pytest.warns(UserWarning, match="already exists"):
        ours.add_weighted_adapter(["default", "other"], WEIGHTS, "other", combination_type="cat")
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters() if ".other." in n)


def test_a_failed_combination_leaves_no_half_built_adapter():
    """SVD needs each layer's dense update; a grouped conv has none, so the call fails and adds nothing."""
    import warnings

    model = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, groups=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the grouped-conv notice
        config = dict(r=2, target_modules=["0"], init_lora_weights=False)
        wrapped = lorakit.get_peft_model(model, lorakit.LoraConfig(**config))
        wrapped.add_adapter("other", lorakit.LoraConfig(**config))
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    with pytest.raises((NotImplementedError, ValueError)):
        wrapped.add_weighted_adapter(["default", "other"], [1.0, 1.0], "mix", combination_type="svd")
    assert "mix" not in wrapped.peft_config
    assert wrapped.state_dict().keys() == before.keys()

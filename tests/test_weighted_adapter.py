"""add_weighted_adapter side by side with PEFT: the new adapter's updates and logits, for every combination type.

The DARE types draw from torch's global generator; both libraries are seeded alike just before the call.
"""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit.merge_utils import drop_and_rescale, elect_sign, merge, trim
from lorakit.weighted import SUPPORTED_TYPES, combine_cat, combine_linear, combine_svd
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

LLAMA_EQUAL_RANKS = (
    tiny_llama,
    dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4, lora_alpha=8),
    dict(target_modules=["v_proj", "down_proj", "embed_tokens"], r=4, lora_alpha=16),
)
LLAMA_RANKS_DIFFER = CASES["svd-llama"][:3]
GPT2_EQUAL_RANKS = CASES["linear-gpt2-conv1d"][:3]
# TIES / DARE / magnitude pruning: the A and B stacks merged (equal ranks), or the updates merged then SVD
CASES |= {
    "ties-llama-embedding": (*LLAMA_EQUAL_RANKS, dict(combination_type="ties", density=0.5)),
    "ties-gpt2-conv1d-frequency": (
        *GPT2_EQUAL_RANKS,
        dict(combination_type="ties", density=0.3, majority_sign_method="frequency"),
    ),
    "dare_linear-llama-embedding": (*LLAMA_EQUAL_RANKS, dict(combination_type="dare_linear", density=0.5)),
    "dare_ties-llama-frequency": (
        *LLAMA_EQUAL_RANKS,
        dict(combination_type="dare_ties", density=0.7, majority_sign_method="frequency"),
    ),
    "dare_ties-gpt2-conv1d": (*GPT2_EQUAL_RANKS, dict(combination_type="dare_ties", density=0.5)),
    "magnitude_prune-llama-embedding": (
        *LLAMA_EQUAL_RANKS,
        dict(combination_type="magnitude_prune", density=0.4),
    ),
    "ties_svd-llama-ranks-and-targets-differ": (
        *LLAMA_RANKS_DIFFER,
        dict(combination_type="ties_svd", density=0.5),
    ),
    "ties_svd-gpt2-conv1d-frequency": (
        *CASES["svd-gpt2-conv1d"][:3],
        dict(combination_type="ties_svd", density=0.6, majority_sign_method="frequency"),
    ),
    "dare_linear_svd-llama": (*LLAMA_RANKS_DIFFER, dict(combination_type="dare_linear_svd", density=0.5)),
    "dare_ties_svd-gpt2-conv1d": (
        *CASES["svd-gpt2-conv1d"][:3],
        dict(combination_type="dare_ties_svd", density=0.5),
    ),
    "magnitude_prune_svd-llama-rank-and-clamp": (
        *LLAMA_RANKS_DIFFER,
        dict(combination_type="magnitude_prune_svd", density=0.5, svd_rank=3, svd_clamp=0.9),
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
    torch.manual_seed(7)  # DARE's random drops: the same draws in both
    theirs.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", **options)
    torch.manual_seed(7)
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


def test_dare_is_random_and_follows_the_seed(tmp_path):
    _, ours = _pair("linear-llama", tmp_path)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        torch.manual_seed(seed)
        ours.add_weighted_adapter(
            ["default", "other"], WEIGHTS, name, combination_type="dare_ties", density=0.5
        )
    a, b, c = (_deltas(ours, name) for name in "abc")
    assert all(torch.equal(a[path], b[path]) for path in a)
    assert not any(torch.equal(a[path], c[path]) for path in a)


def test_density_one_keeps_everything(tmp_path):
    """No entry dropped or trimmed: dare_linear is linear, magnitude_prune_svd is svd."""
    _, ours = _pair("linear-llama", tmp_path)
    ours.add_weighted_adapter(["default", "other"], WEIGHTS, "plain", combination_type="linear")
    ours.add_weighted_adapter(["default", "other"], WEIGHTS, "svd", combination_type="svd")
    ours.add_weighted_adapter(
        ["default", "other"], WEIGHTS, "dare", combination_type="dare_linear", density=1.0
    )
    ours.add_weighted_adapter(
        ["default", "other"], WEIGHTS, "pruned", combination_type="magnitude_prune_svd", density=1
    )
    for new, reference in (("dare", "plain"), ("pruned", "svd")):
        expected = _deltas(ours, reference)
        for path, delta in _deltas(ours, new).items():
            torch.testing.assert_close(delta, expected[path], atol=0, rtol=0)


def test_ties_states_its_steps():
    """Trim to the top-density magnitudes, elect the sign of the total (or of the count), average the agreeing."""
    first = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    second = torch.tensor([[-2.0, -4.0, 0.25, -1.0]])
    assert torch.equal(trim(first, 0.5), torch.tensor([[3.0, 0.0, 0.0, 2.0]]))  # int(0.5 * 4) = 2 kept
    assert torch.equal(trim(first, 1.0), first)
    stacked = torch.stack([first, second])
    # total: sums 1, -5, 0.75, 1 -> + - + +; frequency: counts 0, -2, 2, 0 -> + - + + (ties elect +)
    expected = torch.tensor([[[True, True, True, True]], [[False, True, True, False]]])
    assert torch.equal(elect_sign(stacked, "total"), expected)
    assert torch.equal(elect_sign(stacked, "frequency"), expected)
    # frequency and total differ where one large entry outweighs two small ones
    three = torch.tensor([[-5.0], [1.0], [1.0]])
    assert elect_sign(three, "total")[:, 0].tolist() == [True, False, False]
    assert elect_sign(three, "frequency")[:, 0].tolist() == [False, True, True]
    # ties at density 0.5: trimmed [3, 0, 0, 2] and [-2, -4, 0, 0]; signs + - . +; weights 1 and 0.5
    merged = merge([first, second], [1.0, 0.5], "ties", density=0.5)
    torch.testing.assert_close(merged, torch.tensor([[3.0, -2.0, 0.0, 2.0]]))
    merged = merge([first, second], [1.0, 0.5], "magnitude_prune", density=0.5)
    torch.testing.assert_close(merged, torch.tensor([[2.0, -2.0, 0.0, 2.0]]))


def test_dare_drops_at_the_rate_and_keeps_the_expectation():
    torch.manual_seed(0)
    tensor = torch.full((200, 200), 2.0)
    dropped = drop_and_rescale(tensor, 0.25)
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.01
    assert torch.all(dropped[kept] == 8.0)  # 2 / 0.25
    assert abs(dropped.mean().item() - 2.0) < 0.1
    state = torch.random.get_rng_state()
    assert torch.equal(drop_and_rescale(tensor, 1.0), tensor)
    assert torch.equal(merge([tensor, tensor], [1.0, 1.0], "dare_ties", density=1), tensor)
    assert torch.equal(torch.random.get_rng_state(), state)  # density 1 draws nothing, as in PEFT


@pytest.mark.parametrize("kind", SUPPORTED_TYPES)
def test_every_type_gives_an_adapter(kind, tmp_path):
    _, ours = _pair("linear-llama", tmp_path)
    ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type=kind, density=0.5)
    assert "mix" in ours.peft_config and all(d.abs().max() > 0 for d in _deltas(ours, "mix").values())


def test_density_and_sign_method_are_checked_before_anything_is_added(tmp_path):
    _, ours = _pair("linear-llama", tmp_path)
    pruning = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd")
    for kind in pruning:
        with pytest.raises(
            ValueError, match=f"combination_type '{kind.removesuffix('_svd')}' needs `density`"
        ):
            ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type=kind)
    for density in (0, 0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            ours.add_weighted_adapter(
                ["default", "other"], WEIGHTS, "mix", combination_type="dare_ties", density=density
            )
    for density in ("0.5", True, torch.tensor(0.5)):
        with pytest.raises(ValueError, match="needs `density`"):
            ours.add_weighted_adapter(
                ["default", "other"], WEIGHTS, "mix", combination_type="ties", density=density
            )
    for kind in ("ties", "dare_ties_svd"):
        with pytest.raises(
            ValueError, match="majority_sign_method must be one of total, frequency, got 'mean'"
        ):
            ours.add_weighted_adapter(
                ["default", "other"],
                WEIGHTS,
                "mix",
                combination_type=kind,
                density=0.5,
                majority_sign_method="mean",
            )
    assert "mix" not in ours.peft_config
    # PEFT's rules: linear / cat / svd ignore density; one source adapter is always linear
    ours.add_weighted_adapter(["default", "other"], WEIGHTS, "a", combination_type="svd", density=7.0)
    ours.add_weighted_adapter(["default"], [0.5], "b", combination_type="dare_ties")
    ours.add_weighted_adapter(["default"], [0.5], "c", combination_type="linear")
    assert all(torch.equal(d, _deltas(ours, "c")[p]) for p, d in _deltas(ours, "b").items())


def test_refusals_name_what_is_supported(tmp_path):
    _, ours = _pair("linear-llama", tmp_path)
    with pytest.raises(
        ValueError, match="Invalid combination_type: 'avg'; supported: svd, linear, cat, ties, "
    ):
        ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type="avg")
    with pytest.raises(ValueError, match="magnitude_prune_svd"):
        ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type="avg")
    with pytest.raises(ValueError, match="Adapter missing does not exist"):
        ours.add_weighted_adapter(["default", "missing"], WEIGHTS, "mix")
    with pytest.raises(ValueError, match="one weight per adapter"):
        ours.add_weighted_adapter(["default", "other"], [1.0], "mix")
    assert "mix" not in ours.peft_config
    dora = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    dora.add_adapter("second", lorakit.LoraConfig(target_modules=["q_proj"], use_dora=True))
    for kind in ("cat", "ties", "dare_linear_svd"):
        with pytest.raises(ValueError, match="DoRA"):
            dora.add_weighted_adapter(
                ["default", "second"], WEIGHTS, "mix", combination_type=kind, density=0.5
            )
    assert "mix" not in dora.peft_config


def test_linear_needs_equal_ranks_and_an_existing_name_is_kept(tmp_path):
    _, ours = _pair("cat-llama-ranks-and-targets-differ", tmp_path)
    with pytest.raises(ValueError, match="same r value"):
        ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type="linear")
    for kind in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        with pytest.raises(
            ValueError, match=rf"same r value when using combination_type {kind} .*ranks \[4, 2\]"
        ):
            ours.add_weighted_adapter(
                ["default", "other"], WEIGHTS, "mix", combination_type=kind, density=0.5
            )
    assert "mix" not in ours.peft_config
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


@pytest.mark.parametrize("kind", ["ties", "dare_ties_svd"])
def test_a_merge_failing_midway_leaves_no_half_built_adapter(kind, tmp_path, monkeypatch):
    import lorakit.weighted

    _, ours = _pair("linear-llama", tmp_path)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    calls = []

    def failing_merge(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # after the first layers got their part of the new adapter
            raise RuntimeError("out of memory")
        return merge(*args, **kwargs)

    monkeypatch.setattr(lorakit.weighted, "merge", failing_merge)
    with pytest.raises(RuntimeError, match="out of memory"):
        ours.add_weighted_adapter(["default", "other"], WEIGHTS, "mix", combination_type=kind, density=0.5)
    assert len(calls) == 3 and "mix" not in ours.peft_config
    assert ours.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())

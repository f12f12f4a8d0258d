"""init_lora_weights "gaussian", "pissa", "pissa_niter_K" and "olora" side by side with Hugging Face PEFT.

On tiny random transformers models: the same model wrapped by lorakit and by PEFT (same seed before each wrap) has
the same adapter tensors, the same residual base weights and the same logits, which are the base model's; trained
adapters load both ways; and ``save_pretrained(path_initial_model_for_weight_conversion=...)`` turns a trained
PiSSA / OLoRA adapter into the plain LoRA adapter PEFT writes.

``pissa_niter_K`` draws its random sketch from the global generator, after the ``nn.Linear`` inits of ``A`` and
``B`` (PEFT's order, layer by layer in model order); lorakit draws in the same order, so with the same seed the
results are bit-identical. Reloading such an adapter re-runs the randomized SVD (PEFT warns about it): the residual
is only the training-time one when the generator is seeded as it was then (see
``test_pissa_niter_reload_needs_the_same_seed``).

PEFT 0.21.2's ``olora_init`` ignores ``fan_in_fan_out``: on GPT-2's Conv1D it factors the (in, out) weight, so
its ``lora_A`` is (r, out) and the forward fails; OLoRA is compared on Llama only, and lorakit's Conv1D OLoRA is
checked on its own (``test_olora_on_gpt2_conv1d_keeps_the_function``).
"""

from __future__ import annotations

import json
import math
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.init_conversion import convert_to_lora, converted_config_fields
from tests.conftest import LLAMA_PROJECTIONS, tiny_gpt2, tiny_llama

SEED = 7
ATOL = 1e-5

CASES = {
    "llama": (tiny_llama, dict(target_modules=LLAMA_PROJECTIONS)),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    # an embedding (default init under pissa / olora, but its own random draws), the output head, rsLoRA and
    # per-module rank / alpha: the order of random draws across layer kinds, and the scalings, must match too
    "llama-mixed": (
        tiny_llama,
        dict(
            target_modules=["embed_tokens", "q_proj", "v_proj", "lm_head"],
            use_rslora=True,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
    ),
}
INIT_CASES = [
    (init, case)
    for case in CASES
    for init in ("gaussian", "pissa", "pissa_niter_2", "olora")
    if not (init == "olora" and case == "gpt2-conv1d")  # PEFT's OLoRA breaks on Conv1D (module docstring)
]


def _config(module, case: str, init, **extra):
    return module.LoraConfig(init_lora_weights=init, **(dict(r=4, lora_alpha=8, **CASES[case][1]) | extra))


def _wrap(library, case: str, init, seed: int = SEED, **extra):
    model = CASES[case][0](seed=0)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return library.get_peft_model(model, _config(library, case, init, **extra))


def _logits(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _one_step(model, input_ids, lr=1e-2):
    """One AdamW step on every trainable weight: each factor moves by about ``lr``."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss = model(input_ids=input_ids).logits.float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


def _assert_close(actual, expected, msg=""):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0, msg=lambda m: f"{msg}: {m}")


def _max_difference(ours: dict, theirs: dict) -> float:
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


# ------------------------------------------------------------------------------------------- initialisation
@pytest.mark.parametrize(("init", "case"), INIT_CASES)
def test_init_matches_peft(init, case, input_ids):
    base = CASES[case][0](seed=0)
    ours = _wrap(lorakit, case, init)
    theirs = _wrap(peft, case, init)

    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    assert set(ours_state) == set(theirs_state)  # adapter tensors and (residual) base weights, same names
    for key in ours_state:
        _assert_close(ours_state[key], theirs_state[key], key)
    logits = _logits(ours, input_ids)
    _assert_close(logits, _logits(theirs, input_ids), "logits vs PEFT")
    _assert_close(logits, _logits(base, input_ids), "logits vs the base model (the init keeps the function)")

    original = {f"base_model.model.{k}": v for k, v in base.state_dict().items()}
    residuals = [
        k for k in ours_state if ".base_layer." in k and k.endswith("weight") and "embed_tokens" not in k
    ]
    changed = [
        k for k in residuals if (ours_state[k] - original[k.replace(".base_layer", "")]).abs().max() > 1e-4
    ]
    if init == "gaussian":
        assert not changed
    else:  # the base weights really are residuals, and B is not zero: the comparison is not vacuous
        assert changed == residuals and residuals
        assert all(ours_state[k].abs().max() > 1e-3 for k in ours_state if "lora_B" in k)


def test_pissa_niter_depends_on_the_seed():
    """The randomized SVD does draw from the global generator, so matching PEFT above means drawing in its order."""
    first = _wrap(lorakit, "llama", "pissa_niter_2").state_dict()
    other = _wrap(lorakit, "llama", "pissa_niter_2", seed=SEED + 1).state_dict()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert (first[key] - other[key]).abs().max() > 1e-4


def test_olora_on_gpt2_conv1d_keeps_the_function(input_ids):
    base = tiny_gpt2(seed=0)
    ours = _wrap(lorakit, "gpt2-conv1d", "olora")
    _assert_close(_logits(ours, input_ids), _logits(base, input_ids), "OLoRA on Conv1D")
    layer = ours.base_model.model.transformer.h[0].attn.c_attn
    assert layer.lora_A["default"].weight.shape == (4, 32) and layer.lora_B["default"].weight.shape == (96, 4)


# ------------------------------------------------------------------------------------- files, both ways
ROUND_TRIPS = [
    ("gaussian", "llama"),
    ("pissa", "llama"),
    ("pissa", "gpt2-conv1d"),
    ("pissa_niter_2", "llama"),
    ("olora", "llama"),
    ("olora", "llama-mixed"),
]


@pytest.mark.parametrize(("init", "case"), ROUND_TRIPS)
@pytest.mark.parametrize("writer", ["lorakit", "peft"])
def test_trained_adapter_loads_both_ways(init, case, writer, input_ids, tmp_path):
    """Saved after a step by one library, loaded by the other on a fresh base: the loader re-runs the init on
    the fresh base (recreating the residual), then loads A and B. For pissa_niter_K the loader's generator is
    seeded as it was for the wrap, so the randomized SVD, and so the residual, come out the same."""
    source, target = (lorakit, peft) if writer == "lorakit" else (peft, lorakit)
    trained = _wrap(source, case, init)
    before = _logits(trained, input_ids)
    _one_step(trained, input_ids)
    after = _logits(trained, input_ids)
    assert (after - before).abs().max() > 1e-3
    trained.save_pretrained(tmp_path)

    fresh = CASES[case][0](seed=0)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = target.PeftModel.from_pretrained(fresh, tmp_path)
    _assert_close(_logits(loaded, input_ids), after, f"{writer} -> other library")


def test_pissa_niter_reload_needs_the_same_seed(input_ids, tmp_path):
    """PEFT warns that reloading a pissa_niter_K adapter re-randomises the SVD: with another seed the recreated
    residual differs and so does the model (lorakit behaves the same; the conversion below avoids this)."""
    trained = _wrap(lorakit, "llama", "pissa_niter_2")
    _one_step(trained, input_ids)
    trained.save_pretrained(tmp_path)
    torch.manual_seed(SEED + 1)
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(seed=0), tmp_path)
    assert (_logits(loaded, input_ids) - _logits(trained, input_ids)).abs().max() > 1e-4


# ---------------------------------------------------------------------------------- conversion to LoRA
CONVERSIONS = {
    "pissa": ("pissa", "llama", {}),
    "pissa-gpt2-conv1d": ("pissa", "gpt2-conv1d", {}),
    "pissa_niter_2": ("pissa_niter_2", "llama", {}),
    "olora": ("olora", "llama", {}),
    "pissa-patterns": ("pissa", "llama", dict(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3})),
    "olora-rslora": ("olora", "llama", dict(use_rslora=True)),
}


def _trained_with_initial(library, init, case, extra, input_ids, initial_dir):
    model = _wrap(library, case, init, **extra)
    model.save_pretrained(initial_dir)
    _one_step(model, input_ids)
    return model


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_converted_adapter_gives_the_trained_model(name, input_ids, tmp_path):
    init, case, extra = CONVERSIONS[name]
    trained = _trained_with_initial(lorakit, init, case, extra, input_ids, tmp_path / "initial")
    expected = _logits(trained, input_ids)
    initial_config = (tmp_path / "initial" / "adapter_config.json").read_text()
    trained.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "initial")

    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    config = trained.peft_config["default"]
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(8 * math.sqrt(2) if config.use_rslora else 16)
    assert saved["rank_pattern"] == {k: 2 * v for k, v in config.rank_pattern.items()}
    assert saved["alpha_pattern"] == {k: 2 * v for k, v in config.alpha_pattern.items()}
    # the live adapter and the initial folder are left as they were
    assert config.r == 4 and config.init_lora_weights == init
    assert (tmp_path / "initial" / "adapter_config.json").read_text() == initial_config

    for library in (lorakit, peft):  # on the ORIGINAL base weights, no seed needed (no decomposition on load)
        loaded = library.PeftModel.from_pretrained(CASES[case][0](seed=0), tmp_path / "lora")
        _assert_close(_logits(loaded, input_ids), expected, f"converted adapter loaded by {library.__name__}")
    assert (
        expected - _logits(CASES[case][0](seed=0), input_ids)
    ).abs().max() > 1e-3  # training did something


@pytest.mark.parametrize("name", list(CONVERSIONS))
def test_conversion_equals_peft(name, input_ids, tmp_path):
    init, case, extra = CONVERSIONS[name]
    ours = _trained_with_initial(lorakit, init, case, extra, input_ids, tmp_path / "ours-initial")
    theirs = _wrap(peft, case, init, **extra)
    theirs.save_pretrained(tmp_path / "theirs-initial")
    trained = {k: v for k, v in ours.named_parameters() if v.requires_grad}
    with torch.no_grad():  # PEFT's model gets the very same trained factors
        for key, param in theirs.named_parameters():
            if param.requires_grad:
                param.copy_(trained[key])

    ours.save_pretrained(
        tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours-initial"
    )
    theirs.save_pretrained(
        tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "theirs-initial")
    )
    # PEFT rewrote its initial folder's config with init_lora_weights=True; lorakit reads that form too
    ours.save_pretrained(
        tmp_path / "ours-from-peft-initial",
        path_initial_model_for_weight_conversion=tmp_path / "theirs-initial",
    )

    expected = load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    for folder in ("ours", "ours-from-peft-initial"):
        tensors = load_file(tmp_path / folder / "adapter_model.safetensors")
        assert set(tensors) == set(expected)
        for key in tensors:
            _assert_close(tensors[key], expected[key], f"{folder}: {key}")
        assert _max_difference(tensors, expected) == 0.0  # in fact bit-identical
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    theirs_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora"):
        assert ours_config[field] == theirs_config[field], field


def test_convert_to_lora_math():
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    prefix = "base_model.model.layer"
    trained = {
        f"{prefix}.lora_A.weight": randn(4, 6),
        f"{prefix}.lora_B.weight": randn(5, 4),
        f"{prefix}.emb.lora_embedding_A": randn(4, 10),
        f"{prefix}.emb.lora_embedding_B": randn(3, 4),
        f"{prefix}.bias": randn(5),
    }
    initial = {k: randn(*v.shape) for k, v in trained.items()}
    converted = convert_to_lora(trained, initial)
    assert converted[f"{prefix}.lora_A.weight"].shape == (8, 6)
    assert converted[f"{prefix}.emb.lora_embedding_B"].shape == (3, 8)
    for a, b in (("lora_A.weight", "lora_B.weight"), ("emb.lora_embedding_A", "emb.lora_embedding_B")):
        a, b = f"{prefix}.{a}", f"{prefix}.{b}"
        expected = trained[b] @ trained[a] - initial[b] @ initial[a]
        torch.testing.assert_close(converted[b] @ converted[a], expected)
    assert converted[f"{prefix}.bias"] is trained[f"{prefix}.bias"]  # trained, not converted

    with pytest.raises(ValueError, match="shape"):
        convert_to_lora(trained, {**initial, f"{prefix}.lora_A.weight": randn(2, 6)})
    with pytest.raises(ValueError, match="does not have the trained adapter's layers"):
        convert_to_lora(trained, {k: v for k, v in initial.items() if "lora_B" not in k})


def test_converted_config_fields():
    config = lorakit.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa", rank_pattern={"v": 2})
    assert converted_config_fields(config) == {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"v": 4},
        "alpha_pattern": {},
        "init_lora_weights": True,
    }
    rslora = lorakit.LoraConfig(r=4, lora_alpha=8, use_rslora=True, init_lora_weights="olora")
    assert converted_config_fields(rslora)["lora_alpha"] == pytest.approx(8 * math.sqrt(2))
    with pytest.raises(ValueError, match="use_rslora"):
        converted_config_fields(lorakit.LoraConfig(r=4, use_rslora=True, alpha_pattern={"q": 2}))


def test_conversion_errors(input_ids, tmp_path):
    trained = _trained_with_initial(lorakit, "pissa", "llama", {}, input_ids, tmp_path / "initial")
    out = tmp_path / "out"

    with pytest.raises(ValueError, match="is not an adapter folder"):
        trained.save_pretrained(out, path_initial_model_for_weight_conversion=tmp_path / "missing")
    gaussian = _wrap(lorakit, "llama", "gaussian")
    gaussian.save_pretrained(tmp_path / "gaussian")
    with pytest.raises(ValueError, match="is not a PiSSA / OLoRA adapter"):
        trained.save_pretrained(out, path_initial_model_for_weight_conversion=tmp_path / "gaussian")
    olora = _wrap(lorakit, "llama", "olora")
    olora.save_pretrained(tmp_path / "olora")
    with pytest.raises(ValueError, match="not this adapter's initial state"):
        trained.save_pretrained(out, path_initial_model_for_weight_conversion=tmp_path / "olora")
    _wrap(lorakit, "llama", "pissa", r=2).save_pretrained(tmp_path / "rank-2")
    with pytest.raises(ValueError, match="shape"):
        trained.save_pretrained(out, path_initial_model_for_weight_conversion=tmp_path / "rank-2")
    with pytest.raises(
        ValueError, match="init_lora_weights='gaussian'"
    ):  # the live adapter is not PiSSA / OLoRA
        gaussian.save_pretrained(out, path_initial_model_for_weight_conversion=tmp_path / "initial")
    with pytest.raises(ValueError, match="save_embedding_layers"):
        trained.save_pretrained(
            out, path_initial_model_for_weight_conversion=tmp_path / "initial", save_embedding_layers=True
        )
    assert not out.exists()  # a refused conversion writes nothing

"""llama.cpp itself (llama-cpp-python) runs the exported files: base GGUF + LoRA GGUF, and the merged GGUF, must
generate greedily the tokens lorakit's PeftModel (what ``lorakit generate --temperature 0`` runs) generates.

The embedded base is Q4_1, and llama.cpp multiplies Q4_1 weights with activations quantized to 8 bits, which moves
logits by up to ~1-2 (the base model alone then picks other tokens at near-ties than transformers' float32). So the
token-for-token checks run on an F32 copy of the same base GGUF (the dequantized Q4_1 weights lorakit trains on),
where llama.cpp computes in float32; on the Q4_1 base itself the logits must follow the adapter closely.
Skipped when llama_cpp is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp")

from lorakit import LoraConfig, get_peft_model  # noqa: E402
from lorakit.export import export_gguf_adapter, export_gguf_merged  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.models.embedded import embedded_gguf_path  # noqa: E402
from lorakit.train.inference import load_for_inference  # noqa: E402
from tests.export.helpers import write_f32_copy  # noqa: E402
from tests.models.real_smollm2 import converted  # noqa: E402

pytestmark = pytest.mark.slow
NEW_TOKENS = 24
PROMPT = "What is the capital of France?"
ADAPTERS = {
    # name: (LoraConfig fields, factor scale, outtype)
    "lora": (dict(r=8, lora_alpha=16), 0.5, "f32"),
    "rslora-patterns-f16": (
        dict(r=8, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 12}),
        0.8,
        "f16",
    ),
}
# llama.cpp on the F32 base vs lorakit: largest logit difference allowed (measured: 0.03-0.07 with f32 tensors)
TOLERANCE = {"f32": 0.1, "f16": 0.3}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = converted()[0]
    folder = tmp_path_factory.mktemp("llama_cpp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(root))  # load_for_inference reads the session's converted SmolLM2
        base_model, tokenizer = load_for_inference(None, None, device="cpu")
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        yield {
            "root": root,
            "folder": folder,
            "f32_base": write_f32_copy(embedded_gguf_path(), folder / "smollm2-f32.gguf"),
            "ids": list(ids),
            "eos": tokenizer.eos_token_id,
            "base_model": base_model,
            "base": lorakit_run(base_model, list(ids), tokenizer.eos_token_id),
        }


def lorakit_run(model, ids: list[int], eos: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits along prompt + those tokens."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=eos
        )
        new = out[0, len(ids) :].tolist()
        logits = model(torch.tensor([ids + new])).logits[0].numpy()
    return new, logits


def llama_cpp_run(model_path, ids: list[int], eos: int, sequence: list[int], lora_path=None):
    """llama.cpp's greedy tokens from ``ids`` and its logits along ``sequence`` (teacher forcing)."""
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        lora_path=None if lora_path is None else str(lora_path),
        n_ctx=256,
        n_threads=1,  # 2 threads on 2 shared cores can be 50x slower (spinning at barriers)
        n_threads_batch=1,
        logits_all=True,
        seed=0,
        verbose=False,
    )
    try:
        tokens = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if token == eos or len(tokens) >= NEW_TOKENS:
                break
        llm.reset()
        llm.eval(sequence)
        logits = np.array(llm.scores[: len(sequence)])
    finally:
        llm.close()
    return tokens, logits


def margins(logits: np.ndarray, ids: list[int], tokens: list[int]) -> np.ndarray:
    """lorakit's top-1 minus top-2 logit at each generated token: how clear each greedy choice is."""
    top = np.sort(logits[len(ids) - 1 : len(ids) - 1 + len(tokens)], axis=1)
    return top[:, -1] - top[:, -2]


def assert_same_greedy(got: list[int], tokens: list[int], margin: np.ndarray, tolerance: float) -> None:
    """The same tokens, except that after a near-tie (two logits closer than 2 x tolerance, where llama.cpp's
    rounding may pick the other one, and both are right) the two replies may go their own ways."""
    for index, (ours, theirs) in enumerate(zip(tokens, got)):
        if ours != theirs:
            assert margin[index] < 2 * tolerance, (index, got, tokens, margin[index])
            return
    assert len(got) == len(tokens), (got, tokens)


def make_adapter(root, folder, name):
    settings, scale, _ = ADAPTERS[name]
    model = load_model(None, cache_dir=root)
    torch.manual_seed(0)
    config = LoraConfig(target_modules="all-linear", init_lora_weights=False, **settings)
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for param_name, param in peft.named_parameters():
            if "lora_" in param_name:
                param.mul_(scale)
    peft.save_pretrained(folder / name)
    return folder / name


def test_llama_cpp_base_matches_lorakit_base(setting):
    """The comparison itself: llama.cpp on the F32 base generates lorakit's base tokens."""
    tokens, logits = setting["base"]
    got, cpp_logits = llama_cpp_run(
        setting["f32_base"], setting["ids"], setting["eos"], setting["ids"] + tokens
    )
    assert got == tokens
    assert np.abs(cpp_logits - logits).max() < 0.1


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_adapter_and_merged_gguf_generate_lorakit_tokens(setting, name):
    root, folder, ids, eos = setting["root"], setting["folder"], setting["ids"], setting["eos"]
    adapter = make_adapter(root, folder, name)
    outtype = ADAPTERS[name][2]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_CACHE", str(root))
        model, _ = load_for_inference(None, str(adapter), device="cpu")
    tokens, logits = lorakit_run(model, ids, eos)
    margin = margins(logits, ids, tokens)
    tolerance = TOLERANCE[outtype]
    assert (
        tokens != setting["base"][0]
    )  # the adapter changes the reply, so equal tokens below mean it was applied
    sequence = ids + tokens
    lora_gguf = export_gguf_adapter(adapter, folder / f"{name}.gguf", outtype=outtype).path
    merged_f32 = export_gguf_merged(
        adapter, folder / f"{name}-merged-f32base.gguf", model=str(setting["f32_base"])
    ).path
    merged_q41 = export_gguf_merged(adapter, folder / f"{name}-merged.gguf").path

    for path, lora, allowed in (
        (setting["f32_base"], lora_gguf, tolerance),
        (merged_f32, None, TOLERANCE["f32"]),
    ):
        got, cpp = llama_cpp_run(path, ids, eos, sequence, lora_path=lora)
        assert np.abs(cpp - logits).max() < allowed
        assert_same_greedy(got, tokens, margin, allowed)

    # the Q4_1 base: llama.cpp's 8-bit activations add noise, far below what the adapter changes
    prompt_end = slice(len(ids) - 1, len(sequence) - 1)
    with torch.no_grad():
        base_logits = setting["base_model"](torch.tensor([sequence])).logits[0].numpy()
    effect = np.abs(logits - base_logits)[prompt_end].mean()
    for path, lora in ((embedded_gguf_path(), lora_gguf), (merged_q41, None)):
        _, cpp = llama_cpp_run(path, ids, eos, sequence, lora_path=lora)
        error = np.abs(cpp - logits)[prompt_end]
        assert error.mean() < 0.25 * effect, (error.mean(), effect)
        agree = (cpp[prompt_end].argmax(axis=1) == logits[prompt_end].argmax(axis=1)).mean()
        assert agree >= 0.8, agree


def test_embedding_and_head_lora_on_an_untied_tiny_model(tmp_path):
    """token_embd's transposed lora_a (llm_build_inp_embd) and the output head's pair, run by llama.cpp."""
    from tests.export.helpers import save, tiny_peft, untied_tiny_base

    base = untied_tiny_base(tmp_path)
    targets = ["embed_tokens", "lm_head", "q_proj", "k_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft = tiny_peft(base, config, scale=0.5, untied=True)
    folder = save(peft, tmp_path / "adapter")
    sequence = [1, 50, 60, 70, 80, 90, 100, 110, 120]
    with torch.no_grad():
        expected = peft(input_ids=torch.tensor([sequence])).logits[0].numpy()
    lora = export_gguf_adapter(folder, tmp_path / "adapter.gguf").path
    merged = export_gguf_merged(folder, tmp_path / "merged.gguf").path
    for path, lora_path in ((base, lora), (merged, None)):
        _, logits = llama_cpp_run(path, sequence[:2], 2, sequence, lora_path=lora_path)
        assert np.abs(logits - expected).max() < 5e-3  # llama.cpp keeps its KV cache in f16
    _, logits = llama_cpp_run(base, sequence[:2], 2, sequence)
    assert np.abs(logits - expected).max() > 1.0

"""Model sizes and model construction for the LoRA benchmark: random Llama models built from a seed.

Every worker process rebuilds the same base model from ``(config, seed)``: the weights are drawn on the CPU in
float32 with ``torch.manual_seed(seed)`` and only then cast and moved, so lorakit and PEFT see identical weights
on any device. The adapter setting is the issue's: LoRA r=8, alpha=16 (scaling 2) on all seven projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 8
LORA_ALPHA = 16
MIXED_ROWS = 8  # mixed-adapter batch: 8 rows ...
MIXED_ADAPTERS = 4  # ... over 4 adapters, row i uses adapter i % 4


@dataclass(frozen=True)
class BenchConfig:
    """A Llama shape plus the batch it is timed on (``batch`` rows of ``seq`` tokens)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    batch: int
    seq: int
    extra: dict = field(default_factory=dict)

    def llama_kwargs(self) -> dict:
        return dict(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=max(2048, self.seq),
            use_cache=False,
            **self.extra,
        )

    def describe(self) -> str:
        kv = "" if self.num_key_value_heads == self.num_attention_heads else f"/{self.num_key_value_heads} kv"
        return (
            f"hidden {self.hidden_size}, intermediate {self.intermediate_size}, {self.num_hidden_layers} layers, "
            f"{self.num_attention_heads}{kv} heads, vocab {self.vocab_size}, batch {self.batch} x {self.seq}"
        )


# intermediate_size follows Llama's ratio 8/3 * hidden (768 -> 2048 exactly; 384 -> 1024).
CONFIGS: dict[str, BenchConfig] = {
    "tiny": BenchConfig("tiny", 64, 176, 2, 4, 2, 1000, batch=2, seq=32),
    "small": BenchConfig("small", 384, 1024, 6, 6, 6, 32000, batch=4, seq=256),
    "medium": BenchConfig("medium", 768, 2048, 12, 12, 12, 32000, batch=4, seq=256),
    # SmolLM2-135M's shape (random weights: the Hub is not reachable from the benchmark machines).
    "smollm2-135m": BenchConfig(
        "smollm2-135m",
        576,
        1536,
        30,
        9,
        3,
        49152,
        batch=4,
        seq=256,
        extra=dict(tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0),
    ),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def get_config(name: str) -> BenchConfig:
    if name not in CONFIGS:
        raise ValueError(f"Unknown benchmark config {name!r}; choose from {', '.join(CONFIGS)}.")
    return CONFIGS[name]


def build_base_model(config: BenchConfig, seed: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """The random Llama for ``config``: drawn in float32 on the CPU from ``seed``, then cast and moved."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**config.llama_kwargs()))
    return model.to(device=device, dtype=dtype)


def token_batch(config: BenchConfig, rows: int, seed: int, device: str) -> torch.Tensor:
    """``rows`` x ``config.seq`` random token ids, the same for every mode."""
    generator = torch.Generator().manual_seed(seed + 7919)
    return torch.randint(0, config.vocab_size, (rows, config.seq), generator=generator).to(device)


def lora_config(library: str, dropout: float, init_lora_weights: bool = True):
    """The issue's adapter config, as a ``lorakit.LoraConfig`` or a ``peft.LoraConfig``."""
    module = _library(library)
    return module.LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        lora_dropout=dropout,
        target_modules=list(LLAMA_PROJECTIONS),
        task_type="CAUSAL_LM",
        init_lora_weights=init_lora_weights,
    )


def wrap_with_lora(library: str, model: torch.nn.Module, dropout: float, init_lora_weights: bool = True):
    return _library(library).get_peft_model(model, lora_config(library, dropout, init_lora_weights))


def mixed_adapter_names() -> list[str]:
    return [f"a{i % MIXED_ADAPTERS}" for i in range(MIXED_ROWS)]


def load_mixed_adapters(library: str, model: torch.nn.Module, adapter_dir: str):
    """Load the four adapter folders written by ``write_mixed_adapters`` (PEFT's layout) with ``library``."""
    module = _library(library)
    names = sorted(set(mixed_adapter_names()))
    peft_model = module.PeftModel.from_pretrained(model, f"{adapter_dir}/{names[0]}", adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(f"{adapter_dir}/{name}", adapter_name=name)
    return peft_model.eval()


def write_mixed_adapters(config: BenchConfig, seed: int, adapter_dir: str) -> list[str]:
    """Create the four mixed-batch adapters with PEFT (``init_lora_weights=False``: non-zero A and B) and save them.

    PEFT saves an adapter not named ``default`` in a sub-folder named after it: ``<adapter_dir>/a0`` etc.
    """
    import peft

    model = build_base_model(config, seed, torch.float32, "cpu")
    names = sorted(set(mixed_adapter_names()))
    torch.manual_seed(seed + 100)
    peft_model = peft.get_peft_model(model, lora_config("peft", 0.0, False), adapter_name=names[0])
    for index, name in enumerate(names[1:], start=1):
        torch.manual_seed(seed + 100 + index)
        peft_model.add_adapter(name, lora_config("peft", 0.0, False))
    peft_model.save_pretrained(adapter_dir)
    return names


def _library(name: str):
    if name == "lorakit":
        import lorakit

        return lorakit
    if name == "peft":
        import peft

        return peft
    raise ValueError(f"Unknown library {name!r}; use 'lorakit' or 'peft'.")

"""A script written for PEFT + transformers' Trainer + TRL's SFTTrainer runs with lorakit after changing only
its ``peft`` imports: checkpoints hold the adapter (not the full state dict), resume works, tied embeddings save.

Every run here is side by side with the same script on PEFT.
"""

from __future__ import annotations

import json
import subprocess
import sys

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import lorakit
from lorakit.integrations import is_lorakit_model

from ..conftest import tiny_llama

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


class _Sequences(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(4, 100, (16, 12), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def _tied_llama():
    model = tiny_llama(tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


class _StopAfter(TrainerCallback):
    """Ends training after ``step`` steps, as a killed job would (the schedule still plans for max_steps)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step
        return control


def _trainer_run(library, output_dir, stop_after=None, resume=None):
    """The user's script: only ``library`` (peft or lorakit) changes."""
    model = library.get_peft_model(_tied_llama(), library.LoraConfig(**LORA))
    arguments = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    callbacks = [_StopAfter(stop_after)] if stop_after else []
    trainer = Trainer(model=model, args=arguments, train_dataset=_Sequences(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return trainer, losses


def test_trainer_checkpoints_hold_the_adapter_and_losses_equal_peft(tmp_path) -> None:
    trainer, losses = _trainer_run(lorakit, tmp_path / "lorakit")
    _, peft_losses = _trainer_run(peft, tmp_path / "peft")
    assert is_lorakit_model(trainer.model)
    assert len(losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(peft_losses), rtol=0, atol=1e-5)
    for step in (2, 4):
        checkpoint = tmp_path / "lorakit" / f"checkpoint-{step}"
        assert (checkpoint / "adapter_config.json").is_file()
        assert not (checkpoint / "model.safetensors").exists(), "the full state dict was saved"
        ours = load_file(checkpoint / "adapter_model.safetensors")
        theirs = load_file(tmp_path / "peft" / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-5)

    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    reloaded = peft.PeftModel.from_pretrained(_tied_llama(), tmp_path / "final")  # PEFT reads the result
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits)


def test_trainer_resume_from_checkpoint_gives_the_uninterrupted_adapter(tmp_path) -> None:
    full, _ = _trainer_run(lorakit, tmp_path / "full")
    _trainer_run(lorakit, tmp_path / "cut", stop_after=2)
    assert not (tmp_path / "cut" / "checkpoint-4").exists()
    resumed, losses = _trainer_run(lorakit, tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    assert resumed.state.global_step == 4 and len(losses) == 4  # steps 1-2 from the checkpoint's history
    expected = {n: p for n, p in full.model.named_parameters() if p.requires_grad}
    for name, parameter in resumed.model.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(parameter, expected[name], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ TRL
def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(125)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _sft_run(library, output_dir, through_config: bool):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(0, 125, (10,), generator=generator)) for _ in range(16)
    ]
    model, config = _tied_llama(), library.LoraConfig(**LORA)
    extra = {"peft_config": config} if through_config else {}
    if not through_config:
        model = library.get_peft_model(model, config)
    arguments = trl.SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        bf16=False,  # TRL's default is bf16 autocast, also on CPU; equality is checked in fp32
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        max_length=32,
    )
    trainer = trl.SFTTrainer(
        model=model,
        args=arguments,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=_tokenizer(),
        **extra,
    )
    trainer.train()
    return trainer, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("through_config", [True, False], ids=["peft_config", "peft_model"])
def test_trl_sft_trainer_trains_a_lorakit_adapter_like_peft(tmp_path, through_config) -> None:
    trainer, losses = _sft_run(lorakit, tmp_path / "lorakit", through_config)
    _, peft_losses = _sft_run(peft, tmp_path / "peft", through_config)
    assert is_lorakit_model(trainer.model)
    assert len(losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(peft_losses), rtol=0, atol=1e-5)
    ours = dict(trainer.model.named_parameters())
    theirs = load_file(tmp_path / "peft" / "checkpoint-4" / "adapter_model.safetensors")
    saved = load_file(tmp_path / "lorakit" / "checkpoint-4" / "adapter_model.safetensors")
    for key in theirs:
        torch.testing.assert_close(saved[key], theirs[key], rtol=0, atol=1e-5)
    assert set(saved) and all(p.requires_grad for n, p in ours.items() if "lora_" in n)
    checkpoint = tmp_path / "lorakit" / "checkpoint-4"
    assert (checkpoint / "adapter_config.json").is_file() and not (checkpoint / "model.safetensors").exists()
    assert (
        load_file(checkpoint / "adapter_model.safetensors").keys()
        == load_file(tmp_path / "peft" / "checkpoint-4" / "adapter_model.safetensors").keys()
    )


def test_modules_imported_after_lorakit_objects_are_covered_too() -> None:
    """Fresh interpreter: lorakit objects first, transformers' trainer and TRL imported afterwards."""
    script = """
import torch, lorakit
model = torch.nn.Sequential(torch.nn.Linear(4, 4))
config = lorakit.LoraConfig(r=2, target_modules=["0"])
wrapped = lorakit.get_peft_model(model, config)
import transformers.trainer as hf_trainer
from accelerate.utils import is_peft_model
assert hf_trainer._is_peft_model(wrapped) and not hf_trainer._is_peft_model(torch.nn.Linear(2, 2))
assert is_peft_model(wrapped) and not is_peft_model(torch.nn.Linear(2, 2))
import trl.trainer.sft_trainer as sft
assert isinstance(config, sft.PeftConfig) and not isinstance(object(), sft.PeftConfig)
assert sft.is_peft_model(wrapped)
import peft
assert type(sft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), config)) is lorakit.PeftModel
theirs = sft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), peft.LoraConfig(r=2, target_modules=["0"]))
assert isinstance(theirs, peft.PeftModel)
print("ok")
"""
    pytest.importorskip("trl")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_without_peft_installed_the_trainer_path_says_what_to_install() -> None:
    script = """
import sys, warnings
sys.modules["peft"] = None  # as if peft were not installed
import lorakit
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import transformers.trainer
print(any("pip install peft" in str(w.message) for w in caught))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("True")

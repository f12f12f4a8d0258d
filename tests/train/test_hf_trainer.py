"""A lorakit PeftModel trains inside Hugging Face transformers' Trainer."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainingArguments

from lorakit import LoraConfig, PeftModel, get_peft_model

from .helpers import adapter_tensors, tiny_llama


class _Sequences(torch.utils.data.Dataset):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(4, 100, (16, 12), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def test_peft_model_trains_in_transformers_trainer(tmp_path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapter_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        # default remove_unused_columns=True: Trainer keeps the columns named in PeftModel.forward's signature,
        # which advertises the wrapped model's arguments
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=_Sequences())
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert not torch.equal(parameter, adapter_before[name]), f"{name} did not train"
        else:
            assert torch.equal(parameter, frozen[name]), f"{name} changed but is frozen"
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
    assert set(adapter_tensors(tmp_path / "adapter")) and all(
        "lora_" in k for k in adapter_tensors(tmp_path / "adapter")
    )

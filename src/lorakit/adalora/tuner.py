"""``AdaLoraModel``: a model with AdaLoRA layers, the orthogonality regularizer and the rank allocator.

Everything that is not specific to AdaLoRA (set/delete/disable adapters, merging, unloading) is
:class:`~lorakit.tuner.LoraModel`'s: AdaLoRA layers are LoRA layers whose update is ``B diag(E) A``.
As in PEFT, only one adapter of a model can be trainable, and its config's ``rank_pattern`` records the
current allocation; saving keeps only the kept triplets, and a config with a ``rank_pattern`` builds each layer
at its pruned size (with ``ranknum`` still ``init_r``), so that saved adapters reload at their pruned size.
"""

from __future__ import annotations

import torch

from lorakit.adalora.allocator import RankAllocator
from lorakit.adalora.config import AdaLoraConfig
from lorakit.adalora.layers import AdaLoraLayer, make_svd_layer, svd_supported, svd_unsupported_message
from lorakit.inject import LayerFactory, inject_adapter, inject_modules_to_save
from lorakit.tuner import LoraModel, with_task_heads

SAVED_PREFIX = "base_model.model."  # what PeftModel puts before a module path in its state dict


class AdaLoraModel(LoraModel):
    """A model with AdaLoRA adapters; ``forward`` adds ``orth_reg_weight * R(A, B)`` to the output's loss."""

    rank_allocator: RankAllocator | None = None
    trainable_adapter_name: str | None = None

    # --------------------------------------------------------------------------------------------- adapters
    def add_adapter(self, adapter_name: str, config: AdaLoraConfig) -> None:
        """Inject AdaLoRA adapter ``adapter_name``; a trainable one gets the rank allocator."""
        if not isinstance(config, AdaLoraConfig):
            raise ValueError("All adapters on one model must be of the same method (here AdaLoRA).")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another name.")
        if not config.inference_mode and self.trainable_adapter_name is not None:
            raise ValueError(
                f"AdaLoRA trains one adapter at a time and {self.trainable_adapter_name!r} is trainable; "
                f"add {adapter_name!r} with inference_mode=True."
            )
        config = with_task_heads(config)
        layers = inject_adapter(self.model, config, adapter_name, SVD_LAYERS)
        inject_modules_to_save(self.model, config.modules_to_save, adapter_name)
        self.peft_config[adapter_name] = config
        self._refresh_trainable()
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            fixed = bool(config.rank_pattern)  # reloaded at its pruned size: train on, no re-allocation
            self.rank_allocator = RankAllocator(config, adapter_name, layers, fixed=fixed)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name == self.trainable_adapter_name:
            self.trainable_adapter_name, self.rank_allocator = None, None

    def svd_layers(self, adapter_name: str) -> dict[str, AdaLoraLayer]:
        """Module path -> AdaLoRA layer holding ``adapter_name``."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, AdaLoraLayer) and adapter_name in module.r
        }

    # ---------------------------------------------------------------------------------------------- forward
    def mixed_batch(self, adapter_names: list[str]):
        """Refused (also for ``PeftModel.generate(adapter_names=...)``, which calls it directly)."""
        raise ValueError(
            "Mixed-adapter batches (adapter_names) are supported for LoRA adapters only, not AdaLoRA."
        )

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is not None:
            self.mixed_batch(adapter_names)
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and self.trainable_adapter_name is not None:
            outputs.loss = loss + self.regularization_loss()
        return outputs

    def regularization_loss(self) -> torch.Tensor:
        """``orth_reg_weight * R(A, B)`` of the trainable adapter (zero without one).

        ``forward`` adds it to ``outputs.loss`` when the model computes a loss (``labels`` given); a training loop
        that computes its own loss from the logits adds this once per optimizer step instead.
        """
        if self.trainable_adapter_name is None:
            return torch.zeros(())
        weight = self.peft_config[self.trainable_adapter_name].orth_reg_weight
        return weight * self.orthogonal_regularization()

    def orthogonal_regularization(self) -> torch.Tensor:
        """``R = mean over the A and B matrices of ||A A^T - I||_F and ||B^T B - I||_F`` (paper eq. 4)."""
        name = self.trainable_adapter_name
        penalties = []
        for layer in self.svd_layers(name).values():
            for gram in (
                layer.lora_A[name] @ layer.lora_A[name].T,
                layer.lora_B[name].T @ layer.lora_B[name],
            ):
                identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                penalties.append(torch.linalg.vector_norm(gram - identity))
        total = torch.zeros(())
        for penalty in penalties:  # summed in module order, as PEFT does, so both give the same bits
            total = total + penalty
        return total / max(len(penalties), 1)

    # ----------------------------------------------------------------------------------------- allocation
    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and re-allocate ranks; call once per optimizer step.

        Call it after ``loss.backward()`` and ``optimizer.step()``, before ``optimizer.zero_grad()``, with
        ``global_step`` counting optimizer steps from 1 up to the config's ``total_step``.
        """
        if self.rank_allocator is None:
            raise ValueError(
                "This AdaLoRA model has no trainable adapter (it was loaded for inference), so there are no "
                "ranks to allocate; load it with is_trainable=True to train it."
            )
        pattern = self.rank_allocator.update_and_allocate(int(global_step))
        if pattern is not None:
            self.peft_config[self.trainable_adapter_name].rank_pattern = pattern

    def allocator_state_dict(self) -> dict[str, torch.Tensor]:
        """Importance EMAs and the current rank pattern as tensors, so a trainer can checkpoint and resume."""
        if self.rank_allocator is None:
            return {}
        state = self.rank_allocator.state_dict()
        for key, flags in (self.peft_config[self.trainable_adapter_name].rank_pattern or {}).items():
            state[f"rank_pattern/{key}"] = torch.tensor(flags, dtype=torch.bool)
        return state

    def load_allocator_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.rank_allocator is None:
            raise ValueError("This AdaLoRA model has no trainable adapter to restore allocator state into.")
        pattern = {
            k.removeprefix("rank_pattern/"): v.tolist()
            for k, v in state.items()
            if k.startswith("rank_pattern/")
        }
        self.rank_allocator.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("rank_pattern/")}
        )
        self.peft_config[self.trainable_adapter_name].rank_pattern = pattern or None

    # ---------------------------------------------------------------------------------------------- saving
    def adapter_tensors_for_saving(
        self, tensors: dict[str, torch.Tensor], adapter_name: str
    ) -> dict[str, torch.Tensor]:
        """Keep only the unpruned triplets of each layer (rows of A and E, columns of B), as PEFT saves them."""
        pattern = self.peft_config[adapter_name].rank_pattern
        if not pattern:
            return tensors
        tensors = dict(tensors)
        for path, layer in self.svd_layers(adapter_name).items():
            flags = _flags_for(pattern, path, adapter_name)
            if flags is None or sum(flags) == layer.r[adapter_name]:
                continue
            if len(flags) != layer.r[adapter_name]:
                raise ValueError(
                    f"rank_pattern for {path!r} has {len(flags)} flags; the layer has rank {layer.r[adapter_name]}."
                )
            kept = torch.tensor(flags, dtype=torch.bool).nonzero().view(-1)
            for factor, dim in (("lora_A", 0), ("lora_E", 0), ("lora_B", 1)):
                key = f"{SAVED_PREFIX}{path}.{factor}"
                tensors[key] = tensors[key].index_select(dim, kept.to(tensors[key].device))
        return tensors


def _flags_for(pattern: dict[str, list[bool]], path: str, adapter_name: str) -> list[bool] | None:
    """A layer's flags; PEFT keys them ``<path>.lora_E`` on disk and ``<path>.lora_E.<adapter>`` in memory."""
    return pattern.get(f"{path}.lora_E", pattern.get(f"{path}.lora_E.{adapter_name}"))


def _add_svd_adapter(layer: AdaLoraLayer, adapter_name: str, name: str, config: AdaLoraConfig) -> None:
    """Add ``adapter_name``: ``init_r`` triplets, or only the kept ones of a ``rank_pattern`` (``ranknum = init_r``)."""
    flags = _flags_for(config.rank_pattern or {}, name, adapter_name)
    rank = config.init_r if flags is None else sum(flags)
    layer.update_layer(
        adapter_name,
        rank,
        config.lora_alpha,
        config.lora_dropout,
        config.init_lora_weights,
        ranknum=config.init_r,
    )


SVD_LAYERS = LayerFactory(
    layer_class=AdaLoraLayer,
    supports=svd_supported,
    wrap=lambda module, name, config: make_svd_layer(module, name),
    add=_add_svd_adapter,
    unsupported=svd_unsupported_message,
)

"""Forwards of the served model for rows that use different adapters: prefill prompts, decode one token per row.

A decode step puts every row in one forward when it can: a LoRA model runs rows of different adapters (and the
base model, ``"__base__"``) together through :meth:`lorakit.tuner.LoraModel.mixed_batch`. Adapters that cannot
share a forward (variants such as DoRA, methods without mixed batches, layer kinds without a mixed path) fall back
to sub-batches: the mixable rows form one sub-batch, each other adapter one sub-batch of its rows run with that
adapter active (the base model's rows under ``disable_adapter``). An adapter with its own copies of whole modules
(``modules_to_save``, e.g. ``lm_head``) is one of those: ``mixed_batch`` only routes the LoRA layers, so the mixed
sub-batch runs with those copies switched off (the original modules). Each sub-batch gets a copy of its rows of the KV
cache (:meth:`KVBatch.take`), and the parts are put back in row order afterwards (:meth:`KVBatch.gather`), so the
step still advances every row by one token.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.serve.kv_batch import KVBatch
from lorakit.serve.request import BASE_MODEL

Group = tuple[Callable[[], contextlib.AbstractContextManager], list[int]]


class ModelRunner:
    """Runs the model (a lorakit ``PeftModel`` or a plain transformers causal LM) for rows with given adapters."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._mixable: dict[str, bool] = {}
        self._wrappers: list[nn.Module] | None = None  # the modules_to_save wrappers, found once
        self._layers: list[nn.Module] | None = None  # the LoRA layers, found once
        inner = self._inner()
        self._logits_to_keep = "logits_to_keep" in inspect.signature(inner.forward).parameters

    # ------------------------------------------------------------------------------------------- adapters
    @property
    def is_peft(self) -> bool:
        from lorakit.peft_model import PeftModel

        return isinstance(self.model, PeftModel)

    def _inner(self) -> nn.Module:
        return self.model.get_base_model() if self.is_peft else self.model

    def adapter_names(self) -> list[str]:
        return list(self.model.peft_config) if self.is_peft else []

    def invalidate(self) -> None:
        """Forget what is known about the adapters (after loading or deleting one)."""
        self._mixable.clear()
        self._wrappers = self._layers = None

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def mixable(self, adapter: str) -> bool:
        """Whether rows of ``adapter`` can run in a mixed-adapter forward."""
        if adapter not in self._mixable:
            self._mixable[adapter] = self._check_mixable(adapter)
        return self._mixable[adapter]

    def _check_mixable(self, adapter: str) -> bool:
        """Ask the model: a one-token forward with ``mixed_batch([adapter])`` (methods, variants and layer kinds
        without a mixed path raise there), except for adapters with ``modules_to_save`` copies, which it ignores."""
        if any(adapter in wrapper.modules_to_save for wrapper in self._save_wrappers()):
            return False  # mixed_batch routes LoRA layers only; whole-module copies need the adapter active
        probe = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        try:
            with torch.no_grad(), self.model.base_model.mixed_batch([adapter]):
                self.model(input_ids=probe, use_cache=False)
        except Exception:  # noqa: BLE001 -- whatever the reason, these rows run in their own sub-batch
            return False
        return True

    def groups(self, adapters: Sequence[str]) -> list[Group]:
        """Partition the rows into sub-batches that can each run in one forward, with their contexts."""
        rows = list(range(len(adapters)))
        if not self.is_peft:
            return [(contextlib.nullcontext, rows)]
        mixed = [i for i in rows if self.mixable(adapters[i])]
        groups: list[Group] = []
        if mixed:
            names = [adapters[i] for i in mixed]
            groups.append((lambda: self._mixed(names), mixed))
        alone: dict[str, list[int]] = {}
        for i in rows:
            if not self.mixable(adapters[i]):
                alone.setdefault(adapters[i], []).append(i)
        for name, members in alone.items():
            groups.append((lambda name=name: self._only(name), members))
        return groups

    def _save_wrappers(self) -> list[nn.Module]:
        if self._wrappers is None:
            from lorakit.modules_to_save import save_wrappers

            self._wrappers = [wrapper for _, wrapper in save_wrappers(self.model)]
        return self._wrappers

    def _lora_layers(self) -> list[nn.Module] | None:
        """The LoRA layers, found once (None for a tuner other than LoRA's: its own ``mixed_batch`` runs)."""
        from lorakit.tuner import LoraModel

        if self._layers is None and type(self.model.base_model).mixed_batch is LoraModel.mixed_batch:
            self._layers = [layer for _, layer in self.model.base_model.adapter_layers()]
        return self._layers

    @contextlib.contextmanager
    def _mixed(self, names: list[str]):
        """Row ``i`` with adapter ``names[i]``; ``modules_to_save`` copies stay out (no mixable adapter has one).

        For LoRA this is :meth:`LoraModel.mixed_batch` (set each layer's ``row_adapters`` for the forward) over
        a list of layers found once: ``mixed_batch`` walks every module per call, 5 ms per step on SmolLM2-135M.
        The engine has checked the names already.
        """
        wrappers = [(w, w.disable_adapters) for w in self._save_wrappers()]
        layers = self._lora_layers()
        rows = tuple(names)
        for wrapper, _ in wrappers:
            wrapper.disable_adapters = True
        try:
            if layers is None:
                with self.model.base_model.mixed_batch(names):
                    yield
            else:
                for layer in layers:
                    layer.row_adapters = rows
                yield
        finally:
            for layer in layers or []:
                layer.row_adapters = None
            for wrapper, flag in wrappers:
                wrapper.disable_adapters = flag

    @contextlib.contextmanager
    def _only(self, adapter: str):
        """Run with ``adapter`` alone active (the base model: adapters disabled), then restore the active ones."""
        if adapter == BASE_MODEL:
            with self.model.disable_adapter():
                yield
            return
        previous = self.model.active_adapter
        self.model.set_adapter(adapter)
        try:
            yield
        finally:
            if previous:
                self.model.set_adapter(previous)

    # ---------------------------------------------------------------------------------------------- forwards
    def _forward(self, context, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with context():
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **kwargs,
            )
        return out.logits[:, -1, :].float()

    def prefill(
        self, prompts: Sequence[Sequence[int]], adapters: Sequence[str]
    ) -> tuple[torch.Tensor, KVBatch]:
        """Prompt ``i`` with adapter ``adapters[i]``, left-padded together (per sub-batch, see :meth:`groups`).

        Returns the next-token logits ``(B, vocab)`` and the rows' :class:`KVBatch`, in the order given.
        """
        groups = self.groups(adapters)
        parts, outputs = [], []
        for context, rows in groups:
            logits, part = self._prefill_group(context, [prompts[i] for i in rows])
            parts.append(part)
            outputs.append(logits)
        if len(groups) == 1:
            return outputs[0], parts[0]
        logits = outputs[0].new_empty(len(prompts), outputs[0].shape[-1])
        for (_, rows), output in zip(groups, outputs):
            logits[rows] = output
        return logits, KVBatch.gather(parts, [rows for _, rows in groups])

    def _prefill_group(self, context, prompts: list[Sequence[int]]) -> tuple[torch.Tensor, KVBatch]:
        device = self.device
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # each row counts from 0 at its first real token
        cache = DynamicCache()
        logits = self._forward(context, input_ids, mask, positions, cache)
        batch = KVBatch(cache, mask)
        batch.zero_padding()  # the pad tokens' keys and values: zeros, as in every other padding column
        return logits, batch

    def decode(self, batch: KVBatch, tokens: Sequence[int], adapters: Sequence[str]) -> torch.Tensor:
        """Feed ``tokens[i]`` to row ``i`` (adapter ``adapters[i]``); returns the logits ``(B, vocab)``.

        ``batch`` is advanced in place by one column per row.
        """
        device = batch.mask.device
        input_ids = torch.tensor(list(tokens), dtype=torch.long, device=device).unsqueeze(1)
        groups = self.groups(adapters)
        if len(groups) == 1:
            return self._step(groups[0][0], batch, input_ids)
        parts, outputs = [], []
        for context, rows in groups:
            part = batch.take(rows)
            outputs.append(self._step(context, part, input_ids[rows]))
            parts.append(part)
        merged = KVBatch.gather(parts, [rows for _, rows in groups])
        batch.cache, batch.mask = merged.cache, merged.mask
        logits = outputs[0].new_empty(len(tokens), outputs[0].shape[-1])
        for (_, rows), output in zip(groups, outputs):
            logits[rows] = output
        return logits

    def _step(self, context, batch: KVBatch, input_ids: torch.Tensor) -> torch.Tensor:
        attention_mask, position_ids = batch.step_inputs()
        logits = self._forward(context, input_ids, attention_mask, position_ids, batch.cache)
        batch.advance(attention_mask)
        return logits

"""Integrations with other libraries of the Hugging Face stack (transformers' Trainer, accelerate, TRL)."""

from lorakit.integrations.hf_stack import enable_hf_integration, is_lorakit_model

__all__ = ["enable_hf_integration", "is_lorakit_model"]

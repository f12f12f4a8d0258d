"""The method table (lorakit.methods): one row per method, the only place methods are registered."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit import config as config_module
from lorakit.config import LoraConfig, PeftType, config_class_for
from lorakit.methods import METHODS, TrainerHooks, hooks_of, method_for_type, method_named, method_names
from lorakit.train.config import METHODS as TRAIN_METHODS
from lorakit.train.config import ConfigError, TrainConfig, config_from_dict
from tests.train.helpers import tiny_llama


def test_every_row_is_consistent():
    assert method_names() == TRAIN_METHODS  # the trainer's choices are the table's rows
    for method in METHODS:
        assert method.config_class.peft_type_name() == method.peft_type.value
        assert method_for_type(method.peft_type).config_class is method.config_class
        assert config_class_for(method.peft_type.value) is method.config_class
    assert {m.peft_type for m in METHODS} == set(PeftType)


def test_nothing_registers_by_import():
    assert not hasattr(config_module, "register_config_class")
    assert not hasattr(lorakit.peft_model, "register_tuner")


def test_unknown_names_and_types_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="lora, dora, adalora, adapter"):
        method_named("loha")
    with pytest.raises(ValueError, match="'LOHA'.*LORA, ADALORA, BOTTLENECK_ADAPTER"):
        method_for_type("LOHA")


def test_hooks_are_no_ops_except_adalora():
    model = lorakit.get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"]))
    hooks = hooks_of(model)
    assert type(hooks) is TrainerHooks
    assert hooks.regularization_loss(model) is None and hooks.state(model) == {}
    ada = lorakit.get_peft_model(
        tiny_llama(),
        lorakit.AdaLoraConfig(
            target_modules=["q_proj"], init_r=4, target_r=2, total_step=10, orth_reg_weight=0.5
        ),
    )
    loss = hooks_of(ada).regularization_loss(ada)
    assert torch.allclose(loss, 0.5 * ada.base_model.orthogonal_regularization())
    assert "rank_pattern" not in str(list(hooks_of(ada).state(ada)))  # no pattern before the first allocation


@pytest.mark.parametrize("init", ["true", "false", "gaussian", "pissa", "pissa_niter_4", "olora", "loftq"])
def test_trainer_init_key_reaches_the_lora_config(init):
    from lorakit.train.adapters import build_adapter_config

    config = config_from_dict({"init_lora_weights": init, "loftq_iter": 3})
    adapter = build_adapter_config(config, total_steps=10)
    assert adapter.init_lora_weights == {"true": True, "false": False}.get(init, init)
    assert adapter.loftq_config == ({"loftq_bits": 4, "loftq_iter": 3} if init == "loftq" else {})


@pytest.mark.parametrize(
    "values, message",
    [
        ({"init_lora_weights": "pissa_niter_x"}, "pissa_niter_K"),
        ({"init_lora_weights": "corda"}, "olora"),
        ({"init_lora_weights": "pissa", "method": "adalora"}, "method lora or dora"),
        ({"init_lora_weights": "loftq", "loftq_iter": 0}, "loftq_iter"),
    ],
)
def test_trainer_init_key_errors_name_the_choices(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_yaml_booleans_are_accepted_for_init():
    assert config_from_dict({"init_lora_weights": True}).init_lora_weights == "true"
    assert config_from_dict({"init_lora_weights": "False"}).init_lora_weights == "false"
    assert "init_lora_weights" in {f.name for f in dataclasses.fields(TrainConfig)}

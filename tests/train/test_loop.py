"""The training loop end to end on a tiny random Llama (in-process, a few steps each)."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from lorakit.train.checkpoint import CheckpointError, latest_checkpoint
from lorakit.train.config import load_config
from lorakit.train.loop import TrainingDiverged, train
from lorakit.train.metrics import read_metrics
from tests.conftest import compile_backend

from .helpers import adapter_tensors, tiny_run_flags


def _train(inputs, output_dir, **overrides):
    return train(load_config(None, tiny_run_flags(inputs, output_dir, **overrides)))


def test_accumulation_4x1_equals_batch_4_in_trainer(tiny_run_inputs, tmp_path) -> None:
    """Same global batch of sequences with different lengths: adapters equal within 1e-6.

    Adam moves every element by about lr per step whatever the gradient's size, so float32 rounding in
    near-zero gradient components shows up in proportion to lr; lr = 1e-3 keeps it below 1e-6 while
    weighting micro-batches wrongly (the old accumulation bug) would differ by about lr.
    """
    kwargs = dict(max_steps=4, learning_rate=1e-3)
    big = _train(
        tiny_run_inputs, tmp_path / "big", micro_batch_size=4, gradient_accumulation_steps=1, **kwargs
    )
    small = _train(
        tiny_run_inputs, tmp_path / "small", micro_batch_size=1, gradient_accumulation_steps=4, **kwargs
    )
    a, b = adapter_tensors(big.adapter_dir), adapter_tensors(small.adapter_dir)
    assert a.keys() == b.keys() and any(t.abs().sum() > 0 for k, t in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_run_writes_metrics_plot_summary_and_learns(tiny_run_inputs, tmp_path) -> None:
    result = _train(
        tiny_run_inputs, tmp_path / "run", max_steps=12, eval_steps=4, save_steps=5, learning_rate=2e-2
    )
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 13))
    assert [r["step"] for r in eval_lines] == [0, 4, 8, 12]
    assert all(math.isclose(r["eval_ppl"], math.exp(r["eval_loss"])) for r in eval_lines)
    assert all(r["tokens"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train_lines)
    assert eval_lines[-1]["eval_loss"] < eval_lines[0]["eval_loss"] - 0.1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["eval_loss_end"] == eval_lines[-1]["eval_loss"]
    assert summary["trainable_params"] == sum(t.numel() for t in adapter_tensors(result.adapter_dir).values())
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert len(result.samples) == 3 and {"prompt", "before", "after"} <= set(result.samples[0])
    # Checkpoints at 5 and 10, plus the final one at 12; the newest two are kept.
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000012"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-00000010",
        "step-00000012",
    ]


def test_two_identical_runs_are_bit_identical(tiny_run_inputs, tmp_path) -> None:
    first = _train(tiny_run_inputs, tmp_path / "a", lora_dropout=0.1, max_steps=3)
    second = _train(tiny_run_inputs, tmp_path / "b", lora_dropout=0.1, max_steps=3)
    a, b = adapter_tensors(first.adapter_dir), adapter_tensors(second.adapter_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run_inputs, tmp_path) -> None:
    with pytest.raises(
        TrainingDiverged, match=r"became (nan|inf) at step \d+\. Last good checkpoint: .*step-0000000"
    ):
        _train(
            tiny_run_inputs,
            tmp_path / "nan",
            learning_rate=1e25,
            save_steps=1,
            warmup_steps=0,
            max_grad_norm=0,
        )
    good = latest_checkpoint(tmp_path / "nan" / "checkpoints")
    assert good is not None
    assert all(torch.isfinite(t).all() for t in adapter_tensors(good / "adapter").values())
    assert not (tmp_path / "nan" / "adapter").exists()


def test_fresh_run_does_not_overwrite_checkpoints(tiny_run_inputs, tmp_path) -> None:
    _train(tiny_run_inputs, tmp_path / "run", max_steps=2)
    with pytest.raises(CheckpointError, match="--resume to continue"):
        _train(tiny_run_inputs, tmp_path / "run", max_steps=2)
    with pytest.raises(CheckpointError, match="Resume with the same data, batch sizes"):
        _train(tiny_run_inputs, tmp_path / "run", max_steps=3, resume=True)
    _train(tiny_run_inputs, tmp_path / "run", max_steps=3, overwrite_output_dir=True)
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-00000003"


def test_adapter_loads_in_hugging_face_peft(tiny_run_inputs, tmp_path) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    result = _train(tiny_run_inputs, tmp_path / "run", max_steps=3, use_rslora=True)
    ids = torch.tensor([[5, 17, 30, 42, 8, 9]])
    theirs = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"]), result.adapter_dir
    )
    ours = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"]), result.adapter_dir
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_run_inputs["model"])
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        torch.testing.assert_close(theirs.eval()(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        assert (expected - base(input_ids=ids).logits).abs().max() > 1e-3  # the adapter does something


@pytest.mark.parametrize("method", ["dora", "adalora", "adapter"])
def test_other_methods_train_and_resume_exactly(method, tiny_run_inputs, tmp_path) -> None:
    """Each method trains, and resuming from a mid-run checkpoint (AdaLoRA: with its allocator) is exact."""
    import shutil

    settings = dict(
        method=method, max_steps=8, save_steps=3, save_total_limit=3, eval_steps=0, lora_dropout=0.1
    )
    full = _train(tiny_run_inputs, tmp_path / "full", **settings)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        tmp_path / "full" / "checkpoints" / "step-00000003", resumed_dir / "checkpoints" / "step-00000003"
    )
    resumed = _train(tiny_run_inputs, resumed_dir, resume=True, **settings)
    a, b = adapter_tensors(full.adapter_dir), adapter_tensors(resumed.adapter_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.summary["eval_loss_end"] < full.summary["eval_loss_start"]
    if method == "adalora":  # the allocator's importance EMAs (still kept at step 6 of 8) continue exactly
        from safetensors.torch import load_file

        final = [
            load_file(str(d / "checkpoints" / "step-00000006" / "method.safetensors"))
            for d in (tmp_path / "full", resumed_dir)
        ]
        assert final[0].keys() == final[1].keys() and len(final[0]) > 0
        assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_gradient_checkpointing_gives_the_same_adapter(tiny_run_inputs, tmp_path) -> None:
    plain = _train(tiny_run_inputs, tmp_path / "plain", max_steps=3, learning_rate=1e-3)
    checkpointed = _train(
        tiny_run_inputs, tmp_path / "gc", max_steps=3, learning_rate=1e-3, gradient_checkpointing=True
    )
    a, b = adapter_tensors(plain.adapter_dir), adapter_tensors(checkpointed.adapter_dir)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


def test_loraplus_ratio_reaches_the_optimizer(tiny_run_inputs, tmp_path) -> None:
    _train(
        tiny_run_inputs,
        tmp_path / "run",
        max_steps=2,
        loraplus_lr_ratio=8,
        lr_scheduler="constant",
        warmup_steps=0,
    )
    index = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "optimizer.json").read_text())
    lr_of = {name: group["lr"] for group in index["param_groups"] for name in group["params"]}
    assert {lr for name, lr in lr_of.items() if ".lora_A." in name} == {1e-2}
    assert {lr for name, lr in lr_of.items() if ".lora_B." in name} == {8e-2}


def test_qlora_and_packing_runs(tiny_run_inputs, tmp_path) -> None:
    result = _train(
        tiny_run_inputs, tmp_path / "q", max_steps=3, load_in_4bit=True, compute_dtype="fp32", packing=True
    )
    assert (
        result.summary["steps"] == 3 and result.summary["eval_loss_end"] < result.summary["eval_loss_start"]
    )


def test_qlora_with_loftq_init_trains_and_reloads(tiny_run_inputs, tmp_path) -> None:
    """init_lora_weights: loftq with load_in_4bit: the adapted layers become LoftQ's 4-bit layers, the run
    trains, and the saved adapter reloads (LoftQ re-runs on the full-precision base) to the same function."""
    from lorakit.quant import quantized_layers
    from lorakit.train.inference import load_for_inference

    flags = dict(
        max_steps=3, load_in_4bit=True, compute_dtype="fp32", init_lora_weights="loftq", loftq_iter=2
    )
    result = _train(tiny_run_inputs, tmp_path / "q", **flags)
    assert result.summary["eval_loss_end"] < result.summary["eval_loss_start"]
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {
        "loftq_bits": 4,
        "loftq_iter": 2,
    }
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    logits = []
    for _ in range(2):
        model, _ = load_for_inference(
            str(tiny_run_inputs["model"]), str(result.adapter_dir), load_in_4bit=True
        )
        assert any(".base_layer" in name for name in quantized_layers(model))  # LoftQ's 4-bit bases
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)


def test_bad_data_stops_before_training(tiny_run_inputs, tmp_path) -> None:
    from lorakit.data import DatasetError

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(DatasetError, match=r"broken\.jsonl.*line 2|line 2.*broken\.jsonl"):
        _train(tiny_run_inputs, tmp_path / "run", dataset=str(broken))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError):
        _train(tiny_run_inputs, tmp_path / "run", dataset=str(empty))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_compiled_training_follows_the_eager_run(tiny_run_inputs, tmp_path, monkeypatch) -> None:
    """``compile: true`` traces the plain LoRA formula with no graph break; with dropout 0 the run is the same.

    Compared through the losses: Adam moves near-zero gradient components by about lr whatever their size,
    so adapters trained from gradients equal only to float rounding can differ element-wise by up to 2 lr.
    """
    if compile_backend() != "inductor":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=compile_backend()))
    kwargs = dict(max_steps=4, learning_rate=2e-2, lora_dropout=0.0, packing=True, eval_steps=0)
    eager = _train(tiny_run_inputs, tmp_path / "eager", **kwargs)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = _train(tiny_run_inputs, tmp_path / "compiled", compile=True, **kwargs)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # one whole graph
    losses = [
        [r["loss"] for r in read_metrics(run.output_dir / "metrics.jsonl") if "loss" in r]
        for run in (eager, compiled)
    ]
    assert len(losses[0]) == 4 and losses[0][-1] < losses[0][0] - 0.05  # it learned
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert compiled.summary["eval_loss_end"] == pytest.approx(eager.summary["eval_loss_end"], abs=1e-4)


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_allocator_policy_follows_the_config(
    keep, tiny_run_inputs, tmp_path, monkeypatch, capsys
) -> None:
    import lorakit.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(loop, "restore_defaults", lambda: calls.append("restore") or True)
    _train(tiny_run_inputs, tmp_path / "run", max_steps=1, eval_steps=0, cpu_keep_freed_memory=keep)
    assert calls == (["keep", "restore"] if keep else [])  # set for the run, undone after it
    assert ("freed memory is kept" in capsys.readouterr().out) == keep


def test_pissa_niter_run_reloads_to_the_same_model_whatever_the_global_seed(tiny_run_inputs, tmp_path) -> None:
    """pissa_niter_K draws a randomized SVD; reloading re-runs it, so the trainer and the inference commands run
    it from one fixed generator state: two loads after different seeds give the same model, and the caller's
    generator is left as it was."""
    from lorakit.train.inference import load_for_inference

    result = _train(tiny_run_inputs, tmp_path / "p", max_steps=2, init_lora_weights="pissa_niter_2")
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    logits = []
    for seed in (0, 1234):
        torch.manual_seed(seed)
        model, _ = load_for_inference(str(tiny_run_inputs["model"]), str(result.adapter_dir))
        assert torch.equal(torch.random.get_rng_state(), torch.manual_seed(seed).get_state())
        with torch.no_grad():
            logits.append(model(ids).logits)
    torch.testing.assert_close(logits[0], logits[1], atol=0, rtol=0)

"""The train, merge, eval, generate and chat commands, run in-process through ``lorakit.cli.main``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.cli import main
from lorakit.train.config import TrainConfig

from ..train.helpers import qa_records, save_tiny_model, tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny base model folder, a non-trivial adapter for it and a small dataset."""
    root = tmp_path_factory.mktemp("cli")
    model_dir = save_tiny_model(root / "model")
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(base, config).save_pretrained(root / "adapter")
    return {
        "model": model_dir,
        "adapter": root / "adapter",
        "data": write_jsonl(root / "d.jsonl", qa_records(5)),
        "root": root,
    }


def test_print_config_merges_file_and_flags(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 4\nlearning_rate: 5e-4\n")
    assert main(["train", str(path), "--lora.r", "12", "--use_dora", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert (
        "lora_r: 12\n" in printed and "learning_rate: 0.0005\n" in printed and "use_dora: true\n" in printed
    )
    assert f"seed: {TrainConfig().seed}\n" in printed


def test_unknown_flag_and_bad_value_are_clear_errors(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--learning-rat", "1e-3"])
    assert exit_info.value.code == 2
    assert "unknown option '--learning-rat'. Did you mean 'learning_rate'?" in capsys.readouterr().err
    assert main(["train", "--lora_r", "big", "--print-config"]) == 2
    assert "'lora_r' must be int, got 'big'" in capsys.readouterr().err
    path = tmp_path / "c.yaml"
    path.write_text("lora_alpah: 8\n")
    assert main(["train", str(path)]) == 2
    assert (
        "Unknown key 'lora_alpah' in " in (err := capsys.readouterr().err)
        and "Did you mean 'lora_alpha'?" in err
    )


def test_merge_gives_same_logits_with_plain_transformers(tiny_assets, tmp_path, capsys) -> None:
    out = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tiny_assets["adapter"]), "--out", str(out)]) == 0
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), tiny_assets["adapter"]
    )
    base = AutoModelForCausalLM.from_pretrained(tiny_assets["model"]).eval()
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        assert (expected - base(input_ids=ids).logits).abs().max() > 1e-2
    assert main(["merge", "--adapter", str(tiny_assets["adapter"]), "--out", str(out)]) == 1  # not empty
    assert "is not empty" in capsys.readouterr().err


def test_eval_reports_mean_token_loss(tiny_assets, capsys) -> None:
    from lorakit.data import load_records, tokenize_records

    args = ["eval", "--adapter", str(tiny_assets["adapter"]), "--dataset", str(tiny_assets["data"]), "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Independent computation: one example at a time, no padding, HF-style shifted cross-entropy.
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), tiny_assets["adapter"]
    )
    examples = tokenize_records(
        load_records(str(tiny_assets["data"])), tiny_tokenizer(), max_length=1024
    ).examples
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            logits = model.eval()(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(example["labels"][1:])
            total += F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    assert result["tokens"] == count and result["examples"] == 5
    assert result["loss"] == pytest.approx(total / count, abs=1e-5)
    assert result["perplexity"] == pytest.approx(torch.tensor(total / count).exp().item(), rel=1e-5)


def test_generate_streams_the_greedy_continuation(tiny_assets, capsys) -> None:
    args = [
        "generate",
        "--adapter",
        str(tiny_assets["adapter"]),
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
    ]
    assert main([*args, "Reverse apple"]) == 0
    streamed = capsys.readouterr().out
    tokenizer = tiny_tokenizer()
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_assets["model"]), tiny_assets["adapter"]
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse apple"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    output = model.eval().generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
    assert expected.strip() and streamed.strip() == expected.strip()


def test_chat_keeps_history_and_quits(tiny_assets, capsys, monkeypatch) -> None:
    lines = iter(["hello", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    args = ["chat", "--model", str(tiny_assets["model"]), "--temperature", "0", "--max-new-tokens", "3"]
    assert main(args) == 0
    assert capsys.readouterr().out.count("assistant> ") == 2


def test_missing_adapter_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["generate", "--adapter", str(tmp_path / "nope"), "hi"]) == 1
    assert "not an adapter folder" in capsys.readouterr().err


def test_train_reports_data_and_model_errors_without_traceback(tiny_assets, tmp_path, capsys) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{not json}\n')
    common = ["--output_dir", str(tmp_path / "out"), "--device", "cpu"]
    assert main(["train", "--model", str(tiny_assets["model"]), "--dataset", str(broken), *common]) == 1
    err = capsys.readouterr().err
    assert "lorakit train: error: " in err and "broken.jsonl, line 2" in err and "Traceback" not in err
    assert main(["train", "--model", str(tmp_path / "no-such-model"), *common]) == 1
    assert "lorakit train: error: " in capsys.readouterr().err


def test_train_cli_runs_and_resumes(tiny_assets, tmp_path, capsys) -> None:
    flags = [
        "--model",
        str(tiny_assets["model"]),
        "--dataset",
        str(tiny_assets["data"]),
        "--eval_split",
        "0.2",
    ]
    flags += [
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--micro_batch_size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(["train", *flags]) == 0
    out = capsys.readouterr().out
    assert "held-out loss" in out and "before:" in out and "after:" in out
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["train", *flags, "--resume"]) == 0  # already finished: resumes at step 2 and ends
    assert "continuing from" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2]  # the final evaluation is not repeated


def test_merge_of_a_bottleneck_adapter_is_a_clear_error(tiny_assets, tmp_path, capsys) -> None:
    from lorakit import AdapterConfig

    base = AutoModelForCausalLM.from_pretrained(tiny_assets["model"])
    get_peft_model(base, AdapterConfig(bottleneck_size=4)).save_pretrained(tmp_path / "bottleneck")
    code = main(["merge", "--adapter", str(tmp_path / "bottleneck"), "--out", str(tmp_path / "merged")])
    assert code == 1
    assert "cannot be merged into the base weights" in capsys.readouterr().err
    assert not (tmp_path / "merged" / "model.safetensors").exists()

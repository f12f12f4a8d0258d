"""Progress bars of evaluation and sample generation: policy (rank 0, terminal only) and their counts."""

from __future__ import annotations

import io

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import main
from lorakit.train import evaluation
from lorakit.train.samples import TokenProgress, before_after

from ..train.helpers import qa_records, save_tiny_model, tiny_tokenizer, write_jsonl


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stream", "environ", "shown"),
    [
        (_Terminal(), {}, True),
        (_Terminal(), {"RANK": "0"}, True),
        (_Terminal(), {"RANK": "1"}, False),
        (io.StringIO(), {}, False),
        (object(), {}, False),
    ],
)
def test_show_progress_policy(stream, environ, shown) -> None:
    assert evaluation.show_progress(stream, environ) is shown


def test_token_progress_counts_generated_tokens_and_fills_the_budget() -> None:
    class Bar:
        n = 0

        def update(self, count: int) -> None:
            self.n += count

    bar = Bar()
    streamer = TokenProgress(bar, budget=5)
    streamer.put(torch.tensor([[7, 8, 9, 10]]))  # the prompt: not counted
    streamer.put(torch.tensor([1]))
    streamer.put(torch.tensor([2]))
    assert bar.n == 2
    streamer.end()  # stopped at EOS after 2 of 5 tokens
    assert bar.n == 5


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("progress")
    model_dir = save_tiny_model(root / "model")
    return {"model": model_dir, "data": write_jsonl(root / "d.jsonl", qa_records(6))}


def test_eval_draws_a_bar_only_when_the_policy_allows(assets, monkeypatch, capsys) -> None:
    argv = ["eval", "--model", str(assets["model"]), "--dataset", str(assets["data"]), "--batch_size", "2"]
    assert main(argv) == 0
    assert "eval:" not in capsys.readouterr().err  # stderr is not a terminal under pytest
    monkeypatch.setattr(evaluation, "show_progress", lambda *args: True)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "eval:" in err and "/3" in err  # 6 examples in batches of 2


def test_sample_generation_draws_a_token_bar(assets, capsys) -> None:
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(assets["model"]), LoraConfig(r=2, target_modules=["q_proj"])
    )
    results = before_after(model, tiny_tokenizer(), ["Reverse apple", "Reverse stone"], 4, progress=True)
    assert len(results) == 2
    err = capsys.readouterr().err
    assert "samples:" in err and "/16" in err  # 2 prompts x (before + after) x 4 tokens

"""--output_dir of eval / generate: result files through the trainer's one JSON writer."""

from __future__ import annotations

import json

from lorakit.cli import main

from ..train.helpers import qa_records, save_tiny_model, write_jsonl


def test_eval_and_generate_write_their_results_into_a_new_folder(tmp_path, capsys) -> None:
    model = save_tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "d.jsonl", qa_records(3))
    out = tmp_path / "results" / "run1"  # neither folder exists yet
    flags = ["--model", str(model), "--device", "cpu", "--output_dir", str(out)]
    assert main(["eval", *flags, "--dataset", str(data), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert json.loads((out / "eval.json").read_text(encoding="utf-8")) == printed
    assert main(["generate", *flags, "--raw", "--max_new_tokens", "2", "Reverse café"]) == 0
    saved = (out / "generate.json").read_text(encoding="utf-8")
    assert json.loads(saved)["prompt"] == "Reverse café" and "café" in saved and saved.endswith("\n")

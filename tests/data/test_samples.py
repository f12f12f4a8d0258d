"""The bundled sample dataset: reproducible, alpaca, held-out entities, short, masked correctly on SmolLM2."""

from __future__ import annotations

import json

from lorakit.data import load_records, render_chat, sample_dataset, tokenize_records
from lorakit.data.samples import make_samples
from tests.data.helpers import target_text
from tests.models.real_smollm2 import smollm2_tokenizer


def test_files_are_exactly_what_the_generator_writes():
    train, held = make_samples.build()
    train_path, eval_path = sample_dataset()
    assert [json.loads(line) for line in train_path.read_text().splitlines()] == train
    assert [json.loads(line) for line in eval_path.read_text().splitlines()] == held
    assert (len(train), len(held)) == (300, 40)


def test_records_are_alpaca_in_the_pirate_shape_and_eval_questions_are_unseen():
    train_path, eval_path = sample_dataset()
    train, held = load_records(str(train_path)), load_records(str(eval_path))
    for record in train + held:
        assert set(record) == {"instruction", "input", "output"}
        assert record["output"].startswith("Arr! ")
    train_questions = {(r["instruction"], r["input"]) for r in train}
    assert not train_questions & {(r["instruction"], r["input"]) for r in held}
    assert len(train_questions) == len(train)
    assert sum(bool(r["input"]) for r in train) >= 40  # the translation task uses the input field


def test_sample_tokens_on_smollm2_are_short_and_masked_to_the_answer():
    tokenizer = smollm2_tokenizer()
    train_path, _ = sample_dataset()
    records = load_records(str(train_path))
    result = tokenize_records(records, tokenizer, max_length=1024, source=str(train_path))
    assert result.stats["num_truncated"] == 0 and result.stats["num_without_target"] == 0
    assert max(len(e["input_ids"]) for e in result.examples) <= 128
    for record, example in zip(records[:50], result.examples):
        assert target_text(tokenizer, example) == record["output"] + "<|im_end|>\n"
        user = record["instruction"] + (f"\n\n{record['input']}" if record["input"] else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]
        # segment-wise tokenization equals tokenizing the whole rendered conversation at once
        assert (
            example["input_ids"]
            == tokenizer(render_chat(tokenizer, messages), add_special_tokens=False)["input_ids"]
        )

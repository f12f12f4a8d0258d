"""Token ids and labels: -100 exactly on prompt tokens, the answers (and end-of-turn marker) as targets."""

from __future__ import annotations

import pytest

from lorakit.data import IGNORE_INDEX, DatasetError, count_targets, render_chat, tokenize_records
from tests.data.helpers import FORGETFUL, char_tokenizer, target_text

ALPACA = {"instruction": "Capital of France?", "input": "", "output": "Arr! Paris, matey!"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be a pirate."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Ahoy!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Fair winds!"},
    ]
}


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_alpaca_labels_are_minus_100_exactly_on_the_prompt():
    tokenizer = char_tokenizer()
    example = tokenize_records([ALPACA], tokenizer).examples[0]
    messages = [{"role": "user", "content": ALPACA["instruction"]}]
    prompt = render_chat(tokenizer, messages, add_generation_prompt=True)
    full = render_chat(tokenizer, messages + [{"role": "assistant", "content": ALPACA["output"]}])
    assert prompt == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert example["input_ids"] == _ids(tokenizer, full)
    boundary = len(_ids(tokenizer, prompt))
    assert example["labels"][:boundary] == [IGNORE_INDEX] * boundary
    assert example["labels"][boundary:] == example["input_ids"][boundary:]
    assert target_text(tokenizer, example) == "Arr! Paris, matey!<|im_end|>\n"


def test_multi_turn_trains_on_every_answer_and_masks_system_and_user_turns():
    tokenizer = char_tokenizer()
    example = tokenize_records([CHAT], tokenizer).examples[0]
    assert target_text(tokenizer, example) == "Ahoy!<|im_end|>\nFair winds!<|im_end|>\n"
    masked = tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX]
    )
    assert masked == (
        "<|im_start|>system\nBe a pirate.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
    )


def test_sharegpt_masks_like_messages():
    tokenizer = char_tokenizer()
    turns = [
        {"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
        for m in CHAT["messages"]
    ]
    sharegpt = tokenize_records([{"conversations": turns}], tokenizer).examples[0]
    assert sharegpt == tokenize_records([CHAT], tokenizer).examples[0]


def test_train_on_prompt_makes_every_token_a_target():
    tokenizer = char_tokenizer()
    result = tokenize_records([ALPACA, CHAT], tokenizer, fmt="auto", train_on_prompt=True)
    for example in result.examples:
        assert example["labels"] == example["input_ids"]
    assert result.stats["num_trainable_tokens"] == sum(len(e["input_ids"]) - 1 for e in result.examples)


def test_text_rows_train_on_all_tokens_and_end_with_eos():
    tokenizer = char_tokenizer(add_bos=True)
    example = tokenize_records([{"text": "Yo ho"}], tokenizer).examples[0]
    assert example["input_ids"] == [tokenizer.bos_token_id, *_ids(tokenizer, "Yo ho"), tokenizer.eos_token_id]
    assert example["labels"] == example["input_ids"]


def test_bos_is_prepended_once_when_the_tokenizer_adds_one():
    tokenizer = char_tokenizer(add_bos=True)
    example = tokenize_records([ALPACA], tokenizer).examples[0]
    assert example["input_ids"][0] == tokenizer.bos_token_id and example["labels"][0] == IGNORE_INDEX
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1
    assert example["input_ids"][1:] == tokenize_records([ALPACA], char_tokenizer()).examples[0]["input_ids"]


def test_plain_template_without_chat_template():
    tokenizer = char_tokenizer(chat_template=None)
    record = dict(ALPACA, system="Talk like a pirate.", input="Answer briefly.")
    example = tokenize_records([record], tokenizer).examples[0]
    assert tokenizer.decode(example["input_ids"]) == (
        "### System:\nTalk like a pirate.\n\n### User:\nCapital of France?\n\nAnswer briefly.\n\n"
        "### Assistant:\nArr! Paris, matey!<|im_end|>\n\n"
    )
    assert target_text(tokenizer, example) == "Arr! Paris, matey!<|im_end|>"
    prompt = render_chat(tokenizer, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert prompt == "### User:\nHi\n\n### Assistant:\n"


def test_template_that_rewrites_earlier_turns_trains_on_the_last_answer_only():
    tokenizer = char_tokenizer(chat_template=FORGETFUL)
    example = tokenize_records([CHAT], tokenizer).examples[0]
    assert "(omitted)" in tokenizer.decode(example["input_ids"])
    assert target_text(tokenizer, example) == "Fair winds!<|im_end|>\n"


def test_truncation_is_applied_and_counted():
    tokenizer = char_tokenizer()
    records = [ALPACA, {"instruction": "Hi", "output": "Yo"}]
    full = tokenize_records(records, tokenizer)
    long_length = len(full.examples[0]["input_ids"])
    short_length = len(full.examples[1]["input_ids"])
    assert short_length < long_length
    limit = short_length + 1
    cut = tokenize_records(records, tokenizer, max_length=limit)
    assert cut.stats["num_truncated"] == 1 and full.stats["num_truncated"] == 0
    assert cut.examples[0]["input_ids"] == full.examples[0]["input_ids"][:limit]
    assert cut.examples[0]["labels"] == full.examples[0]["labels"][:limit]
    assert cut.examples[1] == full.examples[1]


def test_stats_count_targets_after_the_causal_shift():
    tokenizer = char_tokenizer()
    result = tokenize_records([ALPACA, CHAT], tokenizer)
    answers = len("Arr! Paris, matey!<|im_end|>\n") - len("<|im_end|>") + 1
    answers += len("Ahoy!\n") + 1 + len("Fair winds!\n") + 1
    assert result.stats["num_trainable_tokens"] == answers
    assert result.stats["num_examples"] == 2 and result.stats["format"] == "mixed"
    assert result.stats["num_tokens"] == sum(len(e["input_ids"]) for e in result.examples)
    assert count_targets([5, 6, IGNORE_INDEX, 7]) == 2  # position 0 is never a target


def test_empty_dataset_is_an_error():
    with pytest.raises(DatasetError, match=r"train\.jsonl: the dataset is empty"):
        tokenize_records([], char_tokenizer(), source="train.jsonl")


def test_no_trainable_tokens_after_truncation_is_an_error():
    tokenizer = char_tokenizer()
    with pytest.raises(DatasetError, match="no token is left to train on.*max_length=10"):
        tokenize_records([ALPACA], tokenizer, max_length=10, source="d.jsonl")
    # the same limit with train_on_prompt leaves targets
    assert (
        tokenize_records([ALPACA], tokenizer, max_length=10, train_on_prompt=True).stats[
            "num_trainable_tokens"
        ]
        == 9
    )


def test_examples_without_target_are_counted():
    tokenizer = char_tokenizer()
    long_prompt = {"instruction": "x" * 80, "output": "y"}
    result = tokenize_records([ALPACA, long_prompt], tokenizer, max_length=60)
    assert result.stats["num_without_target"] == 1

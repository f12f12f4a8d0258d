"""``lorakit eval --dataset FILE [--model M] [--adapter DIR]``: held-out loss and perplexity.

loss = (sum of next-token cross-entropies over trained tokens) / (number of trained tokens),
perplexity = exp(loss); prompt tokens are excluded as in training unless ``--train-on-prompt``.
"""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="loss and perplexity of a model + adapter on a dataset")
    parser.add_argument(
        "--dataset", default=None, help="data file (default: the bundled sample's eval split)"
    )
    parser.add_argument(
        "--model", default=None, help="base or merged model (default: adapter's base / SmolLM2)"
    )
    parser.add_argument("--adapter", default=None, help="adapter folder")
    parser.add_argument("--format", default="auto", help="auto|alpaca|messages|sharegpt|text")
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-on-prompt", action="store_true", help="also score prompt tokens")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.data import DatasetError, load_records, sample_dataset, tokenize_records
    from lorakit.models import ModelLoadError
    from lorakit.train.evaluation import loss_sum_and_tokens
    from lorakit.train.inference import load_for_inference
    from lorakit.train.metrics import perplexity

    try:
        source = args.dataset or str(sample_dataset()[1])
        model, tokenizer = load_for_inference(args.model, args.adapter, device=args.device)
        records = load_records(source)
        data = tokenize_records(
            records,
            tokenizer,
            fmt=args.format,
            max_length=args.max_seq_length,
            train_on_prompt=args.train_on_prompt,
            source=source,
        )
    except (DatasetError, FileNotFoundError, ValueError, OSError, ModelLoadError) as error:
        print(f"lorakit eval: error: {error}", file=sys.stderr)
        return 1
    loss_sum, tokens = loss_sum_and_tokens(
        model, data.examples, tokenizer.pad_token_id, batch_size=args.batch_size
    )
    loss = loss_sum / max(tokens, 1)
    result = {
        "dataset": source,
        "examples": len(data.examples),
        "tokens": tokens,
        "loss": loss,
        "perplexity": perplexity(loss),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{source}: {len(data.examples)} examples, {tokens:,} tokens, loss {loss:.4f}, perplexity {perplexity(loss):.2f}"
        )
    return 0

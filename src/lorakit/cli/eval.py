"""``lorakit eval --dataset FILE [--model M] [--adapter DIR]``: held-out loss and perplexity.

loss = (sum of next-token cross-entropies over trained tokens) / (number of trained tokens),
perplexity = exp(loss); prompt tokens are excluded as in training unless ``--train_on_prompt``.
``--max_seq_length`` may not exceed the model's positions (max_position_embeddings), as in training; by
default it is 1024, or the model's positions if fewer.
With ``--output_dir`` the result is also written to ``DIR/eval.json``.
Exit code 1, with a one-line message and no result, when the model or adapter holds NaN or infinite
weights (e.g. saved by a diverged run) or the loss comes out NaN or infinite.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorakit.cli.options import (
    add_command,
    add_device_options,
    add_option,
)
from lorakit.cli.threads import pin_threads

DEFAULT_MAX_SEQ_LENGTH = 1024


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "eval", "loss and perplexity of a model + adapter on a dataset", __doc__)
    add_option(
        parser,
        "dataset",
        default=None,
        metavar="FILE",
        help="data file (default: the bundled sample's eval split)",
    )
    add_option(parser, "model", default=None, help="base or merged model (default: adapter's base / SmolLM2)")
    add_option(parser, "adapter", default=None, metavar="DIR", help="adapter folder")
    add_option(
        parser, "dataset_format", default="auto", metavar="FORMAT", help="auto|alpaca|messages|sharegpt|text"
    )
    add_option(
        parser,
        "max_seq_length",
        type=int,
        metavar="N",
        default=None,
        help=f"truncate longer sequences (default: {DEFAULT_MAX_SEQ_LENGTH}, or the model's positions if fewer; "
        "more than the model's positions is an error)",
    )
    add_option(
        parser, "micro_batch_size", type=int, metavar="N", default=8, help="sequences per forward pass"
    )
    add_option(parser, "train_on_prompt", action="store_true", help="also score prompt tokens")
    add_device_options(parser)
    add_option(parser, "output_dir", default=None, metavar="DIR", help="also write DIR/eval.json")
    add_option(parser, "json", action="store_true", help="print one JSON object")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math

    from lorakit.data import DatasetError, load_records, sample_dataset, tokenize_records
    from lorakit.models import ModelLoadError
    from lorakit.train.config_checks import check_max_seq_length, model_positions
    from lorakit.train.divergence import describe_non_finite
    from lorakit.train.evaluation import loss_sum_and_tokens
    from lorakit.train.inference import load_for_inference
    from lorakit.train.metrics import perplexity

    pin_threads()
    try:
        source = args.dataset or str(sample_dataset()[1])
        model, tokenizer = load_for_inference(
            args.model, args.adapter, device=args.device, dtype=args.precision
        )
        model_config = getattr(model, "config", None)
        max_length = args.max_seq_length
        if max_length is None:
            max_length = min(DEFAULT_MAX_SEQ_LENGTH, model_positions(model_config) or DEFAULT_MAX_SEQ_LENGTH)
        check_max_seq_length(max_length, model_config)  # as lorakit train: a ConfigError, one line
        records = load_records(source)
        data = tokenize_records(
            records,
            tokenizer,
            fmt=args.dataset_format,
            max_length=max_length,
            train_on_prompt=args.train_on_prompt,
            source=source,
        )
    except (DatasetError, FileNotFoundError, ValueError, OSError, ModelLoadError) as error:
        print(f"lorakit eval: error: {error}", file=sys.stderr)
        return 1
    broken = describe_non_finite(model)
    if broken is not None:
        where = f"the adapter {args.adapter}" if args.adapter else "the model"
        print(
            f"lorakit eval: error: {where} is unusable: {broken}; it was saved from a diverged run, "
            "so use an earlier checkpoint or the run's best/ adapter.",
            file=sys.stderr,
        )
        return 1
    loss_sum, tokens = loss_sum_and_tokens(
        model, data.examples, tokenizer.pad_token_id, batch_size=args.micro_batch_size
    )
    loss = loss_sum / max(tokens, 1)
    if not math.isfinite(loss):
        print(
            f"lorakit eval: error: the loss on {source} is {loss}: the model's outputs overflow "
            f"(weights too large for {args.precision}?); try --precision fp32 or another checkpoint.",
            file=sys.stderr,
        )
        return 1
    result = {
        "dataset": source,
        "examples": len(data.examples),
        "tokens": tokens,
        "loss": loss,
        "perplexity": perplexity(loss),
    }
    if args.output_dir:
        from lorakit.train.checkpoint import write_json

        write_json(Path(args.output_dir) / "eval.json", result, mkdir=True)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{source}: {len(data.examples)} examples, {tokens:,} tokens, loss {loss:.4f}, "
            f"perplexity {perplexity(loss):.2f}"
        )
    return 0

"""``lorakit export --gguf ADAPTER_DIR OUT.gguf``: the adapter as a llama.cpp LoRA GGUF (for llama.cpp and Ollama).

  lorakit export --gguf ADAPTER_DIR adapter.gguf           a LoRA adapter GGUF, used with the base GGUF:
                                                           llama-cli -m base.gguf --lora adapter.gguf
  lorakit export --gguf --merged ADAPTER_DIR model.gguf    the base GGUF with the adapter merged in

The adapter GGUF is what llama.cpp's convert_lora_to_gguf.py writes: general.architecture of the base,
general.type = adapter, adapter.type = lora, adapter.lora.alpha, and per adapted weight the tensors
<name>.weight.lora_a (r x in) and <name>.weight.lora_b (out x r), named as llama.cpp names the base's tensors
(blk.0.attn_q.weight, ...). rsLoRA's scaling alpha / sqrt(r) is written as adapter.lora.alpha = alpha * sqrt(r),
since llama.cpp scales by alpha / r.

--merged needs the base as a GGUF file (the embedded SmolLM2 is one): its metadata, tokenizer and unadapted
tensors are copied as they are; each adapted weight becomes W + s B A (dequantized if W was quantized) in
--outtype. For a Hugging Face base: lorakit merge, then llama.cpp's convert_hf_to_gguf.py.

Refused, with the reason: DoRA and AdaLoRA as adapter GGUFs (use --merged), bottleneck adapters,
modules_to_save heads, trained biases, PiSSA / OLoRA / LoftQ factors, LoRA on tied embeddings. See docs/export.md.
"""

from __future__ import annotations

import argparse
import sys

from lorakit.cli.options import add_command, add_option


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "export", "export an adapter for llama.cpp / Ollama (GGUF LoRA or merged GGUF)", __doc__
    )
    parser.add_argument(
        "adapter_dir", metavar="ADAPTER_DIR", help="adapter folder (adapter_config.json + weights)"
    )
    parser.add_argument("output", metavar="OUT.gguf", help="the GGUF file to write")
    add_option(
        parser, "gguf", action="store_true", help="write GGUF (llama.cpp's format; the only format for now)"
    )
    add_option(
        parser,
        "merged",
        action="store_true",
        help="write the base GGUF with the adapter merged in, instead of a LoRA adapter GGUF",
    )
    add_option(
        parser,
        "outtype",
        default="f32",
        choices=("f32", "f16"),
        help="dtype of the LoRA tensors, or of the merged weights with --merged (default: f32)",
    )
    add_option(
        parser,
        "model",
        default=None,
        help="base model: a .gguf file, a folder or a Hub id (default: the adapter's recorded base)",
    )
    add_option(parser, "force", action="store_true", help="overwrite OUT.gguf if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lorakit.export import export_gguf_adapter, export_gguf_merged

    if not args.gguf:
        print(
            "lorakit export: error: choose the output format: --gguf (llama.cpp / Ollama; the only one for now).",
            file=sys.stderr,
        )
        return 2
    export = export_gguf_merged if args.merged else export_gguf_adapter
    report = export(args.adapter_dir, args.output, outtype=args.outtype, model=args.model, force=args.force)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.merged:
        print(
            f"merged model written to {report.path} ({report.arch}, {len(report.tensors)} weights merged, "
            f"{report.outtype}; the other tensors as in the base)"
        )
    else:
        print(
            f"LoRA adapter written to {report.path} ({report.arch}, {len(report.tensors)} weights, "
            f"alpha {report.alpha:g}, {report.outtype})"
        )
    return 0

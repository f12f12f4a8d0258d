"""``lorakit inspect``: singular-value spectra and effective ranks of a saved adapter's updates,
or (``--compare``) the subspace similarity of two adapters (LoRA paper, section 7.2)."""

from __future__ import annotations

import argparse
import json
import sys

from lorakit.cli.options import SPELLING_NOTE, HelpFormatter, add_option
from lorakit.lowrank.adapter_files import AdapterReadError
from lorakit.lowrank.analysis import SIDES, AdapterReport, ComparisonReport, compare_adapters, inspect_adapter
from lorakit.lowrank.spectrum import ENERGY_THRESHOLDS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="rank analysis of an adapter: spectra of scaling*B@A, effective ranks, or --compare two adapters",
        description=(
            "For every adapted layer: the update delta = scaling * B @ A, its singular values, the number of "
            "singular values holding 90% / 99% of ||delta||_F^2, its stable rank and Frobenius norm. "
            "With --compare, the normalised subspace similarity ||U_i^T V_j||_F^2 / min(i, j) of the two "
            "adapters' top singular directions, per layer (Hu et al. 2021, section 7.2). Reads lorakit and "
            "Hugging Face PEFT adapter folders (LoRA, rsLoRA, DoRA, AdaLoRA). Layers are listed in natural "
            "order (layers.2 before layers.10)."
        ),
        epilog=SPELLING_NOTE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    add_option(parser, "compare", metavar="ADAPTER_B", help="second adapter folder to compare against")
    add_option(parser, "json", action="store_true", help="print machine-readable JSON instead of tables")
    add_option(
        parser, "plot", metavar="PNG", help="write a figure: spectra, or similarity curves with --compare"
    )
    add_option(
        parser,
        "thresholds",
        type=float,
        nargs="+",
        default=list(ENERGY_THRESHOLDS),
        help="energy shares for the effective ranks (default: 0.9 0.99)",
    )
    add_option(
        parser,
        "side",
        choices=SIDES,
        default="input",
        help="with --compare: right (input) or left (output) singular directions (default: input)",
    )
    add_option(
        parser, "show_singular_values", type=int, default=4, metavar="N", help="singular values per row"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    bad = [t for t in args.thresholds if not 0.0 < t <= 1.0]
    if bad:
        print(f"lorakit inspect: error: thresholds must be in (0, 1], got {bad}.", file=sys.stderr)
        return 2
    try:
        if args.compare:
            report = compare_adapters(args.adapter, args.compare, side=args.side)
        else:
            report = inspect_adapter(args.adapter, thresholds=tuple(args.thresholds))
    except AdapterReadError as error:
        print(f"lorakit inspect: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    elif isinstance(report, ComparisonReport):
        print(format_comparison(report))
    else:
        print(format_report(report, args.show_singular_values))
    if args.plot:
        return _write_plot(report, args.plot, quiet=args.json)
    return 0


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_report(report: AdapterReport, shown: int = 4) -> str:
    """The per-layer spectrum table followed by a summary and the layers' notes."""
    thresholds = report.thresholds
    header = [
        "layer",
        "kind",
        "shape",
        "r",
        "scaling",
        "||dW||_F",
        "stable",
        *[f"k@{t:.0%}" for t in thresholds],
    ]
    header.append("singular values")
    rows = []
    for layer in report.layers:
        stats = layer.stats
        values = " ".join(f"{s:.3g}" for s in stats.singular_values[:shown])
        if len(stats.singular_values) > shown:
            values += " ..."
        rows.append(
            [
                layer.name,
                layer.kind,
                f"{layer.shape[0]}x{layer.shape[1]}",
                str(layer.rank),
                f"{layer.scaling:.4g}",
                f"{stats.frobenius_norm:.4g}",
                f"{stats.stable_rank:.2f}",
                *[str(stats.energy_ranks[t]) for t in thresholds],
                values,
            ]
        )
    lines = [
        f"Adapter {report.path} ({report.peft_type}, {len(report.layers)} adapted layers)",
        _table(header, rows),
    ]
    lines.append(_summary(report))
    notes = [f"  {layer.name}: {note}" for layer in report.layers for note in layer.notes]
    if notes:
        lines += ["Notes:", *notes]
    return "\n".join(lines)


def _summary(report: AdapterReport) -> str:
    count = len(report.layers)
    parts = []
    for threshold in report.thresholds:
        ranks = [layer.stats.energy_ranks[threshold] for layer in report.layers]
        parts.append(f"k@{threshold:.0%} mean {sum(ranks) / count:.2f}, max {max(ranks)}")
    total = sum(layer.stats.frobenius_norm**2 for layer in report.layers) ** 0.5
    stored = sum(layer.rank for layer in report.layers) / count
    return f"Summary: mean stored rank {stored:.2f}; " + "; ".join(parts) + f"; total ||dW||_F {total:.4g}"


def format_comparison(report: ComparisonReport) -> str:
    """Per-layer phi(1,1) and phi(k,k) with k = min of the two numerical ranks, plus unmatched layers."""
    header = ["layer", "rank A", "rank B", "phi(1,1)", "k", "phi(k,k)", "note"]
    rows = []
    for layer in report.layers:
        k = min(layer.rank_a, layer.rank_b)
        first = layer.phi(1, 1)
        last = layer.phi(k, k) if k else None
        rows.append(
            [
                layer.name,
                str(layer.rank_a),
                str(layer.rank_b),
                "-" if first is None else f"{first:.4f}",
                str(k),
                "-" if last is None else f"{last:.4f}",
                layer.note,
            ]
        )
    lines = [
        f"Subspace similarity of {report.side} singular directions, phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j)",
        f"A = {report.path_a}",
        f"B = {report.path_b}",
        _table(header, rows),
    ]
    if report.only_in_a:
        lines.append("Only in A: " + ", ".join(report.only_in_a))
    if report.only_in_b:
        lines.append("Only in B: " + ", ".join(report.only_in_b))
    return "\n".join(lines)


def _write_plot(report: AdapterReport | ComparisonReport, path: str, quiet: bool = False) -> int:
    from lorakit.lowrank.plotting import plot_similarity, plot_spectra

    try:
        if isinstance(report, ComparisonReport):
            plot_similarity(
                {layer.name: layer.grid for layer in report.layers if layer.grid is not None}, path
            )
        else:
            spectra = {layer.name: layer.stats.singular_values for layer in report.layers}
            plot_spectra(spectra, path, thresholds=report.thresholds)
    except (OSError, ValueError) as error:
        print(f"lorakit inspect: error: could not write the plot to {path} ({error}).", file=sys.stderr)
        return 1
    # Keep stdout pure JSON under --json.
    print(f"Figure written to {path}", file=sys.stderr if quiet else sys.stdout)
    return 0

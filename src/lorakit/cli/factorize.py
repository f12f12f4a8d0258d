"""``lorakit factorize``: approximate a matrix by a rank-r product with gradient descent.

Without a file it runs the seed example (4x4 matrix, rank 2, lr 0.01, 1000 epochs, seed 666).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from lorakit.cli.options import SPELLING_NOTE, HelpFormatter, add_option
from lorakit.lowrank.factorize import (
    INIT_SCHEMES,
    SEED_EXAMPLE_MATRIX,
    SEED_EXAMPLE_SETTINGS,
    FactorizationError,
    FactorizationResult,
    factorize,
)
from lorakit.lowrank.matrix_io import load_matrix


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "factorize",
        help="approximate a matrix by A @ B of low rank with gradient descent (the seed example by default)",
        description=(
            "Gradient descent on ||W - A B||_F^2 with dL/dA = -2 (W - AB) B^T and dL/dB = -2 A^T (W - AB), "
            "compared with the best rank-r error of the SVD (Eckart-Young). Without MATRIX the 4x4 seed "
            "example is used."
        ),
        epilog=SPELLING_NOTE,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "matrix", nargs="?", help="matrix file: .npy, .csv (comma separated) or .txt (whitespace)"
    )
    settings = SEED_EXAMPLE_SETTINGS
    add_option(parser, "rank", "-r", type=int, default=settings["rank"], help="rank r (default: %(default)s)")
    add_option(
        parser,
        "lr",
        "learning_rate",
        type=float,
        default=settings["lr"],
        help="learning rate (default: %(default)s)",
    )
    add_option(
        parser, "epochs", type=int, default=settings["epochs"], help="gradient steps (default: %(default)s)"
    )
    add_option(parser, "seed", type=int, default=settings["seed"], help="random seed (default: %(default)s)")
    add_option(
        parser,
        "init",
        choices=INIT_SCHEMES,
        default=settings["init"],
        help="normal_zeros: A ~ N(0,1), B = 0 (seed, LoRA); zeros_normal; normal (default: %(default)s)",
    )
    add_option(
        parser, "log_every", type=int, default=100, help="print the loss every N epochs (default: 100)"
    )
    add_option(parser, "plot", metavar="PNG", help="write the loss curve to this image file")
    # Not --precision: across lorakit that names a weight dtype (fp32 | bf16 | fp16).
    add_option(
        parser,
        "digits",
        "print_precision",
        type=int,
        default=8,
        help="digits when printing matrices (default: 8)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        target = SEED_EXAMPLE_MATRIX if args.matrix is None else load_matrix(args.matrix)
        source = "seed example" if args.matrix is None else args.matrix
        print(
            f"Factorizing {source}: shape {np.shape(target)}, rank {args.rank}, lr {args.lr:g}, epochs {args.epochs}"
        )
        result = factorize(
            target,
            rank=args.rank,
            lr=args.lr,
            epochs=args.epochs,
            seed=args.seed,
            init=args.init,
            on_progress=lambda epoch, loss: print(f"Epoch: {epoch} , loss: {loss:.4f}"),
            log_every=args.log_every,
        )
    except FactorizationError as error:
        print(f"lorakit factorize: error: {error}", file=sys.stderr)
        return 2
    _print_summary(result, args.digits)
    if args.plot:
        return _write_plot(result, args.plot)
    return 0


def _print_summary(result: FactorizationResult, digits: int) -> None:
    print(f"Final loss ||W - AB||_F^2: {result.final_loss:.4f}")
    discarded = ", ".join(f"{s:.4f}" for s in result.singular_values[result.rank :]) or "none"
    print(
        f"SVD optimum at rank {result.rank} (sum of squared discarded singular values {discarded}): "
        f"{result.svd_optimum_loss:.4f}"
    )
    verdict = "reached the optimum" if result.reached_optimum(rtol=1e-4) else "is above the optimum"
    print(f"Gap to optimum: {result.gap_to_optimum:.4g} (gradient descent {verdict})")
    with np.printoptions(precision=digits, suppress=True):
        print("Approximation A @ B:")
        print(result.approximation)
        print("Target W:")
        print(result.target)


def _write_plot(result: FactorizationResult, path: str) -> int:
    from lorakit.lowrank.plotting import plot_loss_curve

    try:
        plot_loss_curve(result.loss_history, path, svd_optimum=result.svd_optimum_loss)
    except (OSError, ValueError) as error:
        print(f"lorakit factorize: error: could not write the plot to {path} ({error}).", file=sys.stderr)
        return 1
    print(f"Loss curve written to {path}")
    return 0

"""``lorakit serve``: an OpenAI-compatible HTTP server for a base model and any number of its adapters.

Each request's ``model`` field picks what answers: an adapter's name (``--adapter NAME=DIR``) or the base model's
(``--base_name``, by default ``smollm2`` for the embedded model, else the ``--model`` value). Requests for
different adapters share the same batches. With no arguments: the embedded SmolLM2-135M-Instruct, plus the
adapter of the default ``lorakit train`` run (runs/lorakit/adapter, served as ``lorakit``) when it exists.

Endpoints: /v1/models, /v1/chat/completions, /v1/completions (stream or not), POST /v1/adapters and
DELETE /v1/adapters/NAME (load / unload adapters while serving), /health. See docs/serving.md.

Ctrl-C or SIGTERM stops accepting connections, lets the requests in flight finish, then exits with code 0.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from pathlib import Path

from lorakit.cli.options import add_command, add_device_options, add_option

DEFAULT_RUN_ADAPTER = Path("runs/lorakit/adapter")  # where `lorakit train` puts its adapter by default
DEFAULT_RUN_NAME = "lorakit"
DEFAULT_BASE_NAME = "smollm2"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "serve", "serve a model + adapters over an OpenAI-compatible HTTP API", __doc__
    )
    add_option(parser, "model", default=None, help="base model (default: the adapters' base / SmolLM2)")
    add_option(
        parser,
        "adapter",
        action="append",
        default=None,
        metavar="NAME=DIR",
        help="serve the adapter in DIR as model NAME (repeatable; DIR alone: named after its folder)",
    )
    add_option(parser, "base_name", default=None, metavar="NAME", help="model name of the base model")
    add_option(parser, "host", default="127.0.0.1", help="address to listen on")
    add_option(parser, "port", type=int, default=8000, metavar="N", help="port (0 = any free port)")
    add_option(
        parser, "max_batch_size", type=int, default=16, metavar="N", help="requests decoded together at most"
    )
    add_option(
        parser,
        "max_tokens",
        type=int,
        default=256,
        metavar="N",
        help="completion length when a request gives no max_tokens",
    )
    add_option(
        parser,
        "max_context",
        type=int,
        default=None,
        metavar="N",
        help="prompt + completion tokens per request (default: the model's context)",
    )
    add_device_options(parser)
    add_option(
        parser,
        "log_level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (info shows each request)",
    )
    parser.set_defaults(func=run)


class UsageError(ValueError):
    """A problem with the command line (exit code 2)."""


class AdapterLoadError(Exception):
    """An ``--adapter`` folder that does not load onto the base model."""


def parse_adapters(specs: list[str] | None) -> list[tuple[str, str]]:
    """``[(name, dir)]`` from ``NAME=DIR`` (or ``DIR``) arguments; names must be unique."""
    adapters: list[tuple[str, str]] = []
    for spec in specs or []:
        name, equals, folder = spec.partition("=")
        if not equals:
            name, folder = default_adapter_name(spec), spec
        name, folder = name.strip(), folder.strip()
        if not name or not folder:
            raise UsageError(f"--adapter {spec!r}: expected NAME=DIR.")
        if name in [known for known, _ in adapters]:
            raise UsageError(f"--adapter: the name {name!r} is given twice.")
        adapters.append((name, folder))
    return adapters


def default_adapter_name(folder: str) -> str:
    """The folder's name, or its parent's for a run's ``adapter`` folder (runs/NAME/adapter -> NAME)."""
    path = Path(folder.rstrip("/\\")).resolve()
    return path.parent.name if path.name == "adapter" and path.parent.name else path.name


def served_base_name(model: str | None, explicit: str | None) -> str:
    from lorakit.models import is_default_model

    if explicit:
        return explicit
    if model is None or (is_default_model(model) and not Path(model).exists()):
        return DEFAULT_BASE_NAME
    return model


def plan(args: argparse.Namespace) -> tuple[str | None, list[tuple[str, str]]]:
    """``(base model, [(adapter name, dir)])`` to load, defaults applied."""
    from lorakit.train.inference import resolve_base

    adapters = parse_adapters(args.adapter)
    if not adapters and args.model is None and (DEFAULT_RUN_ADAPTER / "adapter_config.json").is_file():
        adapters = [(DEFAULT_RUN_NAME, str(DEFAULT_RUN_ADAPTER))]
    for _, folder in adapters:
        if not (Path(folder) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{folder} is not an adapter folder (no adapter_config.json).")
    base = resolve_base(args.model, adapters[0][1] if adapters else None)
    return base, adapters


def load_engine(args: argparse.Namespace, base: str | None, adapters: list[tuple[str, str]]):
    """``(engine, tokenizer)``: the base model on its device, every adapter loaded, the engine not started."""
    import torch

    from lorakit.models import load_model, load_tokenizer
    from lorakit.serve.engine import BatchEngine
    from lorakit.train.inference import DTYPES

    device = args.device
    target = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    tokenizer = load_tokenizer(base)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_model(base, dtype=DTYPES[args.precision], device=target)
    model.to(target)
    engine = BatchEngine(model, tokenizer, max_batch_size=args.max_batch_size, max_context=args.max_context)
    for name, folder in adapters:
        try:
            engine.load_adapter(name, folder)
        except Exception as error:  # another base's adapter, an unknown method, unreadable weights, ...
            from lorakit.serve.app import reason_of

            raise AdapterLoadError(
                f"cannot load adapter {name!r} from {folder}: {reason_of(error)}"
            ) from error
    engine.model.to(target)
    return engine, tokenizer


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it), so that port 0 is known before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(error.errno, f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def make_server(app, sock: socket.socket, log_level: str, on_started=None):
    """A ``uvicorn.Server`` whose SIGINT / SIGTERM shut it down gracefully and are not re-raised afterwards.

    uvicorn re-raises the signals it caught once it has stopped (so that the process dies of them); here the
    command still has the engine to drain and exits 0 instead.
    """
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started and on_started is not None:
                on_started()

    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off")
    return Server(config)


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.threads import pin_threads
    from lorakit.models import ModelLoadError

    for name, value in (("max_batch_size", args.max_batch_size), ("max_tokens", args.max_tokens)):
        if value < 1:
            print(f"lorakit serve: error: --{name} must be >= 1, got {value}.", file=sys.stderr)
            return 2
    if not 0 <= args.port <= 65535:
        print(f"lorakit serve: error: --port must be in 0..65535, got {args.port}.", file=sys.stderr)
        return 2
    try:
        base, adapters = plan(args)
    except UsageError as error:
        print(f"lorakit serve: error: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as error:  # not an adapter folder, a broken adapter_config.json
        print(f"lorakit serve: error: {error}", file=sys.stderr)
        return 1
    base_name = served_base_name(base, args.base_name)
    if base_name in [name for name, _ in adapters]:
        print(
            f"lorakit serve: error: the adapter name {base_name!r} is the base model's name.", file=sys.stderr
        )
        return 2
    try:
        sock = listen(args.host, args.port)  # fails early when the port is taken
    except OSError as error:
        print(f"lorakit serve: error: {error.strerror}", file=sys.stderr)
        return 1
    pin_threads()
    try:
        engine, tokenizer = load_engine(args, base, adapters)
    except (FileNotFoundError, ValueError, OSError, ModelLoadError, AdapterLoadError) as error:
        sock.close()
        print(f"lorakit serve: error: {error}", file=sys.stderr)
        return 1

    from lorakit.serve.app import create_app

    app = create_app(engine, tokenizer, base_name=base_name, default_max_tokens=args.max_tokens)
    names = [base_name, *engine.adapters()]

    def announce() -> None:
        print(f"lorakit serve: {url_of(sock)} (models: {', '.join(names)})", flush=True)

    server = make_server(app, sock, args.log_level, announce)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.stop(drain=not server.force_exit)  # a second Ctrl-C: drop what is still generating
        sock.close()
    print("lorakit serve: stopped.", flush=True)
    return 0

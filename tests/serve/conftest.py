"""Fixtures for the HTTP server tests: a saved tiny Llama + two LoRA adapters, and a live uvicorn server.

The adapters use ``init_lora_weights=False`` so that each one changes the output; the server runs in a background
thread on a free port of 127.0.0.1 (:class:`LiveServer`), in front of a started :class:`BatchEngine`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.train.helpers import save_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_SEEDS = {"alpha": 11, "beta": 12}
BASE_NAME = "tiny"


@dataclass
class ServeFiles:
    base: Path
    adapters: dict[str, Path] = field(default_factory=dict)


@pytest.fixture(scope="session")
def serve_files(tmp_path_factory) -> ServeFiles:
    """The tiny Llama + character tokenizer (with a chat template) saved, and adapters ``alpha`` and ``beta``."""
    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import load_model

    root = tmp_path_factory.mktemp("serve")
    files = ServeFiles(base=save_tiny_model(root / "base"))
    for name, seed in ADAPTER_SEEDS.items():
        torch.manual_seed(seed)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
        get_peft_model(load_model(files.base), config).save_pretrained(root / name)
        files.adapters[name] = root / name
    return files


@dataclass
class LiveServer:
    """A uvicorn server in a thread; ``url`` is its ``/v1`` base URL."""

    engine: Any
    tokenizer: Any
    server: Any
    thread: threading.Thread
    root: str

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(base_url=self.url, api_key="x", max_retries=0, timeout=60, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.engine.stop(drain=False, timeout=30)


def start_server(
    engine, tokenizer, *, base_name: str = BASE_NAME, default_max_tokens: int = 16
) -> LiveServer:
    import uvicorn

    from lorakit.cli.serve import listen
    from lorakit.serve.app import create_app

    app = create_app(engine, tokenizer, base_name=base_name, default_max_tokens=default_max_tokens)
    sock = listen("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    engine.start()
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    return LiveServer(engine, tokenizer, server, thread, f"http://{host}:{port}")


def load_engine(files: ServeFiles, max_batch_size: int = 8):
    from lorakit.models import load_model, load_tokenizer
    from lorakit.serve.engine import BatchEngine

    tokenizer = load_tokenizer(files.base)
    engine = BatchEngine(load_model(files.base), tokenizer, max_batch_size=max_batch_size)
    for name, folder in files.adapters.items():
        engine.load_adapter(name, str(folder))
    return engine, tokenizer


@pytest.fixture(scope="module")
def live(serve_files) -> LiveServer:
    engine, tokenizer = load_engine(serve_files)
    server = start_server(engine, tokenizer)
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference_model(serve_files):
    """An independent PeftModel with both adapters, for greedy ``generate`` references."""
    from lorakit import PeftModel
    from lorakit.models import load_model

    names = list(serve_files.adapters)
    model = PeftModel.from_pretrained(
        load_model(serve_files.base), serve_files.adapters[names[0]], adapter_name=names[0]
    )
    for name in names[1:]:
        model.load_adapter(serve_files.adapters[name], name)
    return model.eval()

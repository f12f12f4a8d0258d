"""BatchEngine: continuous batching with mixed adapters gives the tokens of single-request ``generate``.

The model is the tiny random Llama (fp32) with LoRA adapters that differ (``init_lora_weights=False``) and one DoRA
adapter, which cannot share a mixed-adapter forward and runs as its own sub-batch within each decode step.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.serve.engine import BASE_MODEL, BatchEngine, GenerationRequest, UnknownAdapterError
from lorakit.serve.kv_batch import KVBatch
from tests.train.helpers import tiny_llama, tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    "hello world",
    "the quick brown fox",
    "ab",
    "Reverse apple3 please now",
    "xyz 123",
    "lorem ipsum dolor sit amet",
    "Q",
    "What is the capital of France?",
    "0123456789",
    "serve me a token",
    "mixed batches",
    "zz top",
]
TOKENIZER = tiny_tokenizer()
EOS = TOKENIZER.eos_token_id


def lora(seed: int, **extra) -> LoraConfig:
    torch.manual_seed(seed)
    return LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, **extra)


def build_model(with_dora: bool = True):
    """The tiny Llama with LoRA adapters a0, a1, a2 (and a DoRA adapter ``dora``), in eval mode."""
    torch.manual_seed(1)
    model = get_peft_model(tiny_llama(0), lora(10), adapter_name="a0")
    for i, name in enumerate(["a1", "a2"]):
        config = lora(11 + i)
        model.add_adapter(name, config)
    if with_dora:
        model.add_adapter("dora", lora(20, use_dora=True))
    return model.eval()


def ids(prompt: str) -> list[int]:
    return TOKENIZER(prompt)["input_ids"]


def reference(model, prompt_ids: list[int], adapter: str, max_new_tokens: int) -> list[int]:
    """Greedy ``generate`` of one request with ``adapter`` active (the base model: adapters disabled).

    ``generate`` stops after the eos token (2), which it includes: the engine, given ``stop_token_ids=(2,)``,
    emits the tokens before it (see :func:`expect`).
    """
    x = torch.tensor([prompt_ids])
    kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False)
    with torch.no_grad():
        if adapter == BASE_MODEL:
            with model.disable_adapter():
                out = model.generate(input_ids=x, **kwargs)
        else:
            previous = model.active_adapter
            model.set_adapter(adapter)
            out = model.generate(input_ids=x, **kwargs)
            model.set_adapter(previous)
    return out[0, len(prompt_ids) :].tolist()


def expect(tokens: list[int]) -> tuple[list[int], str]:
    """The engine's tokens and finish reason for ``generate``'s output ``tokens`` (eos stops, not emitted)."""
    return (tokens[:-1], "stop") if tokens and tokens[-1] == EOS else (tokens, "length")


def req(
    prompt_ids: list[int], adapter: str = BASE_MODEL, max_new_tokens: int = 64, **kwargs
) -> GenerationRequest:
    return GenerationRequest(prompt_ids, adapter, max_new_tokens, stop_token_ids=(EOS,), **kwargs)


def tokens_of(handle, timeout: float = 120) -> tuple[list[int], str]:
    events = list(handle.events(timeout=timeout))
    assert all(e.token_id is not None for e in events[:-1])
    assert events[-1].token_id is None
    return [e.token_id for e in events[:-1]], events[-1].finish_reason


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture
def engine(model):
    engine = BatchEngine(model, TOKENIZER, max_batch_size=4)
    yield engine
    engine.stop(drain=False, timeout=30)


# ------------------------------------------------------------------------------------------------- kv_batch
def _toy_kv(lengths: list[int], layers: int = 2) -> KVBatch:
    """Rows as separate prefills: keys hold (row, position) so moves are visible."""
    batch = KVBatch()
    for row, length in enumerate(lengths):
        part = KVBatch.from_prefill(_toy_cache(row, length, layers), length, "cpu")
        batch.extend(part)
    return batch


def _toy_cache(row: int, length: int, layers: int):
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(layers):
        keys = (
            torch.arange(1, length + 1, dtype=torch.float32).view(1, 1, length, 1).expand(1, 2, length, 3)
            + 100 * row
        )
        cache.update(keys.clone(), -keys.clone(), layer)
    return cache


def test_kv_batch_extend_keep_trim():
    batch = _toy_kv([3, 5, 2])
    batch.check()
    assert batch.width == 5 and batch.lengths().tolist() == [3, 5, 2]
    keys = batch.cache.layers[0].keys[:, 0, :, 0]
    assert keys[0].tolist() == [0, 0, 1, 2, 3] and keys[2].tolist() == [0, 0, 0, 201, 202]
    attention_mask, positions = batch.step_inputs()
    assert positions.squeeze(1).tolist() == [3, 5, 2] and attention_mask.shape == (3, 6)
    batch.keep([2, 0])  # the longest row leaves: two leading columns are padding everywhere
    batch.check()
    assert batch.width == 3 and batch.lengths().tolist() == [2, 3]
    assert batch.cache.layers[1].values[:, 0, :, 0].tolist() == [[0, -201, -202], [-1, -2, -3]]
    batch.keep([])
    assert batch.batch_size == 0


def test_kv_batch_take_gather_round_trip():
    batch = _toy_kv([4, 1, 6, 2])
    groups = [[1, 3], [0], [2]]
    parts = [batch.take(rows) for rows in groups]
    assert parts[0].width == 2  # trimmed to its longest row
    merged = KVBatch.gather(parts, groups)
    merged.check()
    assert torch.equal(merged.mask, batch.mask)
    for mine, theirs in zip(merged.cache.layers, batch.cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


# --------------------------------------------------------------------------------------------- equality
def test_greedy_equals_generate_for_staggered_mixed_requests(model, engine):
    """Requests join at different times, with different prompt lengths and adapters, in one running batch."""
    plan = [(0, "a0", 12), (1, "a1", 20), (2, BASE_MODEL, 9), (3, "dora", 16), (4, "a2", 14), (5, "a0", 11)]
    expected = [expect(reference(model, ids(PROMPTS[p]), a, n)) for p, a, n in plan]
    assert all(len(expected[i][0]) > 3 for i in (0, 2))  # the waves below wait for 3 tokens of these
    engine.start()
    handles, streams, seen = [], [], []
    for wave in (
        [0, 1],
        [2, 3],
        [4, 5],
    ):  # the next wave is submitted once the first of this one has 3 tokens
        for i in wave:
            p, a, n = plan[i]
            handles.append(engine.submit(req(ids(PROMPTS[p]), a, n)))
            streams.append(handles[i].events(timeout=120))
            seen.append([])
        for _ in range(3):
            seen[wave[0]].append(next(streams[wave[0]]).token_id)
    for i, stream in enumerate(streams):
        events = list(stream)
        seen[i] += [e.token_id for e in events[:-1]]
        assert (seen[i], events[-1].finish_reason) == expected[i], plan[i]
        assert handles[i].prompt_tokens == len(ids(PROMPTS[plan[i][0]]))
        assert handles[i].completion_tokens == len(expected[i][0]) + (expected[i][1] == "stop")
    stats = engine.stats
    assert stats["prefills"] == len(plan)
    assert stats["steps"] < stats["generated_tokens"] - len(plan)  # rows shared decode steps


def test_twelve_requests_four_adapters_batch_of_four(model, engine):
    adapters = ["a0", "a1", "a2", "dora"]
    plan = [(ids(p), adapters[i % 4], 6 + (i * 5) % 11) for i, p in enumerate(PROMPTS)]
    expected = [expect(reference(model, p, a, n)) for p, a, n in plan]
    handles = [engine.submit(req(p, a, n)) for p, a, n in plan]
    assert engine.stats["waiting"] == 12
    peak, done = [], threading.Event()

    def watch():
        while not done.is_set():
            peak.append(engine.stats["active"])
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    engine.start()
    results = [tokens_of(h) for h in handles]
    done.set()
    watcher.join()
    assert results == expected
    assert 1 < max(peak) <= 4
    assert engine.stats["prefills"] == 12


def test_stop_token_ends_the_request(model, engine):
    prompt = ids(PROMPTS[1])
    expected = reference(model, prompt, "a1", 12)
    assert EOS not in expected[:5]
    stop = expected[4]
    cut = expected.index(stop)
    engine.start()
    handle = engine.submit(GenerationRequest(prompt, adapter="a1", max_new_tokens=12, stop_token_ids=(stop,)))
    tokens, reason = tokens_of(handle)
    assert reason == "stop" and tokens == expected[:cut]
    assert handle.completion_tokens == cut + 1  # the stop token is counted, not emitted


# --------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_top_p_tiny_is_greedy(model, engine):
    prompt = ids(PROMPTS[3])
    engine.start()

    def sample(seed, top_p=1.0, others=0):
        extra = [
            engine.submit(GenerationRequest(ids(PROMPTS[i]), adapter="a2", max_new_tokens=20))
            for i in range(others)
        ]
        request = GenerationRequest(
            prompt, adapter="a0", max_new_tokens=15, temperature=1.5, top_p=top_p, seed=seed
        )
        tokens, _ = tokens_of(engine.submit(request))
        for handle in extra:
            tokens_of(handle)
        return tokens

    first = sample(7)
    assert sample(7, others=3) == first  # the batch around it changes nothing
    assert sample(8) != first
    assert sample(9, top_p=1e-6) == reference(model, prompt, "a0", 15)  # only the top token is left


def test_aevents(engine):
    engine.start()

    async def consume():
        handle = engine.submit(GenerationRequest(ids("async"), adapter="a1", max_new_tokens=7))
        return [event async for event in handle.aevents()]

    events = asyncio.run(consume())
    assert len(events) == 8 and events[-1].finish_reason == "length"


# ------------------------------------------------------------------------------------------- lifecycle
def test_cancel_frees_the_slot(model):
    engine = BatchEngine(model, TOKENIZER, max_batch_size=1)
    engine.start()
    try:
        long = engine.submit(GenerationRequest(ids(PROMPTS[0]), adapter="a0", max_new_tokens=200))
        queued = engine.submit(GenerationRequest(ids(PROMPTS[2]), adapter="a1", max_new_tokens=5))
        stream = long.events(timeout=60)
        next(stream)
        assert engine.stats["waiting"] == 1  # the only slot is taken
        long.cancel()
        rest = list(stream)
        assert rest[-1].finish_reason == "cancelled" and long.completion_tokens < 200
        assert tokens_of(queued)[1] == "length"
        assert engine.stats["active"] == 0
    finally:
        engine.stop(drain=False)


def test_cancel_while_waiting(model):
    engine = BatchEngine(model, TOKENIZER, max_batch_size=1)
    handle = engine.submit(GenerationRequest(ids("wait"), max_new_tokens=3))
    handle.cancel()
    engine.start()
    assert tokens_of(handle) == ([], "cancelled")
    engine.stop()


def test_stop_drains_in_flight_requests(model):
    engine = BatchEngine(model, TOKENIZER, max_batch_size=2)
    engine.start()
    handles = [engine.submit(GenerationRequest(ids(p), adapter="a2", max_new_tokens=10)) for p in PROMPTS[:4]]
    engine.stop(drain=True, timeout=120)
    assert [len(tokens_of(h, timeout=1)[0]) for h in handles] == [10] * 4
    with pytest.raises(ValueError, match="stopped"):
        engine.submit(GenerationRequest(ids("late")))


def test_stop_without_drain_cancels(model):
    engine = BatchEngine(model, TOKENIZER, max_batch_size=2)
    handles = [engine.submit(GenerationRequest(ids(p), max_new_tokens=100)) for p in PROMPTS[:4]]
    engine.start()
    engine.stop(drain=False, timeout=60)
    assert {tokens_of(h, timeout=1)[1] for h in handles} == {"cancelled"}


def test_submit_errors(engine):
    with pytest.raises(UnknownAdapterError, match="'nope'.*a0") as info:
        engine.submit(GenerationRequest(ids("x"), adapter="nope"))
    assert isinstance(info.value, KeyError)
    with pytest.raises(ValueError, match="empty"):
        engine.submit(GenerationRequest([]))
    with pytest.raises(ValueError, match="context of 256"):
        engine.submit(GenerationRequest(ids("x"), max_new_tokens=256))
    assert engine.adapters() == ["a0", "a1", "a2", "dora"]


def test_load_and_unload_adapter_while_others_run(tmp_path):
    model = build_model(with_dora=False)
    other = get_peft_model(tiny_llama(0), lora(30))
    other.save_pretrained(tmp_path / "new")
    engine = BatchEngine(model, TOKENIZER, max_batch_size=4)
    engine.start()
    running = engine.submit(GenerationRequest(ids(PROMPTS[5]), adapter="a0", max_new_tokens=200))
    stream = running.events(timeout=60)
    first = next(stream).token_id
    engine.load_adapter("new", str(tmp_path / "new"))
    assert "new" in engine.adapters()
    with pytest.raises(ValueError, match="exists"):
        engine.load_adapter("new", str(tmp_path / "new"))
    fresh = engine.submit(req(ids(PROMPTS[7]), "new", 10))
    with pytest.raises(ValueError, match="in flight"):
        engine.unload_adapter("a0")
    fresh_result = tokens_of(fresh)
    engine.unload_adapter("a1")  # nobody uses it
    with pytest.raises(UnknownAdapterError):
        engine.unload_adapter("a1")
    with pytest.raises(UnknownAdapterError):
        engine.submit(req(ids("x"), "a1"))
    assert not running.done  # it ran through all of this
    running_tokens = [first] + [e.token_id for e in stream if e.token_id is not None]
    engine.stop()
    assert "a1" not in model.peft_config and engine.adapters() == ["a0", "a2", "new"]
    assert fresh_result == expect(reference(model, ids(PROMPTS[7]), "new", 10))
    expected = reference(model, ids(PROMPTS[5]), "a0", 200)  # generate stops at eos, the engine did not
    assert len(running_tokens) == 200 and running_tokens[: len(expected)] == expected


def test_plain_model_serves_the_base_until_an_adapter_is_loaded(tmp_path):
    saved = get_peft_model(tiny_llama(0), lora(40))
    saved.save_pretrained(tmp_path / "ad")
    prompt = ids(PROMPTS[1])
    expected = expect(reference(saved, prompt, "default", 8))
    expected_base = expect(reference(saved, prompt, BASE_MODEL, 8))
    engine = BatchEngine(tiny_llama(0), TOKENIZER)
    assert engine.adapters() == [] and engine.max_context == 256
    engine.start()
    assert tokens_of(engine.submit(req(prompt, BASE_MODEL, 8))) == expected_base
    engine.load_adapter("mine", str(tmp_path / "ad"))
    assert tokens_of(engine.submit(req(prompt, "mine", 8))) == expected
    assert tokens_of(engine.submit(req(prompt, BASE_MODEL, 8))) == expected_base
    engine.stop()


def test_adapter_with_modules_to_save_runs_alone(tmp_path):
    """An adapter with its own ``lm_head`` copy cannot use mixed_batch (LoRA layers only): own sub-batch."""
    model = build_model(with_dora=False)
    model.add_adapter("head", lora(50, modules_to_save=["lm_head"]))
    with torch.no_grad():
        copy = model.get_base_model().lm_head.modules_to_save["head"]
        copy.weight.add_(torch.randn_like(copy.weight) * 0.5)
    model.eval()
    plan = [(PROMPTS[i], a) for i, a in enumerate(["head", "a0", BASE_MODEL, "head", "a1"])]
    expected = [expect(reference(model, ids(p), a, 10)) for p, a in plan]
    engine = BatchEngine(model, TOKENIZER, max_batch_size=8)
    handles = [engine.submit(req(ids(p), a, 10)) for p, a in plan]
    engine.start()
    assert [tokens_of(h) for h in handles] == expected
    engine.stop()
    assert not engine.runner.mixable("head") and engine.runner.mixable("a0")


def test_gpt2_mixed_adapters():
    """GPT-2 (absolute positions, Conv1D projections): the per-row positions and masks hold there too."""
    from tests.conftest import tiny_gpt2

    torch.manual_seed(3)
    config = LoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_gpt2(0), config, adapter_name="g0")
    model.add_adapter("g1", LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    model.eval()
    plan = [
        ([5, 9, 11, 40, 3], "g0"),
        ([7, 7], "g1"),
        ([60, 61, 62, 63, 64, 65, 66, 67, 68], BASE_MODEL),
        ([8], "g0"),
    ]
    expected = [reference(model, p, a, 12) for p, a in plan]
    engine = BatchEngine(model, None, max_batch_size=4)
    handles = [engine.submit(GenerationRequest(p, a, 12)) for p, a in plan]
    engine.start()
    assert [tokens_of(h)[0] for h in handles] == expected
    engine.stop()
    assert engine.max_context == 64


def test_decode_error_fails_the_running_requests_and_the_engine_goes_on():
    model = build_model(with_dora=False)
    calls = {"n": 0}

    def explode(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")

    engine = BatchEngine(model, TOKENIZER)
    assert engine.runner.mixable("a0")  # its probe forward is done before the hook counts
    hook = model.get_base_model().lm_head.register_forward_pre_hook(explode)
    engine.start()
    try:
        events = list(engine.submit(GenerationRequest(ids("fail"), "a0", 10)).events(timeout=60))
        assert events[-1].finish_reason == "error" and "RuntimeError: boom" in events[-1].error
        assert len(events) == 3  # two tokens (prefill, first step), then the failed step
        hook.remove()
        assert tokens_of(engine.submit(GenerationRequest(ids("fine"), "a0", 5)))[1] == "length"
    finally:
        engine.stop()


def test_unload_the_last_adapter_and_serve_the_base():
    model = get_peft_model(tiny_llama(0), lora(60), adapter_name="only")
    model.eval()
    expected_base = reference(model, ids(PROMPTS[3]), BASE_MODEL, 6)
    engine = BatchEngine(model, TOKENIZER)
    engine.start()
    engine.unload_adapter("only")
    assert engine.adapters() == [] and not model.peft_config
    assert tokens_of(engine.submit(GenerationRequest(ids(PROMPTS[3]), max_new_tokens=6)))[0] == expected_base
    engine.stop()


def test_leaving_the_event_iterator_cancels(engine):
    engine.start()
    handle = engine.submit(GenerationRequest(ids("leave"), "a0", 200))
    for _ in handle.events(timeout=60):
        break
    assert handle.cancelled

    async def leave_async():
        other = engine.submit(GenerationRequest(ids("leave"), "a1", 200))
        async for _ in other.aevents():
            break
        return other

    other = asyncio.run(leave_async())  # asyncio.run closes the abandoned async generator on its way out
    assert other.cancelled
    assert list(handle.events(timeout=30))[-1].finish_reason == "cancelled"
    assert list(other.events(timeout=30))[-1].finish_reason == "cancelled"


def test_prefill_chunks_and_a_failing_prompt_fails_alone(monkeypatch):
    from lorakit.serve import running

    monkeypatch.setattr(running, "PREFILL_TOKENS", 24)  # chunks of at most 24 padded prompt tokens
    model = build_model(with_dora=False)

    def refuse(module, args):
        if args[0].shape[1] > 1 and bool((args[0] == 120).any()):  # prefills only
            raise RuntimeError("token 120 refused")

    model.get_base_model().model.embed_tokens.register_forward_pre_hook(refuse)
    plan = [(ids(PROMPTS[i]), a) for i, a in enumerate(["a0", "a1", "a2", BASE_MODEL, "a0", "a1"])]
    expected = [expect(reference(model, p, a, 8)) for p, a in plan]
    engine = BatchEngine(model, TOKENIZER, max_batch_size=8)
    handles = [engine.submit(req(p, a, 8)) for p, a in plan]
    bad = engine.submit(req([5, 120, 7], "a0", 8))
    engine.start()
    assert [tokens_of(h) for h in handles] == expected
    events = list(bad.events(timeout=60))
    assert len(events) == 1 and events[0].finish_reason == "error" and "token 120 refused" in events[0].error
    engine.stop()
    assert engine.stats["prefills"] == len(plan)


def test_an_engine_bug_fails_the_running_requests_not_the_thread(model):
    engine = BatchEngine(model, TOKENIZER)
    step = engine._running.step
    calls = {"n": 0}

    def buggy_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise IndexError("engine bug")
        step()

    engine._running.step = buggy_step
    engine.start()
    try:
        events = list(engine.submit(GenerationRequest(ids("bug"), "a0", 10)).events(timeout=60))
        assert events[-1].finish_reason == "error" and "IndexError: engine bug" in events[-1].error
        assert tokens_of(engine.submit(GenerationRequest(ids("fine"), "a0", 5)))[1] == "length"
        assert engine.stats["active"] == 0
    finally:
        engine.stop()


def test_adalora_adapters_run_as_sub_batches():
    """AdaLoRA refuses mixed batches: each adapter (and the base) gets its own sub-batch, the same tokens."""
    from lorakit import AdaLoraConfig

    def config(inference: bool) -> AdaLoraConfig:
        return AdaLoraConfig(
            init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"], inference_mode=inference
        )

    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(0), config(False), adapter_name="x0")
    model.add_adapter("x1", config(True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.3)
    model.eval()
    plan = [(ids(PROMPTS[i]), a) for i, a in enumerate(["x0", "x1", BASE_MODEL, "x0"])]
    expected = [expect(reference(model, p, a, 10)) for p, a in plan]
    assert len({tuple(tokens) for tokens, _ in expected}) == 4
    engine = BatchEngine(model, TOKENIZER, max_batch_size=4)
    assert not any(engine.runner.mixable(a) for a in ["x0", "x1", BASE_MODEL])
    handles = [engine.submit(req(p, a, 10)) for p, a in plan]
    engine.start()
    assert [tokens_of(h) for h in handles] == expected
    engine.stop()

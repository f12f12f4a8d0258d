"""Serving many adapters on one base: lorakit's engine against one request at a time and against PEFT's way.

``python benchmarks/serve_bench.py [--model tiny|smollm2] [--clients 8] [--adapters 4] [--requests 4]
[--new-tokens 32] [--threads 2] [--out FILE]``

Every mode serves the same requests (``clients x requests``, adapter ``i % adapters``, greedy, ``new-tokens``
tokens each, prompts of different lengths) on the same base with the same random adapters, in this process,
one mode after the other:

* ``lorakit``: :class:`lorakit.serve.engine.BatchEngine` (continuous batching, mixed-adapter decode steps);
  ``clients`` threads each send their requests one after the other, as HTTP clients of ``lorakit serve`` do;
* ``serial``: the same engine with ``max_batch_size=1``: one request at a time;
* ``lorakit_set_adapter`` / ``peft_set_adapter``: one request at a time, ``set_adapter`` then ``generate``
  (lorakit's model, then Hugging Face PEFT's: the same work, so it separates the libraries from the batching);
* ``peft_mixed``: PEFT's ``generate(adapter_names=[...])`` on static batches of ``clients`` requests
  (its per-adapter sub-batches, no continuous batching: a batch runs until its longest request ends).

Printed per mode: generated tokens per second (all requests / wall time), p50 and p99 request latency
(submission to last token), and whether each request's tokens equal single-adapter ``generate`` (lorakit
modes: token for token; the check is what makes the speed comparison fair).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import torch


def build(model_name: str, adapters: int, seed: int):
    """(lorakit PeftModel, PEFT PeftModel, tokenizer, adapter names): the same base and adapter weights in both."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    def base():
        if model_name == "smollm2":
            return lorakit.load_model(None, dtype=torch.float32)
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
        return LlamaForCausalLM(config).eval()

    tokenizer = lorakit.load_tokenizer(None)
    names = [f"task{i}" for i in range(adapters)]
    kwargs = dict(
        target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
        r=16,
        lora_alpha=16,
        init_lora_weights=False,
    )
    ours = None
    for index, name in enumerate(names):
        torch.manual_seed(seed + 1 + index)
        config = lorakit.LoraConfig(**kwargs)
        if ours is None:
            ours = lorakit.get_peft_model(base(), config, adapter_name=name)
        else:
            ours.add_adapter(name, config)
    with torch.no_grad():  # small random updates: outputs differ per adapter but stay text-like
        for param_name, param in ours.named_parameters():
            if "lora_B" in param_name:
                param.mul_(0.05)
    theirs = peft.get_peft_model(base(), peft.LoraConfig(**kwargs), adapter_name=names[0])
    for name in names[1:]:
        theirs.add_adapter(name, peft.LoraConfig(**kwargs))
    theirs.load_state_dict(ours.state_dict(), strict=False)
    for model in (ours, theirs):  # every request generates exactly new_tokens tokens (no end-of-text stop)
        model.get_base_model().generation_config.eos_token_id = None
    return ours.eval(), theirs.eval(), tokenizer, names


def make_requests(tokenizer, names: list[str], clients: int, per_client: int, vocab: int):
    """(client, adapter, prompt ids) for every request; prompt lengths 6..21 tokens."""
    generator = torch.Generator().manual_seed(1234)
    requests = []
    for client in range(clients):
        for k in range(per_client):
            length = 6 + (client * 7 + k * 5) % 16
            ids = torch.randint(
                3, min(vocab, tokenizer.vocab_size) - 1, (length,), generator=generator
            ).tolist()
            requests.append((client, names[(client + k) % len(names)], ids))
    return requests


def run_engine(model, tokenizer, requests, new_tokens: int, clients: int, batch: int):
    """Clients send their requests one after the other; returns (latencies, tokens per request, wall)."""
    from lorakit.serve.engine import BatchEngine, GenerationRequest

    engine = BatchEngine(model, tokenizer, max_batch_size=batch)
    engine.start()
    latencies, tokens = [None] * len(requests), [None] * len(requests)

    def client(index: int) -> None:
        for position, (owner, adapter, ids) in enumerate(requests):
            if owner != index:
                continue
            started = time.perf_counter()
            handle = engine.submit(GenerationRequest(ids, adapter=adapter, max_new_tokens=new_tokens))
            tokens[position] = [e.token_id for e in handle.events() if e.token_id is not None]
            latencies[position] = time.perf_counter() - started

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    engine.stop()
    return latencies, tokens, wall


def run_set_adapter(model, requests, new_tokens: int):
    """One request at a time: ``set_adapter`` then greedy ``generate`` (lorakit's or PEFT's model)."""
    latencies, tokens = [], []
    started = time.perf_counter()
    for _, adapter, ids in requests:  # arrival order: one at a time, as a queue would serve them
        model.set_adapter(adapter)
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        tokens.append(out[0, len(ids) :].tolist())
        latencies.append(time.perf_counter() - started)  # waited for every request before it, too
    return latencies, tokens, time.perf_counter() - started


def run_peft_mixed(model, requests, new_tokens: int, batch: int):
    """Static batches of ``batch`` requests, left-padded, one adapter per row (PEFT's sub-batches)."""
    latencies, tokens = [], []
    started = time.perf_counter()
    for first in range(0, len(requests), batch):
        chunk = requests[first : first + batch]
        width = max(len(ids) for _, _, ids in chunk)
        input_ids = torch.tensor([[0] * (width - len(ids)) + ids for _, _, ids in chunk])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for _, _, ids in chunk])
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                adapter_names=[a for _, a, _ in chunk],
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        done = time.perf_counter() - started
        tokens.extend(out[:, width:].tolist())
        latencies.extend([done] * len(chunk))
    return latencies, tokens, time.perf_counter() - started


def summary(name, latencies, tokens, wall, reference) -> dict:
    generated = sum(len(t) for t in tokens)
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    same = sum(a == b for a, b in zip(tokens, reference))
    return {
        "mode": name,
        "tokens_per_s": generated / wall,
        "p50_latency_s": statistics.median(ordered),
        "p99_latency_s": p99,
        "wall_s": wall,
        "requests": len(tokens),
        "equal_to_generate": f"{same}/{len(tokens)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ours, theirs, tokenizer, names = build(args.model, args.adapters, args.seed)
    vocab = ours.get_base_model().config.vocab_size
    requests = make_requests(tokenizer, names, args.clients, args.requests, vocab)
    # single-adapter generate on lorakit's model: timed as a mode, and the tokens every mode must reproduce
    one_at_a_time = run_set_adapter(ours, requests, args.new_tokens)
    reference = one_at_a_time[1]
    results = [
        summary("lorakit_set_adapter", *one_at_a_time, reference),
        summary(
            "lorakit",
            *run_engine(ours, tokenizer, requests, args.new_tokens, args.clients, args.clients),
            reference,
        ),
        summary(
            "serial", *run_engine(ours, tokenizer, requests, args.new_tokens, args.clients, 1), reference
        ),
        summary("peft_set_adapter", *run_set_adapter(theirs, requests, args.new_tokens), reference),
        summary("peft_mixed", *run_peft_mixed(theirs, requests, args.new_tokens, args.clients), reference),
    ]
    header = f"{args.model}: {len(requests)} requests, {args.clients} clients, {args.adapters} adapters, {args.new_tokens} new tokens, {args.threads} threads"
    print(header)
    print("| mode | tokens/s | p50 latency (s) | p99 latency (s) | wall (s) | equal to generate |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['p50_latency_s']:.2f} | {r['p99_latency_s']:.2f} | {r['wall_s']:.1f} | {r['equal_to_generate']} |"
        )
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"setup": vars(args), "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()

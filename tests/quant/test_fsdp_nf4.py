"""NF4 storage under FSDP2: make_shardable keeps the layer exact; 2 gloo ranks match 1 process at half the memory.

The FSDP test forks two processes (tests/train/subprocess_utils.run_forked_ranks); each rank builds the same tiny
quantized model, keeps an unsharded copy as the one-process reference, shards the other with ``fully_shard``
(each block, then the root) and runs its half of the batch.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from lorakit import LoraConfig, get_peft_model
from lorakit.quant import Linear4bit, make_shardable, nf4_storage_bytes, quantize_model, resident_weight_bytes
from lorakit.quant.linear4bit import QUANT_STATE, SHARDABLE_STATE
from tests.train.subprocess_utils import run_forked_ranks

DIM, HIDDEN, OUT = 128, 256, 16  # 128 x 256 = 2 * 64 * 256 weights: every sharded state tensor splits evenly
BITS_PER_WEIGHT = 4 + 8 / 64 + 32 / (64 * 256)  # 4.126953125, QLoRA's 4.127
FIXED_BYTES = 4 + 16 * 4  # absmax_offset and the NF4 table: the replicated buffers of a layer


class Block(nn.Module):
    """A residual MLP block with a full-precision trainable ``adapter`` in front of two 4-bit projections."""

    def __init__(self):
        super().__init__()
        self.adapter = nn.Linear(DIM, DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x):
        h = x + self.adapter(x)
        return h + self.down(torch.relu(self.up(h)))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, OUT)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _tiny_model(compute_dtype=torch.float32) -> Tiny:
    """Two blocks whose ``up``/``down`` are Linear4bit; only the adapters train (the head stays frozen fp32)."""
    torch.manual_seed(0)
    model = Tiny()
    quantize_model(model, compute_dtype=compute_dtype, skip_modules=("adapter", "head"))
    for name, param in model.named_parameters():
        param.requires_grad_(".adapter." in name)
    return model


def _batch() -> torch.Tensor:
    return torch.randn(8, DIM, generator=torch.Generator().manual_seed(1))  # 2-D: no view outputs for FSDP


def _bits_per_weight(layer: Linear4bit, state_bytes: int) -> float:
    return 8 * (state_bytes - FIXED_BYTES) / (layer.in_features * layer.out_features)


# ------------------------------------------------------------------------------------ one process
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_make_shardable_keeps_outputs_gradients_and_state_dict(compute_dtype):
    model = _tiny_model(compute_dtype)
    reference = copy.deepcopy(model)
    assert make_shardable(model) == 4 and make_shardable(model) == 0  # a second call converts nothing

    for layer in (m for m in model.modules() if isinstance(m, Linear4bit)):
        assert layer.is_shardable
        for name in SHARDABLE_STATE:
            param = layer._parameters[name]
            assert isinstance(param, nn.Parameter) and not param.requires_grad
        assert set(layer._buffers) == {"absmax_offset", "nf4_code"}
        assert layer.weight_nf4.dtype == torch.uint8 and layer.absmax_scales.dtype == torch.float32
    # Same keys in the same order, same values (and the same tensors: no copy was made).
    state, reference_state = model.state_dict(), reference.state_dict()
    assert list(state) == list(reference_state)
    assert all(torch.equal(state[key], reference_state[key]) for key in state)
    layer, reference_layer = model.blocks[0].up, reference.blocks[0].up
    assert layer.storage_bytes() == reference_layer.storage_bytes() == nf4_storage_bytes(DIM * HIDDEN)
    assert torch.equal(layer.dequantize(), reference_layer.dequantize())
    assert layer.weight.device == reference_layer.weight.device

    x = _batch()
    out, reference_out = model(x), reference(x)
    assert torch.equal(out, reference_out)
    out.float().pow(2).mean().backward()
    reference_out.float().pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(reference_grads) and len(grads) == 4  # the adapters' weights and biases
    assert all(torch.equal(grads[name], reference_grads[name]) for name in grads)


def test_state_dict_loads_across_the_conversion_and_to_keeps_the_state_exact():
    model = _tiny_model()
    shardable = copy.deepcopy(model)
    make_shardable(shardable)
    x = _batch()
    expected = model(x)

    # Checkpoints load either way: buffers -> parameters and parameters -> buffers.
    blank = Tiny()
    quantize_model(blank, compute_dtype=torch.float32, skip_modules=("adapter", "head"))
    make_shardable(blank)
    blank.load_state_dict(model.state_dict())
    assert torch.equal(blank(x), expected) and blank.blocks[0].up.is_shardable
    plain = copy.deepcopy(model)
    plain.blocks[0].up.weight_nf4.zero_()
    plain.load_state_dict(shardable.state_dict())
    assert torch.equal(plain(x), expected)
    # assign=True (loading into a meta-built layer) keeps them frozen parameters.
    layer = Linear4bit(DIM, HIDDEN, compute_dtype=torch.float32, device="meta")
    layer.to_shardable()
    layer.load_state_dict(model.blocks[0].up.state_dict(), assign=True)
    assert layer.is_shardable and not any(p.requires_grad for p in layer.parameters())
    assert torch.equal(layer.dequantize(), model.blocks[0].up.dequantize())
    # load_quantized keeps the parameters (as new frozen parameters).
    layer.load_quantized(model.blocks[1].up.quantized())
    assert layer.is_shardable and not layer.weight_nf4.requires_grad
    assert torch.equal(layer.dequantize(), model.blocks[1].up.dequantize())

    # .to(dtype) casts the compute dtype and the bias only; parameters stay the same objects.
    layer = shardable.blocks[0].up
    objects = [layer._parameters[name] for name in SHARDABLE_STATE]
    shardable.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert [layer._parameters[name] for name in SHARDABLE_STATE] == objects
    dtypes = [getattr(layer, name).dtype for name in QUANT_STATE]
    assert dtypes == [torch.uint8, torch.uint8, torch.float32, torch.float32, torch.float32]
    # .half() rounds the fp32 weights (adapters, head, biases), not the 4-bit state.
    shardable.half().float().to("cpu")
    assert layer.compute_dtype == torch.float32 and layer.is_shardable
    state, original = shardable.state_dict(), model.state_dict()
    quant_keys = [key for key in original if key.rpartition(".")[2] in QUANT_STATE]
    assert len(quant_keys) == 4 * len(QUANT_STATE)
    assert all(torch.equal(state[key], original[key]) for key in quant_keys)
    assert torch.equal(copy.deepcopy(shardable)(x), shardable(x))


def test_make_shardable_under_lora():
    model = _tiny_model()
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    reference = copy.deepcopy(peft)
    before = peft.get_nb_trainable_parameters()
    assert make_shardable(peft) == 4
    x = _batch()
    assert torch.equal(peft(x), reference(x))
    assert list(peft.state_dict()) == list(reference.state_dict())
    assert [n for n, p in peft.named_parameters() if p.requires_grad] == [
        n for n, p in reference.named_parameters() if p.requires_grad
    ]
    assert peft.get_nb_trainable_parameters()[0] == before[0]


@pytest.mark.parametrize("shape", [(HIDDEN, DIM), (64, 256), (1024, 64)])
def test_bits_per_weight_stay_4_127(shape):
    out_features, in_features = shape
    assert (in_features * out_features) % (64 * 256) == 0
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(in_features, out_features), compute_dtype=torch.float32)
    assert _bits_per_weight(layer, layer.storage_bytes()) == BITS_PER_WEIGHT
    layer.to_shardable()
    assert _bits_per_weight(layer, layer.storage_bytes()) == BITS_PER_WEIGHT
    # All but the 68 fixed bytes are in the parameters FSDP shards.
    sharded = sum(p.numel() * p.element_size() for n, p in layer.named_parameters() if n != "bias")
    assert sharded + FIXED_BYTES == layer.storage_bytes()


def test_resident_weight_bytes_counts_frozen_storage_once():
    model = _tiny_model()
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert resident_weight_bytes(model) == frozen + buffers
    make_shardable(model)  # same storage, now partly parameters
    assert resident_weight_bytes(model) == frozen + buffers
    model.head.weight = model.blocks[0].adapter.weight  # now trainable: no longer counted
    head_bytes = OUT * DIM * 4
    assert resident_weight_bytes(model) == frozen + buffers - head_bytes
    assert resident_weight_bytes(Tiny().to("meta")) == 0


# ------------------------------------------------------------------------------------ two processes
def _two_ranks(context) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    rank, world = context.rank, context.world_size
    model = _tiny_model()
    reference = copy.deepcopy(model)  # one process, the whole batch
    x = _batch()
    reference_out = reference(x)
    reference_out.pow(2).mean().backward()
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    single_bytes = resident_weight_bytes(reference)

    make_shardable(model)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    per_rank_bytes = resident_weight_bytes(model)
    # FSDP2 keeps ceil(rows / world) rows of every parameter per rank; buffers are whole.
    expected_bytes = sum(
        math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) * p.element_size()
        for p in model.parameters()
        if not p.requires_grad
    ) + sum(b.numel() * b.element_size() for b in model.buffers())

    layer = model.blocks[0].up
    sharded = {name: isinstance(getattr(layer, name), DTensor) for name in QUANT_STATE}
    shards = [getattr(layer, name).to_local() for name in SHARDABLE_STATE]
    local_state_bytes = sum(shard.numel() * shard.element_size() for shard in shards)
    errors = []
    for call in (layer.dequantize, lambda: layer(x)):
        try:
            call()
            errors.append(None)
        except RuntimeError as error:
            errors.append(str(error))

    rows = slice(rank * 4, rank * 4 + 4)  # each rank its half of the batch
    out = model(x[rows])
    out.pow(2).mean().backward()  # FSDP averages the two ranks' gradients: the mean over the whole batch
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        again = model(x[rows])  # after a reshard and a fresh all-gather

    model.blocks[0].unshard()
    unsharded_equal = torch.equal(layer.dequantize(), reference.blocks[0].up.dequantize())
    model.blocks[0].reshard()
    state, reference_state = model.state_dict(), reference.state_dict()
    values_equal = all(
        torch.equal(value.full_tensor() if isinstance(value, DTensor) else value, reference_state[key])
        for key, value in state.items()
    )
    return {
        "sharded": sharded,
        "errors": errors,
        "out_diff": (out - reference_out[rows]).abs().max().item(),
        "again_equal": torch.equal(again, out),
        "grad_names": sorted(grads),
        "reference_grad_names": sorted(reference_grads),
        "grad_diff": max((grads[n] - reference_grads[n]).abs().max().item() for n in reference_grads),
        "grad_scale": max(g.abs().max().item() for g in reference_grads.values()),
        "single_bytes": single_bytes,
        "per_rank_bytes": per_rank_bytes,
        "expected_bytes": expected_bytes,
        "local_state_bytes": local_state_bytes,
        "storage_bytes": layer.storage_bytes(),
        "unsharded_equal": unsharded_equal,
        "keys_equal": list(state) == list(reference_state),
        "values_equal": values_equal,
    }


def test_two_fsdp_ranks_match_one_process_at_half_the_base_memory(tmp_path):
    results = run_forked_ranks(_two_ranks, 2, tmp_path, timeout=120)
    for result in results:
        assert not isinstance(result, list), result  # an exception in a rank: (type, message)
        # Outside forward the 1-D state is a shard, the offset and the table are replicated buffers.
        assert result["sharded"] == {name: name in SHARDABLE_STATE for name in QUANT_STATE}
        assert all("sharded by FSDP" in (error or "") for error in result["errors"])
        assert result["out_diff"] <= 1e-6 and result["again_equal"]
        assert result["grad_names"] == result["reference_grad_names"] and len(result["grad_names"]) == 4
        assert result["grad_scale"] > 1e-3 and result["grad_diff"] <= 1e-6
        assert result["unsharded_equal"] and result["keys_equal"] and result["values_equal"]
        # Per rank: exactly FSDP's shards (ceil(rows / 2)) plus the replicated buffers, about half of one process.
        assert result["per_rank_bytes"] == result["expected_bytes"]
        assert abs(result["per_rank_bytes"] - result["single_bytes"] / 2) <= 4 * FIXED_BYTES + 2 * OUT * 4
    # The shards of the two ranks add up to the whole layer: still 4.127 bits per weight.
    total = sum(result["local_state_bytes"] for result in results) + FIXED_BYTES
    assert total == results[0]["storage_bytes"] == nf4_storage_bytes(DIM * HIDDEN)
    assert _bits_per_weight(Linear4bit(DIM, HIDDEN, device="meta"), total) == BITS_PER_WEIGHT
    assert results[0]["local_state_bytes"] == results[1]["local_state_bytes"]

"""Which examples go into which micro-batch, and the token-normalised loss.

Data order. Epoch ``e`` visits the training examples in the permutation ``randperm(n)`` drawn from a
generator seeded with ``seed + e`` (independent of the global RNG). Optimizer step ``k`` of an epoch
takes the global slice ``order[k G : (k + 1) G]`` with ``G = micro_batch * accumulation * world_size``
(the last slice of an epoch may be shorter). Rank ``r`` takes the ``r``-th contiguous share of the
slice and cuts it into ``accumulation`` micro-batches. The position in the data is therefore a
pure function of the step, which is what a checkpoint stores.

Loss. With ``N`` the number of trained tokens of the whole optimizer step (all micro-batches, all
ranks; labels after the causal shift that are not -100), each micro-batch contributes
``sum_t CE_t / N``. Summed over micro-batches and ranks the gradient is that of the mean token loss
of the global batch, so ``accumulation 4 x batch 1`` equals ``batch 4`` and ``2 ranks x b`` equals
``1 rank x 2b``. (Averaging per micro-batch first, as some trainers did, weights short sequences
too much; see the Hugging Face "gradient accumulation" fix of Oct 2024.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorakit.data import model_inputs

IGNORE_INDEX = -100


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return math.ceil(num_examples / global_batch)


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example indices of ``epoch`` (deterministic in seed and epoch)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def rank_micro_batches(
    order: list[int], step_in_epoch: int, *, micro_batch: int, accumulation: int, rank: int, world_size: int
) -> list[list[int]]:
    """This rank's ``accumulation`` micro-batches (lists of example indices; some may be empty)."""
    per_rank = micro_batch * accumulation
    start = step_in_epoch * per_rank * world_size + rank * per_rank
    share = order[start : min(start + per_rank, (step_in_epoch + 1) * per_rank * world_size)]
    return [share[i * micro_batch : (i + 1) * micro_batch] for i in range(accumulation)]


def count_trained_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry a loss once labels are shifted for next-token prediction."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``sum_t CE(logits_t, labels_{t+1})`` over trained tokens, in float32."""
    vocab = logits.shape[-1]
    shifted_logits = logits[:, :-1, :].reshape(-1, vocab).float()
    shifted_labels = labels[:, 1:].reshape(-1).to(shifted_logits.device)
    return F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def first_needed_position(labels: torch.Tensor) -> int:
    """The first position whose logits predict a trained label (``t`` predicts label ``t + 1``).

    Logits before it only feed masked prompt tokens, so the language-model head can skip them: on
    chat data with long system prompts that is most of the head's work.
    """
    trained = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    return int(trained[0]) if len(trained) else 0


def forward_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum_t CE_t`` of a batch, computing logits only from :func:`first_needed_position` on."""
    inputs = model_inputs(batch)  # packed batches: position ids and no mask, so examples stay apart
    length, start = batch["input_ids"].shape[1], first_needed_position(batch["labels"])
    if start > 0:
        try:
            logits = model(**inputs, logits_to_keep=length - start).logits
        except TypeError:  # a model without ``logits_to_keep``
            logits = model(**inputs).logits
    else:
        logits = model(**inputs).logits
    kept = logits.shape[1]  # the trailing positions the model returned (all of them if it ignored the hint)
    return token_loss_sum(logits, batch["labels"][:, length - kept :])

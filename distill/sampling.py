"""The student writes its own completions: the sampling half of on-policy distillation.

    prompts (token lists) ─ left pad ─▶ model.generate (KV cache, no grad, eval mode)
        ─▶ new tokens (B, M) ─ keep up to and including the first eos ─▶ a :class:`Rollout`:
        prompt + sample per row, right-padded, positions from 0, ``loss_mask`` on the sample

Generation runs left-padded (decoder-only models continue from the right edge), but the
rollout is laid out right-padded like the dataset's rows (:func:`distill.text_data.tokenize_for_lm`),
so the models score it with positions 0, 1, ... exactly as generation saw them, and the
same loss code serves sampled and dataset completions.

Randomness: sampling draws from torch's global RNG (seeded and checkpointed by the run);
which batches are on-policy comes from a generator seeded by (seed, epoch, batch)
(:func:`on_policy_batch`), so a resumed run makes the same choices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Rollout", "on_policy_batch", "left_pad", "completion_mask", "layout", "sample_completions"]


@dataclass
class Rollout:
    """Prompts with the student's completions, on the CPU, right-padded to the longest row.

    ``loss_mask`` marks the *targets* (as in :func:`distill.text_data.tokenize_for_lm`): the
    sampled tokens up to and including the first eos; never the prompt, never padding."""

    input_ids: torch.Tensor  # (B, L) int64
    attention_mask: torch.Tensor  # (B, L) int64
    loss_mask: torch.Tensor  # (B, L) bool
    completion_lengths: list[int]
    finished: list[bool]  # the completion ended with eos (not cut by max_new_tokens)

    @property
    def count(self) -> int:
        """Target tokens: the sampled ones (known on the CPU)."""
        return int(self.loss_mask.sum())


def on_policy_batch(seed: int, epoch: int, batch: int, lambda_: float) -> bool:
    """Whether batch ``batch`` of epoch ``epoch`` uses the student's samples: true with
    probability ``lambda_``, decided by a generator of its own (no global RNG drawn), so the
    same run — and its resume — make the same choice. lambda 1: always; 0: never."""
    key = ((seed % 2**61) * 1_000_003 + epoch) * 1_000_033 + batch
    draw = torch.rand((), generator=torch.Generator().manual_seed(key % 2**63 ^ 0x0D15_7111))
    return bool(draw < lambda_)


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) ids and attention mask, each prompt flush right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if prompt:
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
    return ids, mask


def completion_mask(new_tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """(B, M) bool: True up to and including each row's first eos (what comes after is padding)."""
    is_eos = (new_tokens == eos).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def layout(prompts: list[list[int]], new_tokens: torch.Tensor, eos: int, pad: int) -> Rollout:
    """Right-padded prompt + completion rows from left-padded generation output's new part (B, M)."""
    keep = completion_mask(new_tokens, eos)
    lengths = keep.sum(1).tolist()
    finished = [bool(n and new_tokens[row, n - 1] == eos) for row, n in enumerate(lengths)]
    width = max(len(p) + n for p, n in zip(prompts, lengths))
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    loss_mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for row, (prompt, n) in enumerate(zip(prompts, lengths)):
        p = len(prompt)
        input_ids[row, :p] = torch.tensor(prompt, dtype=torch.long)
        input_ids[row, p:p + n] = new_tokens[row, :n]
        attention_mask[row, :p + n] = 1
        loss_mask[row, p:p + n] = True  # p >= 1: the first sampled token has a state to predict it
    return Rollout(input_ids, attention_mask, loss_mask, lengths, finished)


def _vocabulary_cut(vocab: int):
    """A logits processor that never samples an id >= ``vocab`` (rows a padded head adds)."""
    from transformers import LogitsProcessor

    class VocabularyCut(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            scores[:, vocab:] = float("-inf")
            return scores

    return VocabularyCut()


# What a model's own generation_config could add to sampling, set to "off": the samples must come
# from the student's distribution (at the asked temperature / top_p), not a tuned decoding recipe.
_NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "num_beams": 1,
            "num_return_sequences": 1}
_NEUTRAL_SAMPLING = {"top_k": 0, "typical_p": 1.0, "min_p": 0.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


@torch.no_grad()
def sample_completions(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                       top_p: float, eos: int, pad: int, vocab: int | None, device: torch.device) -> Rollout:
    """The model's completions of ``prompts`` (each non-empty), as a :class:`Rollout`.

    Batched, left-padded, with the KV cache; temperature 0 is greedy. ``vocab``: sample only
    ids below it (None: all). The model runs in eval mode (no dropout) and is put back in
    the mode it was in. One host sync: the new tokens come back to the CPU."""
    ids, mask = left_pad(prompts, pad)
    sampling = temperature > 0
    options = dict(_NEUTRAL, do_sample=sampling, max_new_tokens=max_new_tokens, eos_token_id=eos,
                   pad_token_id=pad, use_cache=True)
    if sampling:
        options.update(_NEUTRAL_SAMPLING, temperature=temperature, top_p=top_p)
    if vocab is not None and model.get_output_embeddings() is not None \
            and model.get_output_embeddings().weight.shape[0] > vocab:
        from transformers import LogitsProcessorList

        options["logits_processor"] = LogitsProcessorList([_vocabulary_cut(vocab)])
    was_training = model.training
    model.eval()
    try:
        output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)
    finally:
        model.train(was_training)
    return layout(prompts, output[:, ids.shape[1]:].cpu(), eos, pad)

"""Distillation losses.

    registry.py  name -> divergence on log-probabilities (forward_kl, reverse_kl, jsd, tvd);
                 LOSS_TYPES, the one list the API validates against
    token.py     per-position divergences on logits or a top-k teacher signal (TopKSignal),
                 the masked token-level KD loss
    classic.py   the classic soft-target loss: alpha · T² · divergence + (1 − alpha) · CE
    chunked.py   the LM loss over hidden states, output heads applied chunk by chunk
    uld.py       Universal Logit Distillation across tokenizers (sorted-probability L1), alignment, chunked
    intermediate.py  hidden-state (cosine, mse) and attention (MiniLM KL) losses between layers
"""

from .chunked import LOSS_PATHS, LMLoss, chunked_lm_loss, lm_loss, loss_chunk_rows, shifted
from .classic import distillation_loss, forward_kl
from .registry import DIVERGENCES, LOSS_TYPES, get_divergence, register
from .token import TAIL_EPS, TopKSignal, teacher_topk, token_divergence, token_kd_loss

__all__ = ["LOSS_TYPES", "DIVERGENCES", "get_divergence", "register", "TopKSignal", "teacher_topk",
           "token_divergence", "token_kd_loss", "TAIL_EPS", "distillation_loss", "forward_kl", "chunked_lm_loss",
           "loss_chunk_rows", "shifted", "lm_loss", "LMLoss", "LOSS_PATHS"]

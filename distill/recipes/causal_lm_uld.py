"""Causal LM, token-level KD across tokenizers: Universal Logit Distillation (ULD; Boizard
et al. 2024). Runs jobs with ``"loss": {"type": "uld"}``, whose student has a tokenizer of
its own (a pretrained student; the API refuses a derived/architecture student and one that
shares the teacher's tokenizer, where forward_kl is exact).

    load teacher + its tokenizer, student + ITS tokenizer → tokenize the same records twice,
    each model with its own tokenizer (same max_length, no packing) → train on
    alpha · ULD(teacher, student) + (1 − alpha) · CE(next token, student tokenization)
    → evaluate (each model's perplexity on its own tokens, ULD, tokens/s) → export a HF
    directory with the student's tokenizer + model card

Choices, following the paper (distill/losses/uld.py has the loss itself):

- **Alignment.** Record i is row i on both sides (``packing=False``: packing would cut the
  two token streams at different places and put different documents side by side).
  The k-th completion-token prediction of the student is paired with the k-th of the
  teacher, for k < min(n_teacher, n_student): the longer side is truncated, as in the
  paper. prompt_completion records: completion tokens (and eos); text records: every
  token but the first. ``data.packing`` is ignored.
- **Objective.** alpha · mean ULD over the aligned pairs + (1 − alpha) · mean CE over ALL the
  student's target tokens (not only the aligned ones), per batch. alpha is the paper's λ
  (the paper adds λ·ULD to an unweighted CE; here the job's alpha splits the two as for the
  other losses). Both distributions are softmax(logits / T); the ULD term is **not**
  multiplied by T², as in the paper: it is a distance between probability vectors, bounded
  by 2, not a KL whose gradients shrink as 1/T². The default causal_lm T is 1, where the
  two readings agree; a larger T flattens both distributions and weakens the ULD term.
- **Vocabularies.** Each model's logits are cut to the length of its own tokenizer (rows
  past it, e.g. a head padded to a multiple of 64, are not tokens); the shorter sorted
  vector is zero-padded to the longer.
- **Memory.** The teacher runs alongside training under no_grad (a precomputed top-k signal
  would drop the tail the sorted comparison needs; teacher_signal.top_k is refused). The
  heads run chunk by chunk inside activation checkpoints (distill/losses/uld.py).
- **Reports.** validation: the objective, the student's perplexity on its own tokenization,
  and the ULD. Evaluation: perplexities each on the model's own tokenization (not
  comparable token for token when the tokenizations differ in granularity), ULD before and
  after training; top-1 agreement and KL need one vocabulary and are None.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..errors import ModelFormatError
from ..losses.chunked import shifted
from ..losses.uld import align_completions, chunked_uld_loss
from ..text_data import tokenize_for_lm
from ._text import CausalLMBase, LogitsHead, check_kind, lm_metrics, load_splits, resolve_max_length, vocab_rows
from .base import Export, Recipe, register


def tokenizer_vocab(tokenizer, model, who: str) -> int:
    """The logit rows that are tokens: ``len(tokenizer)``, which the model's head must cover."""
    size, rows = len(tokenizer), vocab_rows(model)
    if rows < size:
        raise ModelFormatError(f"the {who}'s embedding matrix has {rows} rows but its tokenizer has {size} tokens; "
                               "the model and tokenizer do not belong together", param=who)
    return size


@register("causal_lm", "token", loss="uld")
class CausalLMULD(CausalLMBase, Recipe):
    def prepare(self) -> None:
        spec, hp, ctx = self.spec, self.hp, self.ctx
        self.load_models()  # the student's own tokenizer for a pretrained student (build_student)
        kind, training, self.val_kind, self.validation = load_splits(spec)
        check_kind(spec.task, kind)
        check_kind(spec.task, self.val_kind, "validation_file")
        self.teacher_vocab = tokenizer_vocab(self.teacher_tokenizer, self.teacher_model, "teacher")
        self.student_vocab = tokenizer_vocab(self.tokenizer, self.model, "student")
        max_length = resolve_max_length(spec, self.teacher_model, self.model)

        def tokenize(records, record_kind, tokenizer):
            return tokenize_for_lm(record_kind, records, tokenizer, max_length, packing=False)

        self.tokens = tokenize(training, kind, self.tokenizer)  # the student's tokenization
        self.teacher_tokens = tokenize(training, kind, self.teacher_tokenizer)
        self.val_tokens = tokenize(self.validation, self.val_kind, self.tokenizer)
        self.teacher_val_tokens = tokenize(self.validation, self.val_kind, self.teacher_tokenizer)
        self.student = LogitsHead(self.model, self.tokens["input_ids"][:1].to(self.device),
                                  self.tokens["attention_mask"][:1].to(self.device))
        self.teacher_head = LogitsHead(self.teacher_model, self.teacher_tokens["input_ids"][:1].to(self.device),
                                       self.teacher_tokens["attention_mask"][:1].to(self.device))
        # CausalLMBase.lm_evaluation compares the models over one vocabulary when self.teacher is set;
        # here there is none: it reports the student on its own tokens (self.shared = its vocabulary).
        self.teacher, self.shared = None, self.student_vocab
        ctx.on_event("alignment", self._alignment_summary())
        from ..loop import autocast_for  # here, not at the top: distill.loop imports this package

        self.before = lm_metrics(None, self.student, self.val_tokens, self.student_vocab, self.device, hp.batch_size)
        with torch.no_grad(), autocast_for(self.device, hp.precision):  # as the loop runs validate()
            self.before_validation = self.validate()
        self.num_examples = self.tokens["input_ids"].shape[0]

    def _alignment_summary(self) -> dict:
        """Target tokens on each side and how many predictions are paired (training set)."""
        student_rows, _ = align_completions(self.tokens["loss_mask"], self.teacher_tokens["loss_mask"])
        return {"records": self.tokens["input_ids"].shape[0],
                "student_tokens": int(self.tokens["loss_mask"][:, 1:].sum()),
                "teacher_tokens": int(self.teacher_tokens["loss_mask"][:, 1:].sum()),
                "aligned_positions": student_rows.numel()}

    @staticmethod
    def _rows(tokens: dict, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, attention mask, loss mask) of these records, cut to their longest row (CPU)."""
        mask = tokens["attention_mask"][indices]
        length = max(int(mask.sum(1).max()), 1)
        return tokens["input_ids"][indices, :length], mask[:, :length], tokens["loss_mask"][indices, :length]

    def _sums(self, student_tokens: dict, teacher_tokens: dict, indices: torch.Tensor,
              need_ce: bool) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(Σ ULD over the pairs, Σ CE over the student's targets, pairs, targets) for these records."""
        device = self.device
        ids, mask, select = self._rows(student_tokens, indices)
        t_ids, t_mask, t_select = self._rows(teacher_tokens, indices)
        student_rows, teacher_rows = align_completions(select, t_select)  # CPU: counts without a sync
        states, targets = shifted(self.student.body(ids.to(device), mask.to(device)), ids.to(device),
                                  select.to(device))  # (N, H), (N,)
        with torch.no_grad():
            t_ids = t_ids.to(device)
            t_states = shifted(self.teacher_head.body(t_ids, t_mask.to(device)), t_ids, t_select.to(device))[0]
            t_states = t_states[teacher_rows.to(device)]  # (M, H), in student_rows order
        uld, ce = chunked_uld_loss(self.student.head, states, targets, self.student_vocab, student_rows,
                                   self.teacher_head.head, t_states, self.teacher_vocab, self.hp.temperature,
                                   need_ce=need_ce)
        return uld, ce, student_rows.numel(), targets.shape[0]

    def batch_loss(self, indices: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        hp = self.hp
        count = int(self.tokens["loss_mask"][indices][:, 1:].sum())  # from the CPU copy: no device sync
        if count == 0:
            return None, 0
        uld, ce, pairs, _ = self._sums(self.tokens, self.teacher_tokens, indices, need_ce=hp.alpha < 1)
        return hp.alpha * uld / max(pairs, 1) + (1 - hp.alpha) * ce / count, count

    def validate(self) -> dict:
        hp, device = self.hp, self.device
        uld_total = torch.zeros((), device=device, dtype=torch.float64)
        ce_total = torch.zeros((), device=device, dtype=torch.float64)
        pairs = count = 0
        n = self.val_tokens["input_ids"].shape[0]
        for start in range(0, n, hp.batch_size):
            indices = torch.arange(start, min(start + hp.batch_size, n))
            uld, ce, batch_pairs, batch_count = self._sums(self.val_tokens, self.teacher_val_tokens, indices, True)
            uld_total, ce_total = uld_total + uld, ce_total + ce
            pairs, count = pairs + batch_pairs, count + batch_count
        uld_mean, ce_mean = uld_total.item() / max(pairs, 1), ce_total.item() / max(count, 1)
        return {"validation_loss": hp.alpha * uld_mean + (1 - hp.alpha) * ce_mean,
                "validation_perplexity": math.exp(ce_mean), "validation_uld": uld_mean}

    def evaluate(self) -> dict:
        evaluation = self.lm_evaluation()  # student perplexity (own tokens), speeds, parameters
        teacher = lm_metrics(None, self.teacher_head, self.teacher_val_tokens, self.teacher_vocab, self.device,
                             self.hp.batch_size, check_stop=self.ctx.check_stop)
        after = self.validate()
        pairs = align_completions(self.val_tokens["loss_mask"], self.teacher_val_tokens["loss_mask"])[0].numel()
        evaluation["teacher"]["perplexity"] = teacher["student_perplexity"]
        evaluation["top1_agreement"] = evaluation["kl_teacher_student"] = None  # no shared vocabulary
        evaluation["uld"] = {"validation_uld": after["validation_uld"],
                             "validation_uld_before_training": self.before_validation["validation_uld"],
                             "temperature": self.hp.temperature, "aligned_positions": pairs,
                             "teacher_tokens": teacher["tokens"], "student_tokens": evaluation["validation_tokens"],
                             "teacher_vocab_size": self.teacher_vocab, "student_vocab_size": self.student_vocab}
        return evaluation

    def export(self, folder: Path, evaluation: dict, history: list[dict]) -> Export:
        return self.hf_export(folder, evaluation, history)  # self.tokenizer is the student's

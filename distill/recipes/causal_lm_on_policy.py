"""Causal LM, on-policy distillation (GKD, Agarwal et al. 2024): the student writes the
completions, the teacher scores every token of them. lambda = 1 with reverse KL is the
Thinking Machines on-policy recipe.

    load teacher + student (one tokenizer) → prompts, cut from the left so prompt +
    on_policy.max_new_tokens ≤ max_length → per batch, with probability lambda (decided by
    (seed, epoch, batch), so a resume decides alike):
        on-policy:  the student samples (eval mode, no grad, KV cache) → prompt + sample,
                    right-padded → teacher (no grad) and student score it → loss on the
                    sampled tokens (up to and including the first eos)
        off-policy: the dataset's prompt + completion, exactly the token-level recipe's loss
    loss = alpha · T² · divergence(teacher ‖ student) + (1 − alpha) · CE(token), per target token
    → validation each epoch on the student's own samples, drawn with a fixed seed
    → evaluation (on_policy.before / .after) → export a HF directory + model card

Sampling draws from torch's global RNG (the run seeds it and step checkpoints save it);
validation samples inside ``torch.random.fork_rng`` so it never disturbs training.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MismatchError
from ..hf import shared_vocab_size
from ..losses import lm_loss, loss_chunk_rows, shifted, token_divergence
from ..sampling import Rollout, on_policy_batch, sample_completions
from ..text_data import _bos_prefix, _special_ids, tokenize_for_lm
from ._text import CausalLMBase, lm_metrics, load_splits, prompts_of, resolve_max_length, vocab_rows
from .base import Export, Recipe, register

VALIDATION_PROMPTS = 64  # validation samples at most this many prompts: its cost stays bounded
VALIDATION_SEED_OFFSET = 0x5A3E  # validation samples from seed + this, inside fork_rng


@register("causal_lm", "on_policy")
class CausalLMOnPolicy(CausalLMBase, Recipe):
    # ---- prepare ----------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        spec, hp, ctx, options = self.spec, self.hp, self.ctx, self.spec.on_policy
        kind, training, self.val_kind, self.validation = load_splits(spec)
        self._check_data(kind, self.val_kind)
        self.load_models()
        self.shared = shared_vocab_size(self.teacher_tokenizer, self.tokenizer, vocab_rows(self.teacher_model),
                                        vocab_rows(self.model))
        max_length = resolve_max_length(spec, self.teacher_model, self.model)
        if options.max_new_tokens >= max_length:
            raise MismatchError(f"on_policy.max_new_tokens {options.max_new_tokens} leaves no room for a prompt within "
                                f"max_length {max_length}; use fewer new tokens or a longer data.max_length",
                                param="on_policy.max_new_tokens")
        self.eos, self.pad = _special_ids(self.tokenizer)
        room = max_length - options.max_new_tokens
        self.prompts = self.encode_prompts(prompts_of(kind, training), room)
        self.val_prompts = self.encode_prompts(prompts_of(self.val_kind, self.validation[:VALIDATION_PROMPTS]), room)
        # The dataset's completions, for the off-policy batches (and the reference perplexity).
        self.tokens = tokenize_for_lm(kind, training, self.tokenizer, max_length, spec.data.packing) \
            if kind == "prompt_completion" and options.lambda_ < 1 else None
        self.val_tokens = tokenize_for_lm(self.val_kind, self.validation, self.tokenizer, max_length,
                                          spec.data.packing) if self.val_kind == "prompt_completion" else None
        probe = torch.tensor([self.prompts[0]])
        self.heads({"input_ids": probe, "attention_mask": torch.ones_like(probe)}, with_teacher=True)
        self.num_examples = len(self.prompts)
        ctx.stage("on_policy", **{"lambda": options.lambda_, "max_new_tokens": options.max_new_tokens,
                                  "temperature": options.temperature, "top_p": options.top_p,
                                  "loss_type": spec.loss.type, "validation_prompts": len(self.val_prompts)})
        self.before = lm_metrics(None, self.student, self.val_tokens, self.shared, self.device, hp.batch_size) \
            if self.val_tokens is not None else None
        self.on_policy_before = self.on_policy_metrics()
        self.on_policy_latest: dict | None = None

    def _check_data(self, kind: str, val_kind: str) -> None:
        for param, found in (("training_file", kind), ("validation_file", val_kind)):
            if found not in ("prompt_completion", "prompt"):
                raise MismatchError(f"method on_policy needs prompts: {{\"prompt\"}} or {{\"prompt\", \"completion\"}} "
                                    f"records; {param} holds '{found}'", param=param)
        lambda_ = self.spec.on_policy.lambda_
        if kind == "prompt" and lambda_ < 1:
            raise MismatchError(f"training_file holds prompts only, but on_policy.lambda {lambda_} asks for "
                                f"{1 - lambda_:.0%} of the batches on the dataset's completions; use lambda 1 or "
                                "prompt/completion records", param="on_policy.lambda")

    def encode_prompts(self, prompts: list[str], room: int) -> list[list[int]]:
        """Token ids as the dataset rows start (bos first if the tokenizer adds one); a long prompt
        keeps its last tokens so that it fits in ``room``; an empty one is [bos] (or [eos])."""
        prefix = _bos_prefix(self.tokenizer)
        keep = max(room - len(prefix), 0)
        encoded = self.tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos
        return [(prefix + (ids[len(ids) - keep:] if keep else [])) or [start] for ids in encoded]

    # ---- training ----------------------------------------------------------------------------------------------

    def batch_loss(self, indices: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        epoch, batch = self.position  # set by the loop before every batch (resume included)
        if not on_policy_batch(self.hp.seed, epoch, batch, self.spec.on_policy.lambda_):
            select_cpu = self.tokens["loss_mask"][indices]
            return self.lm_loss(self.tokens["input_ids"][indices], self.tokens["attention_mask"][indices], select_cpu)
        rollout = self.rollout([self.prompts[i] for i in indices.tolist()])
        return self.lm_loss(rollout.input_ids, rollout.attention_mask, rollout.loss_mask)

    def rollout(self, prompts: list[list[int]]) -> Rollout:
        """The student's completions of ``prompts`` (global RNG; eval mode, then back). No stop check
        here: in training the loop checks after the step (and checkpoints first)."""
        options = self.spec.on_policy
        return sample_completions(self.model, prompts, options.max_new_tokens, options.temperature, options.top_p,
                                  self.eos, self.pad, self.shared, self.device)

    def lm_loss(self, ids_cpu: torch.Tensor, mask_cpu: torch.Tensor, select_cpu: torch.Tensor
                ) -> tuple[torch.Tensor | None, int]:
        """The token-level loss (as :class:`~distill.recipes.causal_lm.CausalLMToken` with the teacher
        online) on rows whose targets are ``select_cpu`` (B, L): mean per target token, and the count."""
        hp, spec, device = self.hp, self.spec, self.device
        count = int(select_cpu[:, 1:].sum())  # from the CPU copy: no device sync
        if count == 0:
            return None, 0
        ids, mask, select = ids_cpu.to(device), mask_cpu.to(device), select_cpu.to(device)
        states, targets = shifted(self.student.body(ids, mask), ids, select)  # (N, H), (N,)
        with torch.no_grad():
            teacher_side = (self.teacher.head, shifted(self.teacher.body(ids, mask), ids, select)[0])
        loss = lm_loss(self.student.head, states, targets, teacher_side, self.shared, spec.loss.type, hp.temperature,
                       spec.loss.beta, hp.alpha * hp.temperature**2, 1 - hp.alpha).total
        return loss / count, count

    # ---- validation and evaluation --------------------------------------------------------------------------

    def validate(self) -> dict:
        metrics = self.on_policy_latest = self.on_policy_metrics()
        return {"validation_loss": metrics["loss"], "validation_on_policy_reverse_kl": metrics["reverse_kl"],
                "validation_teacher_nll": metrics["teacher_nll"], "validation_divergence": metrics["divergence"],
                "validation_sampled_tokens": metrics["tokens"]}

    @torch.no_grad()
    def on_policy_metrics(self) -> dict:
        """On the student's own samples of the validation prompts, drawn with a fixed seed (comparable
        across epochs; the training RNG is left as it was), per sampled token: ``loss`` (the training
        objective), ``divergence`` (the chosen one, at T), ``reverse_kl`` (KL(student‖teacher) at T = 1),
        ``teacher_nll`` and ``student_nll``; plus ``tokens`` and ``finished`` (share ending in eos)."""
        hp = self.hp
        devices = [self.device] if self.device.type == "cuda" else []
        zero = lambda: torch.zeros((), device=self.device, dtype=torch.float64)  # noqa: E731
        totals = {"divergence": zero(), "reverse_kl": zero(), "teacher_nll": zero(), "student_nll": zero()}
        count, finished = 0, 0
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(hp.seed + VALIDATION_SEED_OFFSET)
                for start in range(0, len(self.val_prompts), hp.batch_size):
                    rollout = self.rollout(self.val_prompts[start:start + hp.batch_size])
                    self._score(rollout, totals)
                    count, finished = count + rollout.count, finished + sum(rollout.finished)
                    self.ctx.check_stop("sampling the validation prompts")
        finally:
            self.model.train(was_training)
        values = {k: v.item() / max(count, 1) for k, v in totals.items()}
        t = hp.temperature
        return {"loss": hp.alpha * t * t * values["divergence"] + (1 - hp.alpha) * values["student_nll"],
                **values, "tokens": count, "finished": finished / max(len(self.val_prompts), 1)}

    def _score(self, rollout: Rollout, totals: dict) -> None:
        loss = self.spec.loss
        ids, mask = rollout.input_ids.to(self.device), rollout.attention_mask.to(self.device)
        select = rollout.loss_mask.to(self.device)
        s_states, targets = shifted(self.student.body(ids, mask), ids, select)
        t_states = shifted(self.teacher.body(ids, mask), ids, select)[0]
        chunk = loss_chunk_rows(self.shared)
        for c in range(0, targets.shape[0], chunk):
            rows = slice(c, c + chunk)
            s_logits = self.student.head(s_states[rows])[..., :self.shared].float()
            t_logits = self.teacher.head(t_states[rows])[..., :self.shared].float()
            totals["divergence"] += token_divergence(s_logits, t_logits, loss.type, self.hp.temperature,
                                                     loss.beta).sum()
            totals["reverse_kl"] += token_divergence(s_logits, t_logits, "reverse_kl", 1.0).sum()
            totals["teacher_nll"] += F.cross_entropy(t_logits, targets[rows], reduction="sum")
            totals["student_nll"] += F.cross_entropy(s_logits, targets[rows], reduction="sum")

    def evaluate(self) -> dict:
        after = self.on_policy_latest if self.on_policy_latest is not None else self.on_policy_metrics()
        evaluation = self.lm_evaluation() if self.val_tokens is not None else self._evaluation_without_references()
        options = self.spec.on_policy
        evaluation["on_policy"] = {"before": self.on_policy_before, "after": after, "lambda": options.lambda_,
                                   "max_new_tokens": options.max_new_tokens, "temperature": options.temperature,
                                   "validation_prompts": len(self.val_prompts)}
        return evaluation

    def _evaluation_without_references(self) -> dict:
        """:meth:`lm_evaluation`'s report where the validation records are prompts only: it runs on
        no reference tokens (speeds and sizes as usual), then what needs reference completions
        (perplexities, agreement, KL on them) is None rather than a number of nothing."""
        nothing = torch.zeros(0, 1, dtype=torch.long)
        empty = {"input_ids": nothing, "attention_mask": nothing, "loss_mask": nothing.bool()}
        self.val_tokens, self.before = empty, {"student_perplexity": None}
        try:
            evaluation = self.lm_evaluation()
        finally:
            self.val_tokens, self.before = None, None
        evaluation["teacher"]["perplexity"] = evaluation["student"]["perplexity"] = None
        evaluation.update(top1_agreement=None, kl_teacher_student=None, validation_tokens=0)
        return evaluation

    def export(self, folder: Path, evaluation: dict, history: list[dict]) -> Export:
        return self.hf_export(folder, evaluation, history)

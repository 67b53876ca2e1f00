"""Causal LM, sequence-level KD (Kim & Rush 2016): the teacher writes completions for the
prompts, the generated set is saved (``generated.jsonl``, downloadable), and the student
is trained on it with plain next-token cross-entropy. No logits cross between the
models, so teacher and student may use different tokenizers.

On resume the saved generated set is reused: the teacher does not generate again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import MismatchError
from ..hf import shared_vocab_size
from ..losses import lm_loss, shifted
from ..text_data import tokenize_for_lm
from ._text import (CausalLMBase, check_kind, generate_completions, lm_metrics, load_splits, prompts_of,
                    resolve_max_length, vocab_rows)
from .base import Export, Recipe, register

GENERATED_FILE = "generated.jsonl"


@register("causal_lm", "sequence")
class CausalLMSequence(CausalLMBase, Recipe):
    def prepare(self) -> None:
        spec, hp, ctx = self.spec, self.hp, self.ctx
        self.load_models()
        kind, training, self.val_kind, self.validation = load_splits(spec)
        check_kind(spec.task, kind)
        check_kind(spec.task, self.val_kind, "validation_file")
        self.generated_path = ctx.out_dir / GENERATED_FILE
        if ctx.resume and self.generated_path.is_file():
            # Our own file, read back whole: the records keep their "truncated" flags.
            training = [json.loads(line) for line in self.generated_path.read_text().splitlines() if line]
        else:
            ctx.stage("generating", prompts=len(training))
            training = generate_completions(self.teacher_model, self.teacher_tokenizer, prompts_of(kind, training),
                                            spec.generation, self.device, ctx.should_stop)
            self.generated_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.generated_path.with_suffix(".part")
            tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in training))
            tmp.replace(self.generated_path)
        ctx.on_event("generated", {"rows": len(training), "file": GENERATED_FILE})
        try:
            self.shared = shared_vocab_size(self.teacher_tokenizer, self.tokenizer, vocab_rows(self.teacher_model),
                                            vocab_rows(self.model))
        except MismatchError:
            self.shared = None  # different tokenizers: fine for sequence KD; no token-level comparison
        self.vocab = self.shared or vocab_rows(self.model)
        max_length = resolve_max_length(spec, self.model)
        self.tokens = tokenize_for_lm("prompt_completion", training, self.tokenizer, max_length, spec.data.packing)
        self.val_tokens = tokenize_for_lm(self.val_kind, self.validation, self.tokenizer, max_length,
                                          spec.data.packing)
        self.heads(self.tokens, with_teacher=self.shared is not None)
        self.before = lm_metrics(None, self.student, self.val_tokens, self.shared, self.device, hp.batch_size)
        self.num_examples = self.tokens["input_ids"].shape[0]

    def batch_loss(self, indices: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        select_cpu = self.tokens["loss_mask"][indices]
        count = int(select_cpu[:, 1:].sum())
        if count == 0:
            return None, 0
        ids = self.tokens["input_ids"][indices].to(self.device)
        mask = self.tokens["attention_mask"][indices].to(self.device)
        states, targets = shifted(self.student.body(ids, mask), ids, select_cpu.to(self.device))
        ce = lm_loss(self.student.head, states, targets, None, self.vocab, self.spec.loss.type, self.hp.temperature,
                     self.spec.loss.beta, 0.0, 1.0).total
        return ce / count, count

    def validate(self) -> dict:
        hp, loss = self.hp, self.spec.loss
        objective = {"loss_type": loss.type, "temperature": hp.temperature, "beta": loss.beta, "alpha": 0.0}
        metrics = lm_metrics(None, self.student, self.val_tokens, self.shared, self.device, hp.batch_size,
                             objective=objective)
        return {"validation_loss": metrics["loss"], "validation_perplexity": metrics["student_perplexity"]}

    def evaluate(self) -> dict:
        return self.lm_evaluation()

    def export(self, folder: Path, evaluation: dict, history: list[dict]) -> Export:
        return self.hf_export(folder, evaluation, history, generated_path=self.generated_path)

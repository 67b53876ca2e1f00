"""Text classification: classic soft targets over the labels, for transformers classifiers.

The teacher's logits over the labels are computed once (with the teacher's tokenizer);
the student trains on them with its own tokenizer, so the two may tokenize differently. Several
teachers (each with its own tokenizer, one label set) are mixed at temperature T (``_teachers.py``) —
except with ``intermediate``, where the teacher also runs on the student's tokens every batch
for its hidden states (recipes/_intermediate.py), which needs one tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import MismatchError, VocabularyMismatch
from ..hf import load_classifier, load_tokenizer, shared_vocab_size
from ..kinds import get_kind
from ..lora import adapter_dir, is_lora, student_parameters, trainable_parameters
from ..losses import distillation_loss, token_divergence
from ..models import count_parameters
from ..text_data import tokenize_for_classification
from ._intermediate import WithIntermediate
from ._teachers import mixture_logits, teacher_reports
from ._text import build_student, card, check_kind, hf_architecture, load_splits, resolve_max_length
from .base import Export, Recipe, register


@torch.no_grad()
def classifier_logits(model: nn.Module, tokens: dict, device: torch.device, batch_size: int,
                      check_stop=None) -> torch.Tensor:
    """(N, C) float32 logits, on ``device``."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in range(0, tokens["input_ids"].shape[0], batch_size):
        chunks.append(model(input_ids=tokens["input_ids"][start:start + batch_size].to(device),
                            attention_mask=tokens["attention_mask"][start:start + batch_size].to(device)
                            ).logits.float())
        if check_stop is not None:
            check_stop("running the teacher")
    model.train(was_training)
    return torch.cat(chunks)


def classifier_evaluation(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    teacher_pred, student_pred = teacher_logits.argmax(-1), student_logits.argmax(-1)
    teacher_accuracy = (teacher_pred == labels).float().mean().item()
    student_accuracy = (student_pred == labels).float().mean().item()
    return {"teacher": {"accuracy": teacher_accuracy}, "student": {"accuracy": student_accuracy},
            "agreement": (teacher_pred == student_pred).float().mean().item(),
            "kl_teacher_student": token_divergence(student_logits, teacher_logits, "forward_kl", 1.0).mean().item(),
            "accuracy_retention": student_accuracy / teacher_accuracy if teacher_accuracy else None}


@register("text_classification")
class TextClassification(WithIntermediate, Recipe):
    def prepare(self) -> None:
        spec, hp, device, ctx = self.spec, self.hp, self.device, self.ctx
        # several teachers: each with its own tokenizer; the first is the one a derived student copies
        self.teachers = []
        for path, _ in spec.teacher_paths:
            self.teachers.append((load_classifier(path, device=device).eval(), load_tokenizer(path)))
            ctx.check_stop("loading the teacher")
        self.weights = [weight for _, weight in spec.teacher_paths]
        self.teacher_model, teacher_tokenizer = self.teachers[0]
        self.model, self.tokenizer = build_student(spec, self.teacher_model, teacher_tokenizer, device)
        for teacher, _ in self.teachers:  # after build_student: a derived student copies the teacher
            teacher.requires_grad_(False)
        kind, training, val_kind, validation = load_splits(spec)
        check_kind(spec.task, kind)
        check_kind(spec.task, val_kind, "validation_file")
        num_labels = self.teacher_model.config.num_labels
        for i, (teacher, _) in enumerate(self.teachers[1:], start=1):
            if teacher.config.num_labels != num_labels:
                raise MismatchError(f"teachers[{i}] has {teacher.config.num_labels} labels, teachers[0] has "
                                    f"{num_labels}: every teacher needs the same label set", param=f"teachers[{i}]")
        for param, records in (("training_file", training), ("validation_file", validation)):
            biggest = max(r["label"] for r in records)
            if biggest >= num_labels:
                raise MismatchError(f"{param} has label {biggest} but the teacher has {num_labels} labels "
                                    f"(0..{num_labels - 1})", param=param)
        if self.model.config.num_labels != num_labels:
            raise MismatchError(f"the student has {self.model.config.num_labels} labels, the teacher {num_labels}",
                                param="student")
        length = resolve_max_length(spec, *(teacher for teacher, _ in self.teachers), self.model)
        ctx.stage("teacher_inference", rows=len(training) + len(validation), teachers=len(self.teachers))
        # each teacher once, on its own tokenization; several are mixed at temperature T (_teachers.py)
        train_logits, self.each_val_logits = [], []
        for teacher, tokenizer in self.teachers:
            train_logits.append(classifier_logits(teacher, tokenize_for_classification(
                training, tokenizer, length), device, hp.batch_size, ctx.check_stop))
            self.each_val_logits.append(classifier_logits(teacher, tokenize_for_classification(
                validation, tokenizer, length), device, hp.batch_size, ctx.check_stop))
        self.teacher_train = mixture_logits(train_logits, self.weights, hp.temperature)
        self.teacher_val = mixture_logits(self.each_val_logits, self.weights, hp.temperature)
        self.tokens = tokenize_for_classification(training, self.tokenizer, length)
        self.val_tokens = tokenize_for_classification(validation, self.tokenizer, length)
        self.val_labels = self.val_tokens["labels"].to(device)
        self.num_examples = self.tokens["input_ids"].shape[0]
        if spec.intermediate is not None:
            self._check_one_tokenizer(teacher_tokenizer)
            self.setup_intermediate(self.tokens, student_base=False, teacher_base=False)

    def _check_one_tokenizer(self, teacher_tokenizer) -> None:
        if self.tokenizer is teacher_tokenizer:
            return
        try:
            shared_vocab_size(teacher_tokenizer, self.tokenizer, self.teacher_model.config.vocab_size,
                              self.model.config.vocab_size)
        except VocabularyMismatch:
            raise MismatchError("intermediate runs the teacher on the student's tokens, but the student's tokenizer "
                                "differs from the teacher's; give the student the teacher's tokenizer or leave "
                                "intermediate out", param="intermediate") from None

    def _loss(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, self.hp.temperature, self.hp.alpha,
                                 self.spec.loss.type, self.spec.loss.beta)

    def batch_loss(self, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
        device = self.device
        ids = self.tokens["input_ids"][indices].to(device)
        mask = self.tokens["attention_mask"][indices].to(device)
        target_device = indices.to(device)
        if self.intermediate is None:
            logits = self.model(input_ids=ids, attention_mask=mask).logits
        else:  # one forward with hidden states: its logits feed the output-level loss
            student = self.intermediate.student_features(ids, mask)
            logits = student.output
        loss = self._loss(logits, self.teacher_train[target_device], self.tokens["labels"][indices].to(device))
        if self.intermediate is not None:
            loss = loss + self.intermediate.loss(student, self.intermediate.teacher_features(ids, mask), mask)
        return loss, len(indices)

    def _student_val_logits(self) -> torch.Tensor:
        return classifier_logits(self.model, self.val_tokens, self.device, self.hp.batch_size)

    def validate(self) -> dict:
        logits = self._student_val_logits()
        report = classifier_evaluation(self.teacher_val, logits, self.val_labels)
        record = {"validation_loss": self._loss(logits, self.teacher_val, self.val_labels).item(),
                  "validation_agreement": report["agreement"], "validation_accuracy": report["student"]["accuracy"]}
        if self.intermediate is not None:
            # validation_loss stays the training objective (as train_loss): output level + weighted terms
            terms = self.intermediate.validate(self.val_tokens, self.device, self.hp.batch_size)
            record.update(terms, validation_loss=record["validation_loss"] + self.intermediate.weighted(terms))
        return record

    def evaluate(self) -> dict:
        if self.intermediate is not None:
            self.intermediate.restore_attention()
        student_logits = self._student_val_logits()
        evaluation = classifier_evaluation(self.teacher_val, student_logits, self.val_labels)
        teacher_params = sum(count_parameters(teacher) for teacher, _ in self.teachers)
        student_params = student_parameters(self.model)
        evaluation["teacher"]["parameters"] = teacher_params
        evaluation["student"]["parameters"] = student_params
        evaluation["student"]["trainable_parameters"] = trainable_parameters(self.model)
        if len(self.teachers) > 1:
            evaluation["teachers"] = teacher_reports(self.spec, [t for t, _ in self.teachers], self.each_val_logits,
                                                     student_logits, self.val_labels)
        evaluation["parameter_ratio"] = student_params / teacher_params
        evaluation["device"] = str(self.device)
        if self.intermediate is not None:
            evaluation["intermediate"] = self.intermediate.describe()
        return evaluation

    def export(self, folder: Path, evaluation: dict, history: list[dict]) -> Export:
        kind = get_kind("hf")
        path = kind.export(self.model, folder, tokenizer=self.tokenizer,
                           card=card(self.spec, self.model, evaluation, history))
        return Export(model_path=path, kind=kind.name, architecture=hf_architecture(self.model, self.spec.task),
                      parameters=student_parameters(self.model),
                      adapter_path=adapter_dir(path) if is_lora(self.model) else None)

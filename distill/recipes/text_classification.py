"""Text classification: classic soft targets over the labels, for transformers classifiers.

The teacher's logits over the labels are computed once (with the teacher's tokenizer);
the student trains on them with its own tokenizer, so the two may tokenize differently.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import MismatchError
from ..hf import load_classifier, load_tokenizer
from ..kinds import get_kind
from ..losses import distillation_loss, token_divergence
from ..models import count_parameters
from ..text_data import tokenize_for_classification
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
class TextClassification(Recipe):
    def prepare(self) -> None:
        spec, hp, device, ctx = self.spec, self.hp, self.device, self.ctx
        self.teacher_model = load_classifier(spec.teacher, device=device).eval()
        teacher_tokenizer = load_tokenizer(spec.teacher)
        ctx.check_stop("loading the teacher")
        self.model, self.tokenizer = build_student(spec, self.teacher_model, teacher_tokenizer, device)
        self.teacher_model.requires_grad_(False)  # after build_student: a derived student copies the teacher
        kind, training, val_kind, validation = load_splits(spec)
        check_kind(spec.task, kind)
        check_kind(spec.task, val_kind, "validation_file")
        num_labels = self.teacher_model.config.num_labels
        for param, records in (("training_file", training), ("validation_file", validation)):
            biggest = max(r["label"] for r in records)
            if biggest >= num_labels:
                raise MismatchError(f"{param} has label {biggest} but the teacher has {num_labels} labels "
                                    f"(0..{num_labels - 1})", param=param)
        if self.model.config.num_labels != num_labels:
            raise MismatchError(f"the student has {self.model.config.num_labels} labels, the teacher {num_labels}",
                                param="student")
        length = resolve_max_length(spec, self.teacher_model, self.model)
        ctx.stage("teacher_inference", rows=len(training) + len(validation))
        self.teacher_train = classifier_logits(self.teacher_model, tokenize_for_classification(
            training, teacher_tokenizer, length), device, hp.batch_size, ctx.check_stop)
        self.teacher_val = classifier_logits(self.teacher_model, tokenize_for_classification(
            validation, teacher_tokenizer, length), device, hp.batch_size, ctx.check_stop)
        self.tokens = tokenize_for_classification(training, self.tokenizer, length)
        self.val_tokens = tokenize_for_classification(validation, self.tokenizer, length)
        self.val_labels = self.val_tokens["labels"].to(device)
        self.num_examples = self.tokens["input_ids"].shape[0]

    def _loss(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, self.hp.temperature, self.hp.alpha,
                                 self.spec.loss.type, self.spec.loss.beta)

    def batch_loss(self, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
        device = self.device
        logits = self.model(input_ids=self.tokens["input_ids"][indices].to(device),
                            attention_mask=self.tokens["attention_mask"][indices].to(device)).logits
        target_device = indices.to(device)
        return self._loss(logits, self.teacher_train[target_device],
                          self.tokens["labels"][indices].to(device)), len(indices)

    def _student_val_logits(self) -> torch.Tensor:
        return classifier_logits(self.model, self.val_tokens, self.device, self.hp.batch_size)

    def validate(self) -> dict:
        logits = self._student_val_logits()
        report = classifier_evaluation(self.teacher_val, logits, self.val_labels)
        return {"validation_loss": self._loss(logits, self.teacher_val, self.val_labels).item(),
                "validation_agreement": report["agreement"], "validation_accuracy": report["student"]["accuracy"]}

    def evaluate(self) -> dict:
        evaluation = classifier_evaluation(self.teacher_val, self._student_val_logits(), self.val_labels)
        teacher_params, student_params = count_parameters(self.teacher_model), count_parameters(self.model)
        evaluation["teacher"]["parameters"] = teacher_params
        evaluation["student"]["parameters"] = student_params
        evaluation["parameter_ratio"] = student_params / teacher_params
        evaluation["device"] = str(self.device)
        return evaluation

    def export(self, folder: Path, evaluation: dict, history: list[dict]) -> Export:
        kind = get_kind("hf")
        path = kind.export(self.model, folder, tokenizer=self.tokenizer,
                           card=card(self.spec, self.model, evaluation, history))
        return Export(model_path=path, kind=kind.name, architecture=hf_architecture(self.model, self.spec.task),
                      parameters=count_parameters(self.model))

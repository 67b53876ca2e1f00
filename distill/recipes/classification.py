"""MLP classification on tabular data: classic soft-target KD.

    teacher (MLP model file) + CSV/JSONL rows → teacher logits once, (N, C), kept on the
    device → student MLP trained on alpha · T² · KL + (1 − alpha) · CE(labels, if any)
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data import TabularDataset, load_dataset, split_dataset
from ..errors import DataError, MismatchError, ModelFormatError
from ..evaluate import classification_metrics, evaluate
from ..kinds import get_kind
from ..losses import distillation_loss
from ..models import MLP, MLPArchitecture
from ..teacher_signal import compute_logits
from ._teachers import MixtureClassifier, mixture_logits, teacher_reports
from .base import Export, Recipe, register


def _load(path: Path, param: str) -> TabularDataset:
    try:
        return load_dataset(path)
    except DataError as exc:
        raise DataError(f"{param}: {exc.message}", param=param, line=exc.line) from None


def check_compatible(teacher: MLPArchitecture, training: TabularDataset, validation: TabularDataset) -> None:
    """Teacher and data must agree on feature count and label range; say which file doesn't."""
    for name, dataset in (("training_file", training), ("validation_file", validation)):
        if dataset.num_features != teacher.input_dim:
            raise MismatchError(f"{name} has {dataset.num_features} features per row but the teacher takes "
                                f"{teacher.input_dim}", param=name)
        if dataset.labels is not None and int(dataset.labels.max()) >= teacher.num_classes:
            raise MismatchError(f"{name} has label {int(dataset.labels.max())} but the teacher has "
                                f"{teacher.num_classes} classes (labels 0..{teacher.num_classes - 1})", param=name)


@register("classification")
class MLPClassification(Recipe):
    def prepare(self) -> None:
        spec, device = self.spec, self.device
        self.teachers = []
        for i, (path, _) in enumerate(spec.teacher_paths):
            param = "teacher" if spec.teachers is None else f"teachers[{i}]"
            try:
                teacher = get_kind("mlp").load(path, device)
            except ModelFormatError as exc:
                raise ModelFormatError(f"{param}: {exc.message}", param=param, tensor=exc.tensor) from None
            first = self.teachers[0].architecture if self.teachers else teacher.architecture
            arch = teacher.architecture
            if (arch.input_dim, arch.num_classes) != (first.input_dim, first.num_classes):
                raise MismatchError(f"{param} takes {arch.input_dim} features and has {arch.num_classes} classes; "
                                    f"teachers[0] takes {first.input_dim} and has {first.num_classes}: every "
                                    "teacher needs the same inputs and label set", param=param)
            self.teachers.append(teacher)
        self.weights = [weight for _, weight in spec.teacher_paths]
        # One teacher: itself. Several: one module whose logits are their mixture at temperature T.
        self.teacher = self.teachers[0] if len(self.teachers) == 1 else \
            MixtureClassifier(self.teachers, self.weights, self.hp.temperature)
        training = _load(spec.training_file, "training_file")
        if spec.validation_file is not None:
            validation = _load(spec.validation_file, "validation_file")
        else:
            training, validation = split_dataset(training, spec.validation_split, self.hp.seed)
        check_compatible(self.teachers[0].architecture, training, validation)
        self.ctx.check_stop("loading")
        arch = self.teachers[0].architecture
        self.architecture = MLPArchitecture(input_dim=arch.input_dim, hidden_dims=spec.student.architecture.hidden_dims,
                                            num_classes=arch.num_classes,
                                            activation=spec.student.architecture.activation)
        self.model = MLP(self.architecture).to(device)
        self.num_examples = len(training)

        # Teacher inference, once: (N, C) soft-target logits reused by every epoch.
        self.ctx.stage("teacher_inference", rows=len(training) + len(validation))
        self.train_x = training.features.to(device)  # (N, D)
        self.train_y = training.labels.to(device) if training.labels is not None else None
        self.val_x = validation.features.to(device)
        self.val_y = validation.labels.to(device) if validation.labels is not None else None
        # each teacher once; several are mixed at temperature T (distill/recipes/_teachers.py)
        self.each_val_logits = [compute_logits(t, self.val_x, device) for t in self.teachers]
        self.teacher_logits = mixture_logits([compute_logits(t, self.train_x, device) for t in self.teachers],
                                             self.weights, self.hp.temperature)  # (N, C)
        self.val_teacher_logits = mixture_logits(self.each_val_logits, self.weights, self.hp.temperature)
        self.ctx.check_stop("running the teacher")

    def _loss(self, student_logits, teacher_logits, labels) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, labels, self.hp.temperature, self.hp.alpha,
                                 self.spec.loss.type, self.spec.loss.beta)

    def batch_loss(self, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
        indices = indices.to(self.device)
        labels = self.train_y[indices] if self.train_y is not None else None
        return self._loss(self.model(self.train_x[indices]), self.teacher_logits[indices], labels), len(indices)

    def validate(self) -> dict:
        student_logits = compute_logits(self.model, self.val_x, self.device)
        metrics = classification_metrics(student_logits, self.val_teacher_logits, self.val_y)
        return {"validation_loss": self._loss(student_logits, self.val_teacher_logits, self.val_y).item(),
                "validation_agreement": metrics["agreement"], "validation_accuracy": metrics["student_accuracy"]}

    def evaluate(self) -> dict:
        report = evaluate(self.teacher, self.model, self.val_x, self.val_y, self.device,
                          teacher_logits=self.val_teacher_logits)
        if len(self.teachers) > 1:
            report["teachers"] = teacher_reports(self.spec, self.teachers, self.each_val_logits,
                                                 compute_logits(self.model, self.val_x, self.device), self.val_y)
        return report

    def export(self, folder: Path, evaluation: dict, history: list[dict]) -> Export:
        kind = get_kind("mlp")
        return Export(model_path=kind.export(self.model, folder), kind=kind.name,
                      architecture=self.architecture.to_dict(), parameters=self.architecture.num_parameters)

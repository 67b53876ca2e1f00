"""The distillation engine: losses, models, data, teacher signals, the training loop,
evaluation and export. Plain torch + safetensors; no service code, so it runs as a
library and as the ``distill`` CLI."""

from .errors import DataError, DistillError, JobStopped, MismatchError, ModelFormatError, SpecError
from .losses import distillation_loss, forward_kl
from .models import MLP, MLPArchitecture, export_mlp, load_model, read_architecture, save_model
from .spec import Hyperparameters, JobSpec, StudentSpec
from .train import RunResult, run_distillation

__all__ = [
    "DistillError", "SpecError", "DataError", "ModelFormatError", "MismatchError", "JobStopped",
    "forward_kl", "distillation_loss",
    "MLP", "MLPArchitecture", "export_mlp", "load_model", "save_model", "read_architecture",
    "JobSpec", "StudentSpec", "Hyperparameters",
    "run_distillation", "RunResult",
]

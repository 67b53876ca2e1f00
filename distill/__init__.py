"""The distillation engine. Plain torch + safetensors (+ transformers for text tasks); no
service code, so it runs as a library and as the ``distill`` CLI.

    loop.py      THE training loop (steps, accumulation, clipping, step checkpoints, resume)
    recipes/     one file per task: data + teacher signal, batch loss, evaluation, export
    losses/      the loss registry, token-level and chunked LM losses
    kinds/       model kinds (mlp, hf) behind one interface
    spec.py      the job spec, declared once (the API reuses it)
    train.py     run_distillation: recipe → loop → evaluate → export
"""

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

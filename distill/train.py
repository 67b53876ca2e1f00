"""Run one job: pick the task's recipe, hand it to the one training loop, evaluate, export.

    recipe.prepare()      load teacher + data → teacher signal (the teacher runs once)
    loop.train(recipe)    epochs of steps, step checkpoints, resume          (distill/loop.py)
    recipe.evaluate()     teacher vs student on the validation split
    recipe.export()       final/: the student, loadable on its own (a LoRA student merged;
                          its adapter folder beside it, final-adapter/)

The engine reports through two injected callables and imports no service code:
``on_event(kind, data)`` receives stage changes, step progress and per-epoch metrics;
``should_stop()`` is polled after every optimizer step and between chunks of loading,
teacher inference, generation and evaluation (the caller throttles it); a True stops the
run with JobStopped (during training, after a checkpoint).

Randomness: the run seeds torch inside ``torch.random.fork_rng``, so it neither depends on
nor disturbs the caller's global RNG; data order comes from per-epoch generators of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .device import resolve_device
from .loop import train
from .recipes import RunContext, get_recipe
from .spec import JobSpec
from .teacher_cache import TeacherCache

__all__ = ["run_distillation", "RunResult", "EventCallback"]

EventCallback = Callable[[str, dict], None]
FINAL_DIR = "final"
STATE_FILE = "distill_state.json"


@dataclass
class RunResult:
    model_path: Path
    """The student: a model file (kind 'mlp') or a Hugging Face directory (kind 'hf')."""
    architecture: dict
    parameters: int
    evaluation: dict
    history: list[dict]  # one entry per epoch
    device: str
    kind: str = "mlp"
    generated_path: Path | None = None
    """Sequence-level KD: the teacher-generated training set (JSONL)."""
    adapter_path: Path | None = None
    """A LoRA student: the PEFT adapter folder beside final/ (model_path is the merged model)."""

    @property
    def format(self) -> str:
        return "hf" if self.kind == "hf" else "safetensors"


def _ignore_event(kind: str, data: dict) -> None:
    pass


def _never_stop() -> bool:
    return False


def run_distillation(
    spec: JobSpec,
    out_dir: str | Path,
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    device: str = "auto",
    resume: bool = False,
    checkpoint_interval_s: float = 60.0,
    teacher_cache: TeacherCache | None = None,
) -> RunResult:
    """Run one distillation job; artifacts go under ``out_dir`` (checkpoints/, final/).

    With ``resume`` the newest step checkpoint in ``out_dir`` (if any) is restored and
    training continues at the next batch; a resumed run equals an uninterrupted one.
    ``teacher_cache`` (distill/teacher_cache.py) shares causal-LM top-k teacher signals across jobs.
    """
    torch_device = resolve_device(device)
    ctx = RunContext(device=torch_device, out_dir=Path(out_dir), on_event=on_event or _ignore_event,
                     should_stop=should_stop or _never_stop, resume=resume, teacher_cache=teacher_cache)
    recipe = get_recipe(spec.task, spec.method, spec.loss.type)(spec, ctx)
    cuda = [torch_device] if torch_device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(spec.hyperparameters.seed)
        ctx.stage("loading", device=str(torch_device))
        recipe.prepare()
        history = train(recipe, ctx, spec.hyperparameters, checkpoint_interval_s, spec_dict=spec.public_dict())
        ctx.stage("evaluating")
        with torch.no_grad():
            evaluation = recipe.evaluate()
        ctx.on_event("evaluation", evaluation)
        ctx.stage("exporting")
        final = ctx.out_dir / FINAL_DIR
        export = recipe.export(final, evaluation, history)
    state_dir = final if export.kind == "hf" else export.model_path.parent
    (state_dir / STATE_FILE).write_text(json.dumps(
        {"history": history, "evaluation": evaluation, "spec": spec.public_dict()}, indent=2, default=str))
    return RunResult(model_path=export.model_path, architecture=export.architecture, parameters=export.parameters,
                     evaluation=evaluation, history=history, device=str(torch_device), kind=export.kind,
                     generated_path=export.generated_path, adapter_path=export.adapter_path)

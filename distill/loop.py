"""THE training loop. It drives a :class:`~distill.recipes.base.Recipe` and never names a task.

    for each epoch:                                  order seeded by (seed, epoch)
        for each batch of batch_size rows:           recipe.batch_loss(indices) -> (mean loss, targets)
            backward (÷ batches in this step)        a batch with 0 targets is skipped and counted
            every gradient_accumulation_steps batches (and at the epoch's end):
                learning rate, clip, AdamW step      one optimizer step = one "step"
                stop? -> checkpoint, JobStopped      should_stop() is the caller's (it throttles)
                progress event (≤ 2/s), step checkpoint (≤ every checkpoint_interval_s)
        validation (recipe.validate) -> one epoch record with train_loss, validation_loss, ...

The loss is summed on the device: no host sync per step (the only .item() is once per
epoch). Checkpoints (``checkpoints/step-000123/``) hold everything needed to continue at
the next batch: model, optimizer, scheduler, RNG states and the data position, so a
resumed run equals an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import math

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .errors import JobStopped
from .recipes.base import Recipe, RunContext, Throttle
from .spec import Hyperparameters

__all__ = ["train", "get_lr", "epoch_order", "autocast_for", "PROGRESS_EVERY_S"]

PROGRESS_EVERY_S = 0.5


def get_lr(hp: Hyperparameters, step: int, total_steps: int) -> float:
    """Cosine from learning_rate down to 10% of it over the run, or constant."""
    if hp.lr_scheduler == "constant" or total_steps <= 1:
        return hp.learning_rate
    progress = min(step / (total_steps - 1), 1.0)
    return hp.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_order(seed: int, n: int, epoch: int) -> torch.Tensor:
    """A permutation seeded by (seed, epoch), from a generator of its own: the same batches
    on every run and every resume, whatever else drew random numbers."""
    return torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63))


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA devices that support it ('auto' or 'bf16'); fp32 elsewhere
    unless bf16 is asked for explicitly (CPU bf16 autocast works but is rarely faster)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _optimizer_step(optimizer: torch.optim.Optimizer, parameters: list, hp: Hyperparameters, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
    if hp.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, hp.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train(recipe: Recipe, ctx: RunContext, hp: Hyperparameters, checkpoint_interval_s: float = 60.0,
          spec_dict: dict | None = None) -> list[dict]:
    """Train ``recipe.trained_modules()`` (the student, and any helper trained with it); returns
    the per-epoch records."""
    model, device = recipe.trained_modules(), ctx.device
    parameters = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel (one pass over each parameter; CPU and CUDA) where every parameter allows it:
    # a quarter of the for-each step's time on CPU. transformers' Trainer defaults to it too.
    fused = bool(parameters) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
    optimizer = torch.optim.AdamW(parameters, lr=hp.learning_rate, weight_decay=hp.weight_decay,
                                  **({"fused": True} if fused else {}))
    n, batch_size, accumulation = recipe.num_examples, hp.batch_size, hp.gradient_accumulation_steps
    batches_per_epoch = math.ceil(n / batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    total_steps = steps_per_epoch * hp.epochs

    # The data position: the next batch to run is batch `batch` of epoch `epoch`.
    epoch, batch, step, history = 0, 0, 0, []
    epoch_loss, epoch_targets, skipped = torch.zeros((), device=device), 0, 0
    checkpoint = latest_checkpoint(ctx.out_dir) if ctx.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, device)
        epoch, batch, step, history = state["epoch"], state["batch"], state["step"], state["history"]
        epoch_loss = torch.tensor(state["epoch_loss"], device=device)
        epoch_targets, skipped = state["epoch_targets"], state["skipped_batches"]
        ctx.stage("resumed", step=step, epoch=epoch + 1, checkpoint=checkpoint.name)

    def save() -> None:
        save_checkpoint(ctx.out_dir, step, model, optimizer, {
            "epoch": epoch, "batch": batch, "history": history, "epoch_loss": epoch_loss.item(),
            "epoch_targets": epoch_targets, "skipped_batches": skipped, "total_steps": total_steps,
            "scheduler": {"name": hp.lr_scheduler, "step": step}, "spec": spec_dict or {}})

    ctx.stage("training", epochs=hp.epochs, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    progress_due, checkpoint_due = Throttle(PROGRESS_EVERY_S), Throttle(checkpoint_interval_s)
    autocast = autocast_for(device, hp.precision)
    if device.type == "cuda":  # TF32 matmuls/convolutions for whatever stays float32 (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.train()
    while epoch < hp.epochs:
        order = epoch_order(hp.seed, n, epoch)
        while batch < batches_per_epoch:
            group_start = batch - batch % accumulation
            in_step = min(accumulation, batches_per_epoch - group_start)  # batches this optimizer step spans
            indices = order[batch * batch_size:(batch + 1) * batch_size]
            recipe.position = (epoch, batch)
            with autocast:
                loss, targets = recipe.batch_loss(indices)
            if targets == 0:
                skipped += 1  # nothing to learn from (e.g. no target tokens): no backward
            else:
                (loss / in_step).backward()
                epoch_loss += loss.detach().float() * targets
                epoch_targets += targets
            del loss
            batch += 1
            if batch - group_start < in_step:
                continue
            _optimizer_step(optimizer, parameters, hp, get_lr(hp, step, total_steps))
            step += 1
            if ctx.should_stop():
                save()  # a stop (cancel, deploy) keeps the work done so far
                raise JobStopped(f"stopped at epoch {epoch + 1}, step {step} of {total_steps}")
            if progress_due():
                ctx.on_event("progress", {"epoch": epoch + 1, "step": step, "total_steps": total_steps})
            if checkpoint_due() and step < total_steps:
                save()
        model.eval()
        with torch.no_grad(), autocast:
            validation = recipe.validate()
        model.train()
        record = {"epoch": epoch + 1, "step": step,
                  "train_loss": epoch_loss.item() / epoch_targets if epoch_targets else None,
                  **validation, "learning_rate": get_lr(hp, max(step - 1, 0), total_steps),
                  "skipped_batches": skipped}
        history.append(record)
        ctx.on_event("progress", {"epoch": epoch + 1, "step": step, "total_steps": total_steps})
        ctx.on_event("epoch", record)
        epoch, batch = epoch + 1, 0
        epoch_loss, epoch_targets, skipped = torch.zeros((), device=device), 0, 0
    model.eval()
    return history

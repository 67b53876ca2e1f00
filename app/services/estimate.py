"""What a job would cost, before it is queued (``POST /v1/distillation/jobs/estimate``).

The spec goes through the same checks as a submit (:func:`app.services.jobs.check_submission`,
422 naming the field), then, from the files' recorded details and nothing queued or trained:

- rows: the training rows the loop iterates per epoch (the training file's rows less the held-out
  validation split, computed as the engine does; packed text: blocks of ``data.max_length``);
- steps: ``steps_per_epoch = ceil(ceil(rows / batch_size) / gradient_accumulation_steps)`` and
  ``steps = epochs × steps_per_epoch``, exactly the loop's count (distill/loop.py);
- tokens (text tasks): tokens per training epoch, **measured** by tokenizing the first
  ``SAMPLE_RECORDS`` records of the training file with the teacher's tokenizer (each record cut
  at ``data.max_length`` unless packed) and scaling their mean to all training rows; prompt-only
  and generated rows count ``max_new_tokens`` for the generated part (an upper bound);
- parameters: the teachers' (summed, several teachers each run) and the student's, from the files'
  details or the student's config;
- FLOPs: forward ≈ 2·params per token (MLP: per row), forward + backward ≈ 6·params per token.
  Teacher: 2·P_t per token for every epoch it runs in (once when its logits are precomputed:
  classification, text_classification, ``teacher_signal.top_k``; sequence KD: the generation
  only). Student: 6·P_s per token per epoch. Generation (sequence: the teacher; on_policy: the
  student on ``lambda`` of the batches): 2·P per generated token. Validation passes and padding
  are not counted;
- duration: ``startup + steps × per-step overhead + total FLOPs / sustained FLOP/s`` of the worker's
  device: an **estimate** whose assumptions are returned with it and set by
  ``DISTILL_ESTIMATE_CPU_FLOPS`` / ``DISTILL_ESTIMATE_GPU_FLOPS`` /
  ``DISTILL_ESTIMATE_STEP_OVERHEAD_S`` / ``DISTILL_ESTIMATE_STARTUP_S``. The device is
  ``DISTILL_DEVICE`` when set to cpu or cuda, else the device the newest job ran on, else CPU.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from distill.errors import DistillError
from distill.hf import load_tokenizer
from distill.models import MLPArchitecture

from ..config import get_settings
from ..schemas import EstimatePublic, JobCreate
from ..tables import Job
from . import jobs as jobs_service
from .references import ModelRef, dataset_path, resolve_dataset, resolve_model

SAMPLE_RECORDS = 256


class EstimateSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_ESTIMATE_", extra="ignore")

    cpu_flops: float = 2e10
    """Sustained FLOP/s of a CPU worker on small fp32 models (a few cores, ~20 GFLOP/s)."""
    gpu_flops: float = 5e13
    """Sustained FLOP/s of a GPU worker (~50 TFLOP/s: a fraction of a datacenter GPU's bf16 peak)."""
    step_overhead_s: float = 0.002
    """Fixed cost per optimizer step beyond the arithmetic (Python, kernel launches, checkpoints)."""
    startup_s: float = 5.0
    """Loading the models and data, evaluation and export, once per job."""


@lru_cache
def estimate_settings() -> EstimateSettings:
    return EstimateSettings()


def _training_rows(records: int, has_validation_file: bool, split: float) -> int:
    """Rows left for training after the engine's held-out split (distill/data.py split_dataset)."""
    if has_validation_file or records < 2:
        return records
    return records - min(records - 1, max(1, round(records * split)))


def _sample_records(path, limit: int) -> list[dict]:
    records = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if len(records) >= limit:
                break
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _text_tokens(body: JobCreate, teacher: ModelRef, details: dict, path) -> tuple[list[int], str]:
    """Tokens per record (generated parts counted at their maximum) for a sample of the file."""
    kind, max_length = details.get("kind"), body.data.max_length
    records = _sample_records(path, SAMPLE_RECORDS)
    try:
        tokenizer = load_tokenizer(teacher.path)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        method = f"measured: the teacher's tokenizer on the first {len(records)} records, scaled to all rows"
    except DistillError:
        def count(text: str) -> int:  # no tokenizer: ~4 characters a token (English BPE)
            return math.ceil(len(text) / 4)
        method = f"approximate: 4 characters per token on the first {len(records)} records, scaled to all rows"
    lengths = []
    for record in records:
        prompt, text = str(record.get("prompt") or ""), str(record.get("text") or "")
        completion = str(record.get("completion") or "")
        if body.method == "sequence":
            n = count(prompt or text) + body.generation.max_new_tokens + 1
        elif body.method == "on_policy":
            generated = count(prompt) + body.on_policy.max_new_tokens + 1
            given = count(prompt) + count(completion) + 1 if kind == "prompt_completion" else generated
            lam = body.on_policy.lambda_
            n = round(lam * generated + (1 - lam) * given)
        elif kind == "prompt_completion":
            n = count(prompt) + count(completion) + 1
        else:
            n = count(text) + (2 if kind == "text_label" else 1)
        lengths.append(n)
    packed = (body.task == "causal_lm" and kind == "text" and body.data.packing and body.method == "token"
              and body.loss.type != "uld")
    if not packed:
        lengths = [min(n, max_length) for n in lengths]
    return lengths, method + (f"; packed into blocks of {max_length}" if packed else
                              f"; each row cut at data.max_length {max_length}")


def _student_parameters(session: Session, tenant: str, body: JobCreate, teacher: ModelRef) -> int:
    if body.task == "classification":
        architecture = MLPArchitecture.from_dict(teacher.details["architecture"])
        return MLPArchitecture(input_dim=architecture.input_dim, num_classes=architecture.num_classes,
                               hidden_dims=body.student.architecture.hidden_dims).num_parameters
    reference = body.student.reference()
    if reference is not None:
        return int(resolve_model(session, tenant, reference, "student").details.get("parameters") or 0)
    if body.student.derive is not None:
        derive = body.student.derive
        kept = derive.num_layers or len(derive.layers)
        return jobs_service._config_parameters(teacher, {"num_hidden_layers": kept}, body.task)
    return jobs_service._config_parameters(teacher, body.student.architecture.config, body.task)


def _worker_device(session: Session) -> tuple[str, str]:
    configured = get_settings().device
    if configured != "auto":
        return configured, "DISTILL_DEVICE"
    newest = session.scalar(select(Job.device).where(Job.device.is_not(None))
                            .order_by(Job.created_at.desc()).limit(1))
    if newest:
        return newest, "the device the newest job ran on"
    return "cpu", "assumed (DISTILL_DEVICE is auto and no job has run yet)"


def estimate(session: Session, tenant: str, body: JobCreate) -> EstimatePublic:
    jobs_service.check_submission(session, tenant, body)  # 422 exactly as a submit would
    hp = body.hyperparameters
    teachers = [resolve_model(session, tenant, ref, param) for param, ref, _ in body.teacher_refs()]
    teacher = teachers[0]
    teacher_parameters = sum(int(t.details.get("parameters") or 0) for t in teachers)
    student_parameters = _student_parameters(session, tenant, body, teacher)

    training = resolve_dataset(session, tenant, body.training_file, "training_file")
    details = training.details
    dataset_rows = int(details.get("rows") or 0)
    records = _training_rows(dataset_rows, body.validation_file is not None, body.validation_split)
    generated = 0  # tokens generated in the run (sequence: by the teacher once; on_policy: by the student per epoch)
    if body.task == "classification":
        rows, tokens, tokens_method = records, None, None
        units = rows  # an MLP processes rows, not tokens
        teacher_passes = 1  # its logits are computed once, before training
    else:
        lengths, tokens_method = _text_tokens(body, teacher, details, dataset_path(training))
        mean = sum(lengths) / len(lengths) if lengths else float(body.data.max_length)
        copies = body.generation.n if body.method == "sequence" else 1
        tokens = round(mean * records * copies)
        packed = "packed" in tokens_method
        rows = max(1, math.ceil(tokens / body.data.max_length)) if packed else records * copies
        units = tokens
        precomputed = body.task == "text_classification" and body.intermediate is None or \
            body.teacher_signal.top_k is not None
        teacher_passes = 0 if body.method == "sequence" else 1 if precomputed else hp.epochs
        if body.method == "sequence":
            generated = records * copies * body.generation.max_new_tokens
        elif body.method == "on_policy":
            generated = round(records * body.on_policy.lambda_ * body.on_policy.max_new_tokens) * hp.epochs

    steps_per_epoch = math.ceil(math.ceil(rows / hp.batch_size) / hp.gradient_accumulation_steps) if rows else 0
    steps = steps_per_epoch * hp.epochs
    teacher_flops = 2 * teacher_parameters * units * teacher_passes
    student_flops = 6 * student_parameters * units * hp.epochs
    generation_flops = 2 * (teacher_parameters if body.method == "sequence" else student_parameters) * generated
    if body.method == "sequence":
        teacher_flops += generation_flops
    total_flops = teacher_flops + student_flops + (generation_flops if body.method == "on_policy" else 0)

    config = estimate_settings()
    device, device_source = _worker_device(session)
    gpu = device.startswith("cuda")
    flops_per_second = config.gpu_flops if gpu else config.cpu_flops
    seconds = config.startup_s + steps * config.step_overhead_s + total_flops / flops_per_second
    assumptions = [
        f"device {device} ({device_source}) sustains {flops_per_second:.3g} FLOP/s "
        f"(DISTILL_ESTIMATE_{'GPU' if gpu else 'CPU'}_FLOPS)",
        f"{config.step_overhead_s:g} s overhead per optimizer step (DISTILL_ESTIMATE_STEP_OVERHEAD_S) and "
        f"{config.startup_s:g} s to load, evaluate and export (DISTILL_ESTIMATE_STARTUP_S)",
        "forward = 2 x parameters FLOPs per token (MLP: per row); forward + backward = 6 x parameters",
        "validation passes, padding and queue wait are not counted",
    ]
    return EstimatePublic(
        task=body.task, method=body.method, dataset_rows=dataset_rows, rows=rows, tokens=tokens,
        tokens_method=tokens_method, epochs=hp.epochs, batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps, steps_per_epoch=steps_per_epoch, steps=steps,
        teacher_parameters=teacher_parameters, student_parameters=student_parameters,
        teacher_passes=teacher_passes, generated_tokens=generated, teacher_flops=teacher_flops,
        student_flops=student_flops, generation_flops=generation_flops, total_flops=total_flops, device=device,
        flops_per_second=flops_per_second, estimated_seconds=round(seconds, 3), assumptions=assumptions)

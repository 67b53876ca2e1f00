"""Shared parts of the transformers recipes (causal_lm, causal_lm_sequence,
text_classification): building the student, reading and splitting text data, the
output-head split that keeps logits chunked, LM metrics, generation and the model card.

Memory: the loss never holds (positions × vocab) logits of both models at once. The
models run up to their last hidden states, (B, L, H); positions that count are picked
out, and the output heads are applied chunk by chunk inside activation checkpoints
(:mod:`distill.losses.chunked`), so the loss keeps about ``chunk × V`` floats alive.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import JobStopped, MismatchError, VocabularyMismatch
from ..hf import (context_length, derive_student, fuse_activations, inspect_model_dir, layer_count, load_causal_lm,
                  load_classifier, load_tokenizer, model_card, shared_vocab_size, student_from_config)
from ..losses import loss_chunk_rows, shifted, token_divergence
from ..text_data import DEFAULT_MAX_LENGTH, load_text_records

if TYPE_CHECKING:
    from ..spec import JobSpec

__all__ = ["LogitsHead", "generate_completions", "lm_metrics", "build_student", "load_splits", "resolve_max_length"]


# ---- models -------------------------------------------------------------------------------------------------

class LogitsHead:
    """A model split into body → last hidden state (B, L, H) and output head H → V.

    Checked once against ``model(...).logits``; families whose logits are not simply
    head(hidden) (e.g. final soft-capping) fall back to full logits with an identity head.
    """

    def __init__(self, model: nn.Module, sample_ids: torch.Tensor, sample_mask: torch.Tensor):
        self.model = model
        head = model.get_output_embeddings()
        self.split = head is not None and hasattr(model, "base_model") and model.base_model is not model
        if self.split:
            with torch.no_grad():
                full = model(input_ids=sample_ids, attention_mask=sample_mask).logits
                split = head(self._hidden(sample_ids, sample_mask))
            self.split = split.shape == full.shape and torch.allclose(split, full, atol=1e-3, rtol=1e-3)
        self.head = head if self.split else nn.Identity()

    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state

    def body(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) → (B, L, H) hidden states, or (B, L, V) logits when not split."""
        return self._hidden(ids, mask) if self.split else self.model(input_ids=ids, attention_mask=mask).logits


def vocab_rows(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None \
        else model.config.vocab_size


def build_student(spec: "JobSpec", teacher: nn.Module, teacher_tokenizer, device: torch.device):
    """The student and its tokenizer, from the spec's student form; with ``student.lora`` the
    student gets LoRA adapters and only those (and a classifier's head) train."""
    from ..lora import apply_lora

    student = spec.student
    tokenizer = teacher_tokenizer
    if student.path is not None:
        loader = load_causal_lm if spec.task == "causal_lm" else load_classifier
        model = loader(student.path, device=device)
        if inspect_model_dir(student.path)["has_tokenizer"]:
            tokenizer = load_tokenizer(student.path)
    elif student.architecture is not None:
        model = student_from_config(teacher.config, student.architecture.config, spec.task).to(device)
    else:
        model = derive_student(teacher, layers=student.derive.layers, num_layers=student.derive.num_layers).to(device)
    if student.lora is not None:
        model = apply_lora(model, student.lora, spec.task)
    return model, tokenizer


def resolve_max_length(spec: "JobSpec", *models: nn.Module) -> int:
    """``data.max_length``, or min(DEFAULT_MAX_LENGTH, context) when not given; never past any model's context."""
    contexts = [(context_length(m.config), m) for m in models]
    known = [c for c, _ in contexts if c is not None]
    context = min(known) if known else None
    if spec.data.max_length is None:
        return min(DEFAULT_MAX_LENGTH, context) if context else DEFAULT_MAX_LENGTH
    if context is not None and spec.data.max_length > context:
        raise MismatchError(f"data.max_length {spec.data.max_length} is longer than the models' context of {context} "
                            f"tokens; use at most {context} (or leave it out for min({DEFAULT_MAX_LENGTH}, context))",
                            param="data.max_length")
    return spec.data.max_length


def card(spec: "JobSpec", student: nn.Module, evaluation: dict, history: list[dict]) -> str:
    from ..lora import describe

    hp = spec.hyperparameters
    names = spec.input_names()
    teacher = names["teacher"] if spec.teachers is None else ", ".join(
        f"{names[f'teachers[{i}]']} (weight {weight:.3g})" for i, (_, weight) in enumerate(spec.teacher_paths))
    return model_card({"teacher": teacher, "data": names["training_file"],
                       "student": student.config.model_type, "task": spec.task,
                       "method": method_line(spec, describe(student)),
                       "loss": {"type": spec.loss.type, "beta": spec.loss.beta, "top_k": spec.teacher_signal.top_k},
                       "hyperparameters": hp.model_dump(), "evaluation": evaluation,
                       "epochs_trained": len(history), "history": history})


def method_line(spec: "JobSpec", lora: str | None = None) -> str:
    """The method as the model card states it: the method and every option that changes it."""
    parts = [spec.method]
    if spec.method == "on_policy":
        o = spec.on_policy
        parts.append(f"on-policy (GKD): lambda {o.lambda_} of the batches on the student's own samples "
                     f"(max_new_tokens {o.max_new_tokens}, temperature {o.temperature}, top_p {o.top_p})")
    if spec.loss.type == "uld":
        parts.append("Universal Logit Distillation across tokenizers (sorted probabilities, Boizard et al. 2024)")
    if spec.teachers is not None:
        parts.append(f"{len(spec.teachers)} teachers: the weighted mixture of their probabilities at T")
    if spec.intermediate is not None:
        i = spec.intermediate
        parts.append(f"intermediate {i.type} on hidden states (weight {i.weight}, layers {i.layers})"
                     + ("; + last-layer attention KL" if i.attention else ""))
    if lora is not None:
        parts.append(lora)
    return "; ".join(parts)


def hf_architecture(model: nn.Module, task: str) -> dict:
    from ..lora import lora_details

    architecture = {"kind": "hf", "task": task, "model_type": model.config.model_type,
                    "num_layers": layer_count(model.config), "vocab_size": model.config.vocab_size}
    lora = lora_details(model)
    return architecture if lora is None else {**architecture, "lora": lora}


# ---- data ---------------------------------------------------------------------------------------------------

def load_splits(spec: "JobSpec") -> tuple[str, list[dict], str, list[dict]]:
    """(kind, training records, validation kind, validation records)."""
    kind, training = load_text_records(spec.training_file)
    if spec.validation_file is not None:
        val_kind, validation = load_text_records(spec.validation_file)
        # Sequence-level KD may hold out plain text while it trains on prompts; token-level may not mix.
        if val_kind != kind and (spec.method == "token" or spec.task != "causal_lm"):
            raise MismatchError(f"validation_file holds '{val_kind}' records but training_file holds '{kind}'",
                                param="validation_file")
        return kind, training, val_kind, validation
    if len(training) < 2:
        raise MismatchError("a validation split needs at least 2 records; upload a validation_file",
                            param="training_file")
    order = torch.randperm(len(training), generator=torch.Generator().manual_seed(spec.hyperparameters.seed))
    n_val = min(len(training) - 1, max(1, round(len(training) * spec.validation_split)))
    return kind, [training[i] for i in order[n_val:]], kind, [training[i] for i in order[:n_val]]


def check_kind(task: str, kind: str, param: str = "training_file") -> None:
    allowed = {"causal_lm": ("text", "prompt_completion"), "text_classification": ("text_label",)}[task]
    if kind not in allowed:
        raise MismatchError(f"task {task} needs {' or '.join(allowed)} records, {param} holds '{kind}'", param=param)


# ---- evaluation ---------------------------------------------------------------------------------------------

@torch.no_grad()
def lm_metrics(teacher: LogitsHead | None, student: LogitsHead, tokens: dict, shared: int | None,
               device: torch.device, batch_size: int, objective: dict | None = None,
               check_stop: Callable[[str], None] | None = None) -> dict:
    """Perplexity of each model and, when they share a vocabulary, top-1 agreement and mean
    KL(teacher‖student) at T = 1. With ``objective`` ({"loss_type", "temperature", "beta",
    "alpha"}) also the training objective on these tokens, as ``loss``: alpha · T² ·
    divergence + (1 − alpha) · CE per token (CE alone without a teacher).
    Sums stay on the device; one host sync at the end."""
    zero = lambda: torch.zeros((), device=device, dtype=torch.float64)  # noqa: E731
    totals = {"student_nll": zero(), "teacher_nll": zero(), "agree": zero(), "kl": zero(), "div": zero()}
    count = 0
    n = tokens["input_ids"].shape[0]
    for start in range(0, n, batch_size):
        ids = tokens["input_ids"][start:start + batch_size].to(device)
        mask = tokens["attention_mask"][start:start + batch_size].to(device)
        select = tokens["loss_mask"][start:start + batch_size].to(device)
        s_states, targets = shifted(student.body(ids, mask), ids, select)
        t_states = shifted(teacher.body(ids, mask), ids, select)[0] if teacher is not None else None
        chunk = loss_chunk_rows(shared or 1 << 16)
        for c in range(0, targets.shape[0], chunk):
            rows = slice(c, c + chunk)
            s_logits = student.head(s_states[rows]).float()
            vocab = shared or s_logits.shape[-1]
            s_logits = s_logits[..., :vocab]
            totals["student_nll"] += F.cross_entropy(s_logits, targets[rows], reduction="sum")
            if t_states is not None:
                t_logits = teacher.head(t_states[rows])[..., :vocab].float()
                totals["teacher_nll"] += F.cross_entropy(t_logits, targets[rows], reduction="sum")
                totals["agree"] += (t_logits.argmax(-1) == s_logits.argmax(-1)).sum()
                totals["kl"] += token_divergence(s_logits, t_logits, "forward_kl", 1.0).sum()
                if objective is not None:
                    totals["div"] += token_divergence(s_logits, t_logits, objective["loss_type"],
                                                      objective["temperature"], objective["beta"]).sum()
        count += int(tokens["loss_mask"][start:start + batch_size][:, 1:].sum())
        if check_stop is not None:
            check_stop("evaluating")
    values = {k: v.item() for k, v in totals.items()}
    n_tokens = max(count, 1)
    result = {"tokens": count, "student_perplexity": math.exp(values["student_nll"] / n_tokens)}
    if teacher is not None:
        result.update(teacher_perplexity=math.exp(values["teacher_nll"] / n_tokens),
                      top1_agreement=values["agree"] / n_tokens, kl_teacher_student=values["kl"] / n_tokens)
    if objective is not None:
        ce = values["student_nll"] / n_tokens
        if teacher is None:
            result["loss"] = ce
        else:
            alpha, t = objective["alpha"], objective["temperature"]
            result["loss"] = alpha * t * t * values["div"] / n_tokens + (1 - alpha) * ce
    return result


@torch.no_grad()
def generation_speed(model: nn.Module, tokenizer, prompt: str, device: torch.device, new_tokens: int = 32) -> float:
    """Greedy decoding tokens/s for one prompt on ``device`` (after a warm-up)."""
    context = context_length(model.config)
    if context is not None:  # prompt + generated tokens must fit the position embeddings
        new_tokens = max(1, min(new_tokens, context // 2))
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -64:].to(device)
    if context is not None:
        ids = ids[:, -(context - new_tokens):]
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  pad_token_id=tokenizer.pad_token_id)
    model.generate(ids, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = model.generate(ids, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (output.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


# ---- sequence-level KD ----------------------------------------------------------------------------------------

@torch.no_grad()
def generate_completions(teacher: nn.Module, tokenizer, prompts: list[str], generation, device: torch.device,
                         should_stop: Callable[[], bool], batch_size: int = 8) -> list[dict]:
    """The teacher's completions, ``generation.n`` per prompt, as prompt/completion records.

    Prompts longer than the teacher's context minus ``max_new_tokens`` keep their last tokens.
    The tokenizer's padding and truncation sides are restored whatever happens."""
    context = context_length(teacher.config)
    if context is not None and generation.max_new_tokens >= context:
        raise MismatchError(f"generation.max_new_tokens {generation.max_new_tokens} leaves no room for a prompt in "
                            f"the teacher's context of {context} tokens", param="generation.max_new_tokens")
    sides = tokenizer.padding_side, tokenizer.truncation_side
    # Decoder-only generation continues from the right edge: pad (and cut long prompts) on the left.
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    records = []
    sample = generation.temperature > 0
    limit = {"truncation": True, "max_length": context - generation.max_new_tokens} if context else {}
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            encoded = tokenizer(batch, return_tensors="pt", padding=True, **limit).to(device)
            output = teacher.generate(**encoded, max_new_tokens=generation.max_new_tokens, do_sample=sample,
                                      temperature=generation.temperature if sample else None,
                                      top_p=generation.top_p if sample else None,
                                      num_return_sequences=generation.n, pad_token_id=tokenizer.pad_token_id)
            new_tokens = output[:, encoded["input_ids"].shape[1]:]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            for i, text in enumerate(texts):
                if text.strip():  # an immediate eos teaches nothing a prompt/completion pair can hold
                    finished = bool((new_tokens[i] == tokenizer.eos_token_id).any())
                    records.append({"prompt": batch[i // generation.n], "completion": text,
                                    "truncated": not finished})
            if should_stop():
                raise JobStopped(f"stopped while generating ({len(records)} completions so far)")
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    if not records:
        raise MismatchError("the teacher generated only empty completions; check the prompts or the generation "
                            "settings", param="generation")
    return records


def prompts_of(kind: str, records: list[dict]) -> list[str]:
    return [r["prompt"] for r in records] if kind in ("prompt_completion", "prompt") else [r["text"] for r in records]


# ---- the part every causal-LM recipe shares ---------------------------------------------------------------

class CausalLMBase:
    """Mixin for causal-LM recipes: teacher and student loading, the evaluation report and export."""

    def load_models(self) -> None:
        spec, device = self.spec, self.device
        self.teacher_model = load_causal_lm(spec.primary_teacher, device=device).eval()
        self.teacher_tokenizer = load_tokenizer(spec.primary_teacher)
        self.ctx.check_stop("loading the teacher")
        self.model, self.tokenizer = build_student(spec, self.teacher_model, self.teacher_tokenizer, device)
        self.teacher_model.requires_grad_(False)  # after build_student: a derived student copies the teacher
        self.ctx.check_stop("loading the student")
        # Several teachers (token-level only): the others must share the first one's tokenizer.
        self.extra_teachers = []
        for i, (path, _) in enumerate(spec.teacher_paths[1:], start=1):
            model = load_causal_lm(path, device=device).eval().requires_grad_(False)
            try:
                shared_vocab_size(self.teacher_tokenizer, load_tokenizer(path), vocab_rows(self.teacher_model),
                                  vocab_rows(model))
            except VocabularyMismatch as exc:
                raise MismatchError(f"teachers[{i}]: several causal-LM teachers must share one tokenizer: "
                                    f"{exc.message}", param=f"teachers[{i}]") from None
            self.extra_teachers.append(model)
            self.ctx.check_stop("loading the teachers")

    def heads(self, tokens: dict, with_teacher: bool) -> None:
        for model in (self.model, self.teacher_model if with_teacher else None, *getattr(self, "extra_teachers", ())):
            if model is not None:
                fuse_activations(model)  # the same function in one kernel (GPT-2's gelu_new: ~7% of a step)
        probe_ids = tokens["input_ids"][:1].to(self.device)
        probe_mask = tokens["attention_mask"][:1].to(self.device)
        self.student = LogitsHead(self.model, probe_ids, probe_mask)
        self.teacher = LogitsHead(self.teacher_model, probe_ids, probe_mask) if with_teacher else None
        if with_teacher and getattr(self, "extra_teachers", None):
            from ._teachers import MixtureLM

            heads = [self.teacher] + [LogitsHead(m, probe_ids, probe_mask) for m in self.extra_teachers]
            self.teacher = MixtureLM(heads, [w for _, w in self.spec.teacher_paths], self.hp.temperature,
                                     self.shared)

    def lm_evaluation(self) -> dict:
        from ..lora import merged_copy, student_parameters, trainable_parameters
        from ..models import count_parameters

        metrics = lm_metrics(self.teacher, self.student, self.val_tokens, self.shared, self.device,
                             self.hp.batch_size, check_stop=self.ctx.check_stop)
        prompt = prompts_of(self.val_kind, self.validation[:1])[0]
        teacher_speed = generation_speed(self.teacher_model, self.teacher_tokenizer, prompt, self.device)
        self.ctx.check_stop("evaluating")
        # A LoRA student is timed as it is downloaded, adapters merged (unmerged they add two matmuls a layer).
        student_speed = generation_speed(merged_copy(self.model), self.tokenizer, prompt, self.device)
        teacher_params, student_params = count_parameters(self.teacher_model), student_parameters(self.model)
        return {
            "teacher": {"perplexity": metrics.get("teacher_perplexity"), "generation_tokens_per_s": teacher_speed,
                        "parameters": teacher_params},
            "student": {"perplexity": metrics["student_perplexity"],
                        "perplexity_before_training": self.before["student_perplexity"],
                        "generation_tokens_per_s": student_speed, "parameters": student_params,
                        "trainable_parameters": trainable_parameters(self.model)},
            "top1_agreement": metrics.get("top1_agreement"),
            "kl_teacher_student": metrics.get("kl_teacher_student"),
            "validation_tokens": metrics["tokens"],
            "speedup": student_speed / teacher_speed,
            "parameter_ratio": student_params / teacher_params,
            "device": str(self.device),
        }

    def hf_export(self, folder: Path, evaluation: dict, history: list[dict], generated_path: Path | None = None):
        from ..kinds import get_kind
        from ..lora import adapter_dir, is_lora, student_parameters
        from .base import Export

        kind = get_kind("hf")
        lora = is_lora(self.model)
        path = kind.export(self.model, folder, tokenizer=self.tokenizer,
                           card=card(self.spec, self.model, evaluation, history))  # a LoRA student is merged here
        return Export(model_path=path, kind=kind.name, architecture=hf_architecture(self.model, self.spec.task),
                      parameters=student_parameters(self.model), generated_path=generated_path,
                      adapter_path=adapter_dir(path) if lora else None)

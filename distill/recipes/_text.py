"""Distillation for Hugging Face transformers: causal language models and text classifiers.

Causal LM, token-level (``method: "token"``)::

    load teacher + tokenizer → build the student (pretrained / config / derived layers)
    → check the vocabularies match (aligning a padded teacher vocabulary) → tokenize
    → [top-k teacher signal: teacher inference once, stored] → train on
    alpha * T² * divergence(teacher ‖ student) + (1 - alpha) * CE(next token)
    → evaluate (perplexity, agreement, KL, tokens/s) → export a HF directory + model card

Causal LM, sequence-level (``method: "sequence"``): the teacher generates completions
for the prompts, the generated set is saved (``generated.jsonl``), and the student is
trained on it with plain next-token cross-entropy. No logits cross between the models,
so this works across tokenizers.

Text classification: teacher logits over the labels are computed once (teacher
tokenizer), the student trains on them with its own tokenizer (classic soft targets).

Memory: the loss never holds (positions × vocab) logits of both models at once. The
models run up to their last hidden states, (B, L, H); positions that count are picked
out, and the output heads are applied chunk by chunk inside activation checkpoints,
so the loss keeps about ``chunk × V`` floats alive at a time.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .device import resolve_device
from .errors import JobStopped, MismatchError
from .hf import (derive_student, inspect_model_dir, layer_count, load_causal_lm, load_classifier, load_tokenizer,
                 model_card, save_hf, shared_vocab_size, student_from_config)
from .llm_losses import TopKSignal, teacher_topk, token_divergence
from .losses import distillation_loss
from .models import count_parameters  # parameters() yields tied weights once
from .spec import HFStudentSpec, JobSpec
from .train import epoch_order, get_lr
from .text_data import load_text_records, tokenize_for_classification, tokenize_for_lm

__all__ = ["run_text_distillation", "generate_completions", "lm_metrics", "loss_chunk_rows"]

LOSS_CHUNK_FLOATS = 1 << 24  # ~64 MiB of float32 logits per chunk per model, whatever the vocabulary


def loss_chunk_rows(vocab: int) -> int:
    """Positions per loss chunk, sized so one chunk's (rows, V) logits stay near LOSS_CHUNK_FLOATS."""
    return max(16, min(512, LOSS_CHUNK_FLOATS // max(vocab, 1)))

PROGRESS_EVERY_S = 0.5
TOPK_STORE_LIMIT_BYTES = 2 << 30  # a precomputed top-k signal bigger than this is computed online instead
EventCallback = Callable[[str, dict], None]


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


def build_student(spec: JobSpec, teacher: nn.Module, teacher_tokenizer, device: torch.device):
    """The student and its tokenizer, from the spec's student form."""
    student_spec: HFStudentSpec = spec.student
    if student_spec.source == "pretrained":
        loader = load_causal_lm if spec.task == "causal_lm" else load_classifier
        student = loader(student_spec.path, device=device)
        tokenizer = load_tokenizer(student_spec.path) if inspect_model_dir(student_spec.path)["has_tokenizer"] \
            else teacher_tokenizer
        return student, tokenizer
    if student_spec.source == "config":
        student = student_from_config(teacher.config, student_spec.config, spec.task)
    else:
        student = derive_student(teacher, layers=student_spec.layers, num_layers=student_spec.num_layers)
    return student.to(device), teacher_tokenizer


# ---- data ---------------------------------------------------------------------------------------------------

def load_splits(spec: JobSpec) -> tuple[str, list[dict], str, list[dict]]:
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


def check_kind(task: str, kind: str) -> None:
    allowed = {"causal_lm": ("text", "prompt_completion"), "text_classification": ("text_label",)}[task]
    if kind not in allowed:
        raise MismatchError(f"task {task} needs {' or '.join(allowed)} records, training_file holds '{kind}'",
                            param="training_file")


# ---- the loss, chunked --------------------------------------------------------------------------------------

def chunked_lm_loss(student_head: nn.Module, student_hidden: torch.Tensor, targets: torch.Tensor,
                    teacher: TopKSignal | tuple[nn.Module, torch.Tensor] | None, shared: int, loss_type: str,
                    temperature: float, beta: float, chunk: int | None = None,
                    need_ce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (divergence, cross-entropy) over N selected positions.

    Args:
        student_hidden: (N, H) student states at the positions that count (or (N, V) logits)
        targets: (N,) next-token ids
        teacher: a TopKSignal (N, k), or (teacher_head, teacher_hidden (N, H)), or None (CE only)
    Returns:
        two scalars: Σ divergence (not T²-scaled), Σ cross-entropy
    """
    kd_total = student_hidden.new_zeros((), dtype=torch.float32)
    ce_total = student_hidden.new_zeros((), dtype=torch.float32)
    chunk = chunk or loss_chunk_rows(shared)
    for start in range(0, student_hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        teacher_part = teacher[rows] if isinstance(teacher, TopKSignal) else \
            teacher[1][rows] if isinstance(teacher, tuple) else None
        # Everything a chunk needs is an argument: checkpoint re-runs the function in backward,
        # after this loop has moved on, so a closure over loop variables would see the last chunk.
        args = (student_hidden[rows], targets[rows], teacher_part)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            kd, ce = checkpoint(_chunk_loss, *args, student_head, teacher, shared, loss_type, temperature, beta,
                                need_ce, use_reentrant=False)
        else:
            kd, ce = _chunk_loss(*args, student_head, teacher, shared, loss_type, temperature, beta, need_ce)
        kd_total, ce_total = kd_total + kd, ce_total + ce
    return kd_total, ce_total


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, teacher_part, student_head: nn.Module, teacher,
                shared: int, loss_type: str, temperature: float, beta: float,
                need_ce: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ divergence, Σ CE) of one chunk: hidden (c, H) → logits (c, V) inside, so only c × V is live."""
    logits = student_head(hidden)[..., :shared].float()  # (c, V)
    ce = F.cross_entropy(logits, targets, reduction="sum") if need_ce else logits.new_zeros(())
    if teacher_part is None:
        return logits.new_zeros(()), ce
    if isinstance(teacher_part, TopKSignal):
        return token_divergence(logits, teacher_part, loss_type, temperature, beta).sum(), ce
    with torch.no_grad():  # recomputed in backward from (c, H): cheaper than keeping (c, V)
        teacher_logits = teacher[0](teacher_part)[..., :shared].float()
    return token_divergence(logits, teacher_logits, loss_type, temperature, beta).sum(), ce


def shifted(hidden: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor):
    """States at t predict token t+1: returns (N, H) states and (N,) targets where loss_mask[t+1]."""
    select = loss_mask[:, 1:]  # (B, L-1)
    return hidden[:, :-1][select], input_ids[:, 1:][select]


# ---- teacher signal -------------------------------------------------------------------------------------------

@torch.no_grad()
def precompute_topk(teacher: LogitsHead, tokens: dict, k: int, temperature: float, shared: int,
                    device: torch.device, batch_size: int) -> TopKSignal | None:
    """Teacher inference once: top-k log-probs for every position, stored on the CPU (N, L, k)."""
    n, length = tokens["input_ids"].shape
    if n * length * k * 6 > TOPK_STORE_LIMIT_BYTES:  # fp16 log-probs + int32 ids
        return None
    logprobs = torch.empty(n, length, k, dtype=torch.float16)
    indices = torch.empty(n, length, k, dtype=torch.int32)
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        hidden = teacher.body(tokens["input_ids"][rows].to(device), tokens["attention_mask"][rows].to(device))
        for offset in range(0, hidden.shape[1], 64):  # a few positions at a time: (b, 64, V) live at most
            logits = teacher.head(hidden[:, offset:offset + 64])[..., :shared].float()
            signal = teacher_topk(logits, k, temperature)
            logprobs[rows, offset:offset + 64] = signal.logprobs.half().cpu()
            indices[rows, offset:offset + 64] = signal.indices.int().cpu()
    return TopKSignal(logprobs=logprobs, indices=indices)


# ---- evaluation ---------------------------------------------------------------------------------------------

@torch.no_grad()
def lm_metrics(teacher: LogitsHead | None, student: LogitsHead, tokens: dict, shared: int | None,
               device: torch.device, batch_size: int) -> dict:
    """Perplexity of each model and, when they share a vocabulary, top-1 agreement and mean KL(teacher‖student)."""
    totals = {"student_nll": 0.0, "teacher_nll": 0.0, "agree": 0.0, "kl": 0.0, "n": 0}
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
            totals["student_nll"] += F.cross_entropy(s_logits[..., :vocab], targets[rows], reduction="sum").item()
            if t_states is not None:
                t_logits = teacher.head(t_states[rows])[..., :vocab].float()
                totals["teacher_nll"] += F.cross_entropy(t_logits, targets[rows], reduction="sum").item()
                totals["agree"] += (t_logits.argmax(-1) == s_logits[..., :vocab].argmax(-1)).sum().item()
                totals["kl"] += token_divergence(s_logits[..., :vocab], t_logits, "forward_kl", 1.0).sum().item()
        totals["n"] += targets.shape[0]
    count = max(totals["n"], 1)
    result = {"tokens": totals["n"], "student_perplexity": math.exp(totals["student_nll"] / count)}
    if teacher is not None:
        result.update(teacher_perplexity=math.exp(totals["teacher_nll"] / count),
                      top1_agreement=totals["agree"] / count, kl_teacher_student=totals["kl"] / count)
    return result


@torch.no_grad()
def generation_speed(model: nn.Module, tokenizer, prompt: str, device: torch.device, new_tokens: int = 32) -> float:
    """Greedy decoding tokens/s for one prompt on ``device`` (after a warm-up)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids[:, -64:].to(device)
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
    """The teacher's completions, ``generation.n`` per prompt, as prompt/completion records."""
    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    records = []
    sample = generation.temperature > 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        encoded = tokenizer(batch, return_tensors="pt", padding=True).to(device)
        output = teacher.generate(**encoded, max_new_tokens=generation.max_new_tokens, do_sample=sample,
                                  temperature=generation.temperature if sample else None,
                                  top_p=generation.top_p if sample else None, num_return_sequences=generation.n,
                                  pad_token_id=tokenizer.pad_token_id)
        new_tokens = output[:, encoded["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for i, text in enumerate(texts):
            if text.strip():  # an immediate eos teaches nothing a prompt/completion pair can hold
                finished = bool((new_tokens[i] == tokenizer.eos_token_id).any())
                records.append({"prompt": batch[i // generation.n], "completion": text, "truncated": not finished})
        if should_stop():
            raise JobStopped(f"stopped while generating ({len(records)} completions so far)")
    tokenizer.padding_side = "right"
    if not records:
        raise MismatchError("the teacher generated only empty completions; check the prompts or the generation "
                            "settings", param="generation")
    return records


def prompts_of(kind: str, records: list[dict]) -> list[str]:
    return [r["prompt"] for r in records] if kind == "prompt_completion" else [r["text"] for r in records]


# ---- the loop -----------------------------------------------------------------------------------------------

def optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor, hp, step: int,
                   total_steps: int) -> None:
    """Scheduled learning rate, backward, clipped gradients, update."""
    for group in optimizer.param_groups:
        group["lr"] = get_lr(hp, step, total_steps)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if hp.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm)
    optimizer.step()


class Reporter:
    """Throttled step progress, checked stops."""

    def __init__(self, on_event: EventCallback, should_stop: Callable[[], bool], total_steps: int):
        self.on_event, self.should_stop, self.total_steps = on_event, should_stop, total_steps
        self.last = time.monotonic()

    def step(self, epoch: int, step: int) -> None:
        if self.should_stop():
            raise JobStopped(f"stopped at epoch {epoch}, step {step} of {self.total_steps}")
        if time.monotonic() - self.last >= PROGRESS_EVERY_S:
            self.on_event("progress", {"epoch": epoch, "step": step, "total_steps": self.total_steps})
            self.last = time.monotonic()


def train_causal_lm(spec: JobSpec, teacher: LogitsHead | None, student: LogitsHead, tokens: dict,
                    signal: TopKSignal | None, shared: int, device: torch.device, reporter: Reporter,
                    val_tokens: dict, on_event: EventCallback) -> list[dict]:
    hp = spec.hyperparameters
    model = student.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    n = tokens["input_ids"].shape[0]
    total_steps = math.ceil(n / hp.batch_size) * hp.epochs
    step, history = 0, []
    model.train()
    for epoch in range(1, hp.epochs + 1):
        order = epoch_order(hp, n, epoch)
        loss_sum, token_count = 0.0, 0
        for start in range(0, n, hp.batch_size):
            idx = order[start:start + hp.batch_size]
            ids = tokens["input_ids"][idx].to(device)  # (B, L)
            mask = tokens["attention_mask"][idx].to(device)
            select = tokens["loss_mask"][idx].to(device)
            states, targets = shifted(student.body(ids, mask), ids, select)  # (N, H), (N,)
            if signal is not None:
                teacher_side = signal[idx][:, :-1][select[:, 1:].cpu()].to(device)
            elif teacher is not None:
                with torch.no_grad():
                    teacher_side = (teacher.head, shifted(teacher.body(ids, mask), ids, select)[0])
            else:
                teacher_side = None
            alpha = hp.alpha if teacher_side is not None else 0.0
            kd, ce = chunked_lm_loss(student.head, states, targets, teacher_side, shared, spec.loss.type,
                                     hp.temperature, spec.loss.beta, need_ce=alpha < 1)
            count = max(targets.shape[0], 1)
            loss = (alpha * hp.temperature**2 * kd + (1 - alpha) * ce) / count
            optimizer_step(optimizer, model, loss, hp, step, total_steps)
            del states, teacher_side
            loss_sum += loss.item() * count
            token_count += count
            step += 1
            reporter.step(epoch, step)
        model.eval()
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / max(token_count, 1),
                  **{f"validation_{k}": v for k, v in lm_metrics(None, student, val_tokens, shared, device,
                                                                   hp.batch_size).items() if k != "tokens"}}
        model.train()
        history.append(record)
        on_event("progress", {"epoch": epoch, "step": step, "total_steps": total_steps})
        on_event("epoch", record)
    model.eval()
    return history


def train_classifier(spec: JobSpec, teacher_logits: torch.Tensor, student: nn.Module, tokens: dict,
                     device: torch.device, reporter: Reporter, on_event: EventCallback) -> list[dict]:
    hp = spec.hyperparameters
    optimizer = torch.optim.AdamW(student.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
    n = tokens["input_ids"].shape[0]
    total_steps = math.ceil(n / hp.batch_size) * hp.epochs
    step, history = 0, []
    student.train()
    for epoch in range(1, hp.epochs + 1):
        order = epoch_order(hp, n, epoch)
        loss_sum = 0.0
        for start in range(0, n, hp.batch_size):
            idx = order[start:start + hp.batch_size]
            logits = student(input_ids=tokens["input_ids"][idx].to(device),
                             attention_mask=tokens["attention_mask"][idx].to(device)).logits
            loss = distillation_loss(logits, teacher_logits[idx].to(device), tokens["labels"][idx].to(device),
                                     hp.temperature, hp.alpha, spec.loss.type, spec.loss.beta)
            optimizer_step(optimizer, student, loss, hp, step, total_steps)
            loss_sum += loss.item() * len(idx)
            step += 1
            reporter.step(epoch, step)
        record = {"epoch": epoch, "step": step, "train_loss": loss_sum / n}
        history.append(record)
        on_event("progress", {"epoch": epoch, "step": step, "total_steps": total_steps})
        on_event("epoch", record)
    student.eval()
    return history


@torch.no_grad()
def classifier_logits(model: nn.Module, tokens: dict, device: torch.device, batch_size: int) -> torch.Tensor:
    model.eval()
    chunks = [model(input_ids=tokens["input_ids"][s:s + batch_size].to(device),
                    attention_mask=tokens["attention_mask"][s:s + batch_size].to(device)).logits.float().cpu()
              for s in range(0, tokens["input_ids"].shape[0], batch_size)]
    return torch.cat(chunks)


def classifier_evaluation(teacher_logits: torch.Tensor, student_logits: torch.Tensor, labels: torch.Tensor) -> dict:
    teacher_pred, student_pred = teacher_logits.argmax(-1), student_logits.argmax(-1)
    teacher_accuracy = (teacher_pred == labels).float().mean().item()
    student_accuracy = (student_pred == labels).float().mean().item()
    return {"teacher": {"accuracy": teacher_accuracy}, "student": {"accuracy": student_accuracy},
            "agreement": (teacher_pred == student_pred).float().mean().item(),
            "kl_teacher_student": token_divergence(student_logits, teacher_logits, "forward_kl", 1.0).mean().item(),
            "accuracy_retention": student_accuracy / teacher_accuracy if teacher_accuracy else None}


def run_text_distillation(spec: JobSpec, out_dir: str | Path, on_event: EventCallback | None = None,
                          should_stop: Callable[[], bool] | None = None, device: str = "auto") -> dict:
    """Run a causal_lm or text_classification job; returns a dict for ``RunResult``."""
    on_event = on_event or (lambda kind, data: None)
    should_stop = should_stop or (lambda: False)
    out_dir = Path(out_dir)
    hp = spec.hyperparameters
    torch_device = resolve_device(device)
    torch.manual_seed(hp.seed)

    on_event("stage", {"stage": "loading", "device": str(torch_device)})
    load = load_causal_lm if spec.task == "causal_lm" else load_classifier
    teacher_model = load(spec.teacher, device=torch_device).eval()
    teacher_tokenizer = load_tokenizer(spec.teacher)
    student_model, student_tokenizer = build_student(spec, teacher_model, teacher_tokenizer, torch_device)
    kind, training, val_kind, validation = load_splits(spec)
    check_kind(spec.task, kind)
    check_kind(spec.task, val_kind)
    generated_path = None
    teacher_params, student_params = count_parameters(teacher_model), count_parameters(student_model)

    if spec.task == "text_classification":
        num_labels = teacher_model.config.num_labels
        biggest = max(r["label"] for r in training + validation)
        if biggest >= num_labels:
            raise MismatchError(f"the data has label {biggest} but the teacher has {num_labels} labels",
                                param="training_file")
        if student_model.config.num_labels != num_labels:
            raise MismatchError(f"the student has {student_model.config.num_labels} labels, the teacher "
                                f"{num_labels}", param="student")
        length = spec.data.max_length
        on_event("stage", {"stage": "teacher_inference", "rows": len(training) + len(validation)})
        teacher_train = classifier_logits(teacher_model, tokenize_for_classification(training, teacher_tokenizer,
                                                                                     length), torch_device,
                                          hp.batch_size)
        val_teacher_tokens = tokenize_for_classification(validation, teacher_tokenizer, length)
        teacher_val = classifier_logits(teacher_model, val_teacher_tokens, torch_device, hp.batch_size)
        student_tokens = tokenize_for_classification(training, student_tokenizer, length)
        total = math.ceil(len(training) / hp.batch_size) * hp.epochs
        on_event("stage", {"stage": "training", "epochs": hp.epochs, "total_steps": total})
        history = train_classifier(spec, teacher_train, student_model, student_tokens, torch_device,
                                   Reporter(on_event, should_stop, total), on_event)
        on_event("stage", {"stage": "evaluating"})
        val_student_tokens = tokenize_for_classification(validation, student_tokenizer, length)
        evaluation = classifier_evaluation(teacher_val, classifier_logits(student_model, val_student_tokens,
                                                                          torch_device, hp.batch_size),
                                           val_student_tokens["labels"])
    else:
        same_tokenizer = True
        shared = None
        if spec.method == "token":
            shared = shared_vocab_size(teacher_tokenizer, student_tokenizer, vocab_rows(teacher_model),
                                       vocab_rows(student_model))
        else:
            on_event("stage", {"stage": "generating", "prompts": len(training)})
            training = generate_completions(teacher_model, teacher_tokenizer, prompts_of(kind, training),
                                            spec.generation, torch_device, should_stop)
            generated_path = out_dir / "generated.jsonl"
            generated_path.parent.mkdir(parents=True, exist_ok=True)
            generated_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in training))
            on_event("generated", {"rows": len(training), "path": str(generated_path)})
            kind = "prompt_completion"
            try:
                shared = shared_vocab_size(teacher_tokenizer, student_tokenizer, vocab_rows(teacher_model),
                                           vocab_rows(student_model))
            except MismatchError:
                same_tokenizer = False
        tokens = tokenize_for_lm(kind, training, student_tokenizer, spec.data.max_length, spec.data.packing)
        val_tokens = tokenize_for_lm(val_kind, validation, student_tokenizer, spec.data.max_length, spec.data.packing)
        probe_ids, probe_mask = tokens["input_ids"][:1].to(torch_device), tokens["attention_mask"][:1].to(torch_device)
        student = LogitsHead(student_model, probe_ids, probe_mask)
        teacher = LogitsHead(teacher_model, probe_ids, probe_mask) if same_tokenizer else None
        before = lm_metrics(None, student, val_tokens, shared, torch_device, hp.batch_size)
        signal = None
        if spec.method == "token" and spec.teacher_signal.top_k is not None:
            on_event("stage", {"stage": "teacher_inference", "rows": int(tokens["input_ids"].shape[0]),
                               "top_k": spec.teacher_signal.top_k})
            signal = precompute_topk(teacher, tokens, min(spec.teacher_signal.top_k, shared), hp.temperature,
                                     shared, torch_device, hp.batch_size)
        total = math.ceil(tokens["input_ids"].shape[0] / hp.batch_size) * hp.epochs
        on_event("stage", {"stage": "training", "epochs": hp.epochs, "total_steps": total})
        history = train_causal_lm(spec, teacher if spec.method == "token" else None, student, tokens, signal,
                                  shared or vocab_rows(student_model), torch_device,
                                  Reporter(on_event, should_stop, total), val_tokens, on_event)
        on_event("stage", {"stage": "evaluating"})
        metrics = lm_metrics(teacher, student, val_tokens, shared, torch_device, hp.batch_size)
        prompt = prompts_of(val_kind, validation[:1])[0]
        evaluation = {
            "teacher": {"perplexity": metrics.get("teacher_perplexity"),
                        "generation_tokens_per_s": generation_speed(teacher_model, teacher_tokenizer, prompt,
                                                                    torch_device)},
            "student": {"perplexity": metrics["student_perplexity"],
                        "perplexity_before_training": before["student_perplexity"],
                        "generation_tokens_per_s": generation_speed(student_model, student_tokenizer, prompt,
                                                                    torch_device)},
            "top1_agreement": metrics.get("top1_agreement"),
            "kl_teacher_student": metrics.get("kl_teacher_student"),
            "validation_tokens": metrics["tokens"],
        }
        evaluation["speedup"] = (evaluation["student"]["generation_tokens_per_s"]
                                 / evaluation["teacher"]["generation_tokens_per_s"])
    evaluation["teacher"]["parameters"] = teacher_params
    evaluation["student"]["parameters"] = student_params
    evaluation["parameter_ratio"] = student_params / teacher_params
    evaluation["device"] = str(torch_device)
    on_event("evaluation", evaluation)

    on_event("stage", {"stage": "exporting"})
    final = out_dir / "final"
    card = model_card({"teacher": str(spec.metadata.get("teacher_name") or spec.teacher.name),
                       "student": student_model.config.model_type, "task": spec.task, "method": spec.method,
                       "loss": {"type": spec.loss.type, "beta": spec.loss.beta,
                                "top_k": spec.teacher_signal.top_k},
                       "data": str(spec.metadata.get("training_name") or spec.training_file.name),
                       "hyperparameters": {k: v for k, v in vars(hp).items()}, "evaluation": evaluation})
    save_hf(student_model, student_tokenizer, final, card)
    (final / "distill_state.json").write_text(json.dumps({"history": history, "evaluation": evaluation,
                                                           "spec": spec.to_dict()}, indent=2, default=str))
    return {"model_path": final, "evaluation": evaluation, "history": history, "device": str(torch_device),
            "parameters": student_params, "generated_path": generated_path,
            "architecture": {"kind": "hf", "task": spec.task, "model_type": student_model.config.model_type,
                             "num_layers": layer_count(student_model.config),
                             "vocab_size": student_model.config.vocab_size}}

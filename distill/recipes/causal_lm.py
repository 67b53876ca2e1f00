"""Causal LM, token-level KD: the student matches the teacher's next-token distributions.

    load teacher + tokenizer → student (pretrained / config / derived layers) → one
    vocabulary (a padded teacher head is cut to the tokenizer) → tokenize (max_length ≤
    context) → [top-k teacher signal: the teacher runs once, stored] → train on
    alpha · T² · divergence(teacher ‖ student) + (1 − alpha) · CE(next token)
    [+ intermediate.weight · hidden-state (and attention) terms: recipes/_intermediate.py]
    → evaluate (perplexity, agreement, KL, tokens/s) → export a HF directory + model card
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import MismatchError
from ..hf import shared_vocab_size
from ..losses import TopKSignal, lm_loss, shifted, teacher_topk
from ..text_data import tokenize_for_lm
from ._intermediate import WithIntermediate
from ._text import CausalLMBase, LogitsHead, check_kind, lm_metrics, load_splits, resolve_max_length, vocab_rows
from .base import Export, Recipe, register

TEACHER_SIGNAL_MAX_BYTES = 2 << 30  # a precomputed top-k signal above this is refused, never silently dropped
SIGNAL_POSITIONS_PER_PASS = 64  # teacher head applied to (b, ≤ 64, V) at a time while a signal is built,
SIGNAL_FLOATS_PER_PASS = 1 << 22  # and to at most ~16 MiB of float32 logits (fewer positions at large b·V)


@torch.no_grad()
def precompute_topk(teacher: LogitsHead, tokens: dict, k: int, temperature: float, shared: int,
                    device: torch.device, batch_size: int, check_stop=None) -> TopKSignal:
    """Teacher inference once: top-k log-probs (float32), ids (int32) and the tail mass
    (float32) for every position, stored on the CPU: (N, L, k), (N, L, k), (N, L)."""
    n, length = tokens["input_ids"].shape
    logprobs = torch.empty(n, length, k, dtype=torch.float32)
    indices = torch.empty(n, length, k, dtype=torch.int32)
    tails = torch.empty(n, length, dtype=torch.float32)
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        hidden = teacher.body(tokens["input_ids"][rows].to(device), tokens["attention_mask"][rows].to(device))
        per_pass = max(1, min(SIGNAL_POSITIONS_PER_PASS, SIGNAL_FLOATS_PER_PASS // (hidden.shape[0] * shared)))
        for offset in range(0, hidden.shape[1], per_pass):
            cols = slice(offset, offset + per_pass)
            part = hidden[:, cols]  # a strided slice: flattened to rows (a copy) first, because torch's CPU
            # linear on a non-contiguous 3-D input takes a path ~7x slower than on rows (measured at V=32k)
            logits = teacher.head(part.reshape(-1, part.shape[-1])).reshape(*part.shape[:-1], -1)[..., :shared].float()
            signal = teacher_topk(logits, k, temperature)
            logprobs[rows, cols] = signal.logprobs.cpu()
            indices[rows, cols] = signal.indices.int().cpu()
            tails[rows, cols] = signal.tail_logprob.cpu()
        if check_stop is not None:
            check_stop("running the teacher")
    return TopKSignal(logprobs=logprobs, indices=indices, tail_logprob=tails)


@register("causal_lm", "token")
class CausalLMToken(WithIntermediate, CausalLMBase, Recipe):
    def prepare(self) -> None:
        spec, hp = self.spec, self.hp
        self.load_models()
        kind, training, self.val_kind, self.validation = load_splits(spec)
        check_kind(spec.task, kind)
        check_kind(spec.task, self.val_kind, "validation_file")
        self.shared = shared_vocab_size(self.teacher_tokenizer, self.tokenizer, vocab_rows(self.teacher_model),
                                        vocab_rows(self.model))
        max_length = resolve_max_length(spec, self.teacher_model, self.model)
        self.tokens = tokenize_for_lm(kind, training, self.tokenizer, max_length, spec.data.packing)
        self.val_tokens = tokenize_for_lm(self.val_kind, self.validation, self.tokenizer, max_length,
                                          spec.data.packing)
        self.heads(self.tokens, with_teacher=True)
        self.setup_intermediate(self.tokens, student_base=self.student.split, teacher_base=self.teacher.split)
        self.before = lm_metrics(None, self.student, self.val_tokens, self.shared, self.device, hp.batch_size)
        self.signal = self.teacher_signal() if spec.teacher_signal.top_k is not None else None
        self.full = self.full_signal() if spec.teacher_signal.top_k is None else None
        self.num_examples = self.tokens["input_ids"].shape[0]

    def teacher_signal(self) -> TopKSignal:
        """The top-k teacher signal. With a teacher cache (``ctx.teacher_cache``, distill/teacher_cache.py)
        it is looked up by content (teachers' weights, tokenized data, k, temperature, vocabulary); a hit
        skips the teacher. A cached signal is quantized, so on a miss too the job trains from the DECODED
        signal (compute → encode → store → decode): the first job and every repeat train bit-identically.
        Without a cache (or budget 0) the fresh float32 signal is used, as before."""
        n, length = self.tokens["input_ids"].shape
        k = min(self.spec.teacher_signal.top_k, self.shared)
        bytes_per_token = 8 * k + 4
        size = n * length * bytes_per_token
        if size > TEACHER_SIGNAL_MAX_BYTES:
            raise MismatchError(f"a top-{k} teacher signal for {n * length} token positions needs {size} bytes "
                                f"({bytes_per_token} per token), over the {TEACHER_SIGNAL_MAX_BYTES}-byte limit; "
                                "use a smaller teacher_signal.top_k, less data, or leave top_k out to run the "
                                "teacher alongside training (the full-vocabulary loss)", param="teacher_signal.top_k")
        event = {"top_k": k, "positions": n * length, "bytes": size, "bytes_per_token": bytes_per_token,
                 "cache": "off"}
        cache = getattr(self.ctx, "teacher_cache", None)
        if cache is not None and cache.enabled:
            from ..teacher_cache import decode_signal, encode_signal

            key, inputs = cache.key([(str(p), w) for p, w in self.spec.teacher_paths], self.tokens, k,
                                    self.hp.temperature, self.shared,
                                    str(next(self.teacher_model.parameters()).dtype))
            hit = cache.get(key)
            event.update(cache="hit" if hit is not None else "miss", cache_key=key)
            if hit is not None:
                self.ctx.stage("teacher_inference", rows=n, top_k=k, cache="hit")
                signal, stored = hit.signal, hit.stored_bytes
            else:
                self.ctx.stage("teacher_inference", rows=n, top_k=k, cache="miss")
                fresh = precompute_topk(self.teacher, self.tokens, k, self.hp.temperature, self.shared, self.device,
                                        self.hp.batch_size, self.ctx.check_stop)
                encoded = encode_signal(fresh, self.shared)
                del fresh
                written = cache.put(key, encoded, inputs)  # None: bigger than the whole budget, not stored
                event["stored"] = written is not None
                stored = written or sum(t.numel() * t.element_size() for t in encoded.values())
                signal = decode_signal(encoded)
            event.update(cache_bytes=stored, cache_bytes_per_token=round(stored / max(1, n * length), 2))
        else:
            self.ctx.stage("teacher_inference", rows=n, top_k=k)
            signal = precompute_topk(self.teacher, self.tokens, k, self.hp.temperature, self.shared, self.device,
                                     self.hp.batch_size, self.ctx.check_stop)
        self.ctx.on_event("teacher_signal", event)
        return signal

    def full_signal(self):
        """The teacher's full-vocabulary logits from the teacher-signal store (float16), or None: the teacher
        then runs on every batch ("online"). Used when ``teacher_signal.full_logits`` is "cache", or "auto"
        on a CPU device (on a GPU the teacher's forward is cheaper than reading 2·V bytes per token), when
        the store is on, no intermediate-layer loss needs the teacher's hidden states anyway, and the
        logits fit the store's byte budget. On a miss the teacher runs once over the data, in slices of
        rows small enough to keep about SIGNAL_FLOATS_PER_PASS logits live; the job then trains from the
        stored float16 logits, exactly as a later job that hits does."""
        mode, cache = self.spec.teacher_signal.full_logits, getattr(self.ctx, "teacher_cache", None)
        wanted = mode == "cache" or (mode == "auto" and self.device.type == "cpu")
        if not wanted or cache is None or not cache.enabled or self.intermediate is not None:
            return None
        n, length = self.tokens["input_ids"].shape
        key, inputs = cache.key([(str(p), w) for p, w in self.spec.teacher_paths], self.tokens, None,
                                self.hp.temperature, self.shared, str(next(self.teacher_model.parameters()).dtype))
        event = {"full_vocabulary": True, "positions": n * length, "vocabulary": self.shared,
                 "bytes_per_token": 2 * self.shared, "cache_key": key}
        entry = cache.get_full(key)
        if entry is None:
            writer = cache.open_full(key, (n, length, self.shared), inputs)
            if writer is None:  # bigger than the whole budget: the teacher runs online
                self.ctx.on_event("teacher_signal", {**event, "cache": "too_big"})
                return None
            self.ctx.stage("teacher_inference", rows=n, full_vocabulary=True, cache="miss")
            try:
                self.write_full_logits(writer)
                entry = writer.commit()
            finally:
                writer.abort()  # a no-op after commit; removes the partial file on an error or a stop
            event["cache"] = "miss"
        else:
            self.ctx.stage("teacher_inference", rows=n, full_vocabulary=True, cache="hit")
            event["cache"] = "hit"
        self.ctx.on_event("teacher_signal", {**event, "cache_bytes": entry.nbytes})
        return entry

    @torch.no_grad()
    def write_full_logits(self, writer) -> None:
        n, length = self.tokens["input_ids"].shape
        rows_per_pass = max(1, SIGNAL_FLOATS_PER_PASS // (length * self.shared))
        for start in range(0, n, self.hp.batch_size):
            rows = slice(start, start + self.hp.batch_size)
            hidden = self.teacher.body(self.tokens["input_ids"][rows].to(self.device),
                                       self.tokens["attention_mask"][rows].to(self.device))
            for offset in range(0, hidden.shape[0], rows_per_pass):
                writer.write(start + offset, self.teacher.head(hidden[offset:offset + rows_per_pass])[..., :self.shared])
            self.ctx.check_stop("running the teacher")

    def batch_loss(self, indices: torch.Tensor) -> tuple[torch.Tensor | None, int]:
        hp, spec, device = self.hp, self.spec, self.device
        select_cpu = self.tokens["loss_mask"][indices]
        count = int(select_cpu[:, 1:].sum())  # target tokens, from the CPU copy: no device sync
        if count == 0:
            return None, 0
        ids = self.tokens["input_ids"][indices].to(device)  # (B, L)
        mask = self.tokens["attention_mask"][indices].to(device)
        select = select_cpu.to(device)
        # With intermediate, one forward per model yields the hidden states and the last one.
        features = self.intermediate_features(ids, mask) if self.intermediate is not None else None
        student_hidden = features[0].output if features else self.student.body(ids, mask)
        states, targets = shifted(student_hidden, ids, select)  # (N, H), (N,)
        if self.signal is not None:
            teacher_side = self.signal[indices][:, :-1][select_cpu[:, 1:]].to(device)
        elif getattr(self, "full", None) is not None:  # float16 (N, V), upcast chunk by chunk in the loss
            teacher_side = self.full.rows(indices)[:, :-1][select_cpu[:, 1:]].to(device)
        else:
            with torch.no_grad():
                teacher_hidden = features[1].output if features else self.teacher.body(ids, mask)
                teacher_side = (self.teacher.head, shifted(teacher_hidden, ids, select)[0])
        loss = lm_loss(self.student.head, states, targets, teacher_side, self.shared, spec.loss.type, hp.temperature,
                       spec.loss.beta, hp.alpha * hp.temperature**2, 1 - hp.alpha).total / count
        if features:
            loss = loss + self.intermediate.loss(*features, mask)
        return loss, count

    def intermediate_features(self, ids: torch.Tensor, mask: torch.Tensor):
        return self.intermediate.student_features(ids, mask), self.intermediate.teacher_features(ids, mask)

    def validate(self) -> dict:
        hp, loss = self.hp, self.spec.loss
        objective = {"loss_type": loss.type, "temperature": hp.temperature, "beta": loss.beta, "alpha": hp.alpha}
        metrics = lm_metrics(self.teacher, self.student, self.val_tokens, self.shared, self.device, hp.batch_size,
                             objective=objective)
        record = {"validation_loss": metrics["loss"], "validation_perplexity": metrics["student_perplexity"],
                  "validation_top1_agreement": metrics["top1_agreement"],
                  "validation_kl_teacher_student": metrics["kl_teacher_student"]}
        if self.intermediate is not None:
            # validation_loss stays the training objective (as train_loss): output level + weighted terms
            terms = self.intermediate.validate(self.val_tokens, self.device, hp.batch_size)
            record.update(terms, validation_loss=metrics["loss"] + self.intermediate.weighted(terms))
        return record

    def evaluate(self) -> dict:
        if self.intermediate is not None:
            self.intermediate.restore_attention()
        evaluation = self.lm_evaluation()
        if self.intermediate is not None:
            evaluation["intermediate"] = self.intermediate.describe()
        if self.extra_teachers:
            evaluation.update(self.teachers_evaluation(evaluation))
        return evaluation

    def teachers_evaluation(self, evaluation: dict) -> dict:
        """Several teachers: "teacher" is their mixture (parameters: all of them); "teachers" lists
        each beside the student (its perplexity, the student's top-1 agreement with it, KL)."""
        from ..models import count_parameters

        names = self.spec.input_names()
        heads = self.teacher.teachers
        models = [self.teacher_model, *self.extra_teachers]
        teachers = []
        for i, (head, model, (_, weight)) in enumerate(zip(heads, models, self.spec.teacher_paths)):
            metrics = lm_metrics(head, self.student, self.val_tokens, self.shared, self.device, self.hp.batch_size,
                                 check_stop=self.ctx.check_stop)
            teachers.append({"name": names[f"teachers[{i}]"], "weight": weight,
                             "parameters": count_parameters(model),
                             "perplexity": metrics["teacher_perplexity"],
                             "student_top1_agreement": metrics["top1_agreement"],
                             "kl_teacher_student": metrics["kl_teacher_student"]})
        total = sum(t["parameters"] for t in teachers)
        teacher = {**evaluation["teacher"], "parameters": total,
                   "note": "the weighted mixture of the teachers at the job's temperature; "
                           "generation_tokens_per_s is the first teacher's"}
        return {"teacher": teacher, "teachers": teachers,
                "parameter_ratio": evaluation["student"]["parameters"] / total}

    def export(self, folder: Path, evaluation: dict, history: list[dict]) -> Export:
        return self.hf_export(folder, evaluation, history)

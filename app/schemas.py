"""Request and response bodies: the public contract. Families follow Create / Public / ListPublic."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, FiniteFloat, SerializerFunctionWrapHandler, ValidationInfo,
                      field_validator, model_serializer, model_validator)

from distill.spec import MAX_TEACHERS, JobOptions, StudentForms, WeightedTeacher, check_student_for_task

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FilePurpose = Literal["dataset", "model"]
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Every id this service mints ("file-<hex>", "job-<hex>", "model-<hex>") matches; anything else
(a NUL byte, a control character, 10 kB of text) is refused before it reaches a query."""
SERVER_PATH_PATTERN = r"^[^\x00-\x1f\x7f]+$"  # no NUL or control characters in a server-side path


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stored(BaseModel):
    """A stored JSON object given a named schema: the fields it usually has are declared (for the
    OpenAPI document and clients), any other key passes through, and a declared field the stored
    object lacks is left out of the answer rather than added as null. The API answers exactly what
    was stored, whichever version of the service wrote it."""

    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _as_stored(self, handler: SerializerFunctionWrapHandler):  # no return type: the schema stays the model's
        data = handler(self)
        kept = self.model_fields_set | set(self.model_extra or {})
        return {key: value for key, value in data.items() if key in kept}


# ---- errors (RFC 9457; app/errors.py writes them) ----------------------------------------------------------

class ProblemFieldError(BaseModel):
    param: str | None = Field(None, description="The failing field, as written in the request")
    message: str


class Problem(BaseModel):
    """An error, as ``application/problem+json`` (RFC 9457), with ``code`` and ``param`` added."""

    model_config = ConfigDict(extra="allow")  # an error may add its own fields (tensor, errors, ...)

    type: str = Field("about:blank", description="Always about:blank: ``code`` tells the errors apart")
    title: str = Field(..., description="The HTTP status phrase, e.g. Not Found")
    status: int = Field(..., description="The HTTP status code")
    detail: str = Field(..., description="What went wrong and, where it helps, what to do")
    instance: str = Field(..., description="The request path")
    code: str = Field(..., description="A stable machine-readable code: not_found, conflict, invalid_request, ...")
    param: str | None = Field(None, description="The request field, header or parameter at fault, if one is")
    errors: list[ProblemFieldError] | None = Field(
        None, description="Request validation (422): every failing field; ``param`` names the first")


# ---- health ------------------------------------------------------------------------------------------------

class Health(BaseModel):
    status: Literal["ok"] = "ok"


# ---- files -------------------------------------------------------------------------------------------------

class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    bytes: int
    sha256: str
    purpose: FilePurpose
    created_at: int
    details: dict[str, Any] = Field(description="What validation found: rows/num_features/has_labels or architecture")
    kind: str | None = Field(None, description="Model files: the model kind (mlp | hf); null for datasets")


class FilesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[FilePublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# ---- jobs --------------------------------------------------------------------------------------------------

class ModelReference(Strict):
    """A model to load, named one of three ways."""

    file_id: str | None = Field(None, min_length=1, max_length=64, pattern=ID_PATTERN,
                                description="An uploaded model file or archive (purpose=model)")
    model_id: str | None = Field(None, min_length=1, max_length=64, pattern=ID_PATTERN,
                                 description="A finished model of this service")
    path: str | None = Field(None, min_length=1, max_length=1024, pattern=SERVER_PATH_PATTERN,
                             description="A server-side model directory under DISTILL_MODELS_DIR")

    def reference(self) -> dict | None:
        """{"file_id"|"model_id"|"path": ...} when a model is named, else None."""
        refs = {k: getattr(self, k) for k in ("file_id", "model_id", "path") if getattr(self, k) is not None}
        return refs or None


class TeacherRef(ModelReference):
    @model_validator(mode="after")
    def _exactly_one(self) -> "TeacherRef":
        if sum(v is not None for v in (self.file_id, self.model_id, self.path)) != 1:
            raise ValueError("give exactly one of file_id, model_id or path")
        return self


class WeightedTeacherRef(WeightedTeacher, TeacherRef):
    """One of several teachers: a model reference and its weight in the mixture."""


class StudentRef(StudentForms, ModelReference):
    """The student: an architecture, layers derived from the teacher, or a pretrained model
    (``file_id``/``model_id``/``path``). The forms without a file are declared in distill/spec.py."""


class JobCreate(JobOptions):
    """A job: where the teacher, student and data come from (by id), plus the options every
    job spec has (task, method, hyperparameters, loss, ...), declared once in distill/spec.py."""

    teacher: TeacherRef | None = Field(None, description="The teacher (or give teachers)")
    teachers: list[WeightedTeacherRef] | None = Field(
        None, min_length=2, max_length=MAX_TEACHERS,
        description="Several teachers in place of teacher: the target is the weighted mixture of their "
                    "probabilities at temperature T (classification, text_classification, causal_lm token with "
                    "one shared tokenizer)")
    student: StudentRef
    training_file: str = Field(..., min_length=1, max_length=64, pattern=ID_PATTERN,
                               description="Dataset file id: the transfer set (labels optional)")
    validation_file: str | None = Field(None, min_length=1, max_length=64, pattern=ID_PATTERN,
                                        description="Dataset file id; else validation_split is held out")

    @field_validator("student")
    @classmethod
    def _student_fits_task(cls, student: StudentRef, info: ValidationInfo) -> StudentRef:
        if "task" in info.data:  # fields validate in order: task (JobOptions) comes first
            check_student_for_task(info.data["task"], student)
        return student

    def teacher_refs(self) -> list[tuple[str, dict, float]]:
        """(param, reference, normalised weight) for every teacher."""
        if self.teachers is None:
            return [("teacher", self.teacher.reference(), 1.0)]
        total = sum(t.weight for t in self.teachers)
        return [(f"teachers[{i}]", t.reference(), t.weight / total) for i, t in enumerate(self.teachers)]

    @field_validator("metadata")
    @classmethod
    def _small_metadata(cls, metadata: dict) -> dict:
        if len(json.dumps(metadata)) > 16_384:
            raise ValueError("metadata must serialise to at most 16 KiB of JSON")
        return metadata


class JobProgress(BaseModel):
    epoch: int = 0
    step: int = 0
    total_steps: int = 0


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobSpecPublic(Stored):
    """The job as it was submitted (a JobCreate), every default filled in; ids, not server paths."""

    task: str | None = None
    method: str | None = None
    teacher: dict[str, Any] | None = Field(None, description="file_id | model_id | path")
    teachers: list[dict[str, Any]] | None = Field(None, description="Several weighted teachers in place of teacher")
    student: dict[str, Any] | None = Field(None, description="architecture | derive | file_id | model_id | path "
                                                          "(+ lora)")
    training_file: str | None = None
    validation_file: str | None = None
    validation_split: float | None = None
    hyperparameters: dict[str, Any] | None = None
    loss: dict[str, Any] | None = None
    teacher_signal: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    on_policy: dict[str, Any] | None = None
    intermediate: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class ModelEvaluation(Stored):
    """One model (the teacher or the student) on the validation set; the keys depend on the task."""

    parameters: int | None = None
    accuracy: float | None = Field(None, description="Classification tasks, with labels")
    latency_ms_per_sample: float | None = Field(None, description="MLP classification")
    perplexity: float | None = Field(None, description="causal_lm")
    generation_tokens_per_s: float | None = Field(None, description="causal_lm")


class Evaluation(Stored):
    """Teacher vs student on the validation set. The keys depend on the task: classification adds
    agreement / accuracy_retention / speedup, causal_lm top1_agreement / validation_tokens."""

    teacher: ModelEvaluation | None = None
    student: ModelEvaluation | None = None
    teachers: list[dict[str, Any]] | None = Field(None, description="Several teachers: each one on its own")
    agreement: float | None = Field(None, description="Share of rows where the student's top class is the teacher's")
    top1_agreement: float | None = None
    kl_teacher_student: float | None = None
    parameter_ratio: float | None = Field(None, description="Student parameters / teacher parameters")
    speedup: float | None = None
    accuracy_retention: float | None = None
    device: str | None = None


class JobMetrics(Stored):
    """The last epoch's record (losses, learning rate) and, once the job succeeded, its evaluation.
    Empty until the first epoch ends."""

    epoch: int | None = None
    step: int | None = None
    train_loss: float | None = None
    validation_loss: float | None = None
    learning_rate: float | None = None
    skipped_batches: int | None = None
    evaluation: Evaluation | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["distillation.job"] = "distillation.job"
    status: JobStatus
    created_at: int
    started_at: int | None
    finished_at: int | None
    spec: JobSpecPublic
    progress: JobProgress
    metrics: JobMetrics
    error: JobError | None
    result_model_id: str | None
    result_files: list[str] = Field(default_factory=list,
                                    description="Files the job produced, e.g. the teacher-generated set")
    device: str | None = Field(None, description="The device the worker ran the job on")
    cancel_requested: bool = False
    queue_position: int | None = Field(None, description="While queued: the job's place in the one FIFO queue all "
                                       "tenants share, by submission time (1 = next to run); null otherwise")


class EstimatePublic(BaseModel):
    """What a job would cost, computed without queueing it (see app/services/estimate.py for the method)."""

    object: Literal["distillation.job.estimate"] = "distillation.job.estimate"
    task: str
    method: str
    dataset_rows: int = Field(description="Rows in the training file")
    rows: int = Field(description="Training rows (sequences) per epoch: the file's rows less the held-out validation "
                                  "split; packed text: blocks of data.max_length")
    tokens: int | None = Field(description="Training tokens per epoch (text tasks; null for tabular data)")
    tokens_method: str | None = Field(description="How tokens were counted")
    epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    steps_per_epoch: int = Field(description="Optimizer steps per epoch: ceil(ceil(rows / batch_size) / accumulation)")
    steps: int = Field(description="Optimizer steps in all: epochs × steps_per_epoch")
    teacher_parameters: int = Field(description="Parameters of the teacher (summed over several teachers)")
    student_parameters: int
    teacher_passes: int = Field(description="Forward passes of the teacher over the training data")
    generated_tokens: int = Field(description="Tokens generated during the job (sequence / on_policy methods)")
    teacher_flops: int = Field(description="≈ 2 × teacher parameters × tokens (rows for MLPs) × teacher_passes, "
                                           "plus its generation in sequence KD")
    student_flops: int = Field(description="≈ 6 × student parameters × tokens (rows for MLPs) × epochs")
    generation_flops: int = Field(description="≈ 2 × parameters of the generating model × generated_tokens")
    total_flops: int
    device: str = Field(description="The worker device the duration is estimated for")
    flops_per_second: float = Field(description="Assumed sustained throughput of that device")
    estimated_seconds: float = Field(description="An estimate, not a measurement: see assumptions")
    assumptions: list[str]


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class JobEventPublic(BaseModel):
    id: int
    object: Literal["distillation.job.event"] = "distillation.job.event"
    created_at: int
    type: str
    message: str
    data: dict[str, Any]


class JobEventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventPublic]
    has_more: bool


# ---- models ------------------------------------------------------------------------------------------------

class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created_at: int
    created: int = Field(description="The same as created_at (OpenAI's name: the openai client's models.list)")
    owned_by: str = Field(description="The tenant that owns the model (OpenAI's field)")
    job_id: str | None
    task: str
    kind: str = Field("mlp", description="The model kind: mlp (a safetensors model file) | hf (transformers)")
    architecture: dict[str, Any]
    parameters: int
    size_bytes: int
    sha256: str
    evaluation: Evaluation


class ModelsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class PredictRequest(Strict):
    inputs: list[list[FiniteFloat]] | list[str] = Field(
        ..., min_length=1, description="Rows of features (MLP classifiers) or texts (text classifiers)")


class Prediction(BaseModel):
    label: int
    probabilities: list[float]


class PredictResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    predictions: list[Prediction]


# ---- OpenAI-compatible completions -------------------------------------------------------------------------------

def _only_default(name: str, default):
    """A validator for an OpenAI parameter this service does not implement: its default passes (clients
    send some of them by default), anything else is refused naming the parameter, never ignored."""
    def check(cls, value):
        if value not in (None, default):
            raise ValueError(f"{name} other than {json.dumps(default)} is not supported")
        return value
    return field_validator(name)(classmethod(check))


class StreamOptions(Strict):
    include_usage: bool = Field(False, description="Send a last chunk with the usage (and empty choices)")


class _GenerationRequest(BaseModel):
    # OpenAI parameters this service does not implement are refused by name (a non-default value of a
    # declared one, or any undeclared one), never silently ignored.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(..., description="A model id of this service")
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences where generation stops")
    seed: int | None = None
    stream: bool = Field(False, description="Send the completion as Server-Sent Events (OpenAI's chunk format, "
                                            "ending with `data: [DONE]`) while it is generated; n must be 1")
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true")
    user: str | None = Field(None, max_length=256, description="Accepted for compatibility; has no effect")
    frequency_penalty: float | None = Field(0, description="Only 0 (not supported)")
    presence_penalty: float | None = Field(0, description="Only 0 (not supported)")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported: only null or {}")

    _no_frequency_penalty = _only_default("frequency_penalty", 0)
    _no_presence_penalty = _only_default("presence_penalty", 0)

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, bias):
        if bias:
            raise ValueError("logit_bias is not supported")
        return bias

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop


class CompletionRequest(_GenerationRequest):
    prompt: str | list[str] = Field(..., description="A prompt or a list of prompts")
    logprobs: int | None = Field(None, ge=0, le=5, description=(
        "Return the log-probabilities of each generated token and of the k most likely tokens at each step "
        "(OpenAI's legacy format): log_softmax of the model's raw next-token logits, before temperature/top_p"))
    echo: bool = Field(False, description="Only false (not supported)")
    best_of: int | None = Field(None, description="Only 1 (not supported)")
    suffix: str | None = Field(None, description="Not supported: only null")

    _no_echo = _only_default("echo", False)
    _no_best_of = _only_default("best_of", 1)
    _no_suffix = _only_default("suffix", None)

    @field_validator("prompt")
    @classmethod
    def _some_prompts(cls, prompt):
        if isinstance(prompt, list) and not 1 <= len(prompt) <= 64:
            raise ValueError("give 1 to 64 prompts")
        return prompt


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatResponseFormat(Strict):
    type: Literal["text"] = Field("text", description="Only text (json_object / json_schema are not supported)")


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096, description="OpenAI's newer name of max_tokens")
    logprobs: bool = Field(False, description=(
        "Return the log-probability of each generated token: log_softmax of the model's raw next-token "
        "logits, before temperature/top_p"))
    top_logprobs: int | None = Field(None, ge=0, le=20, description="With logprobs: the k most likely tokens per step")
    response_format: ChatResponseFormat | None = None

    @model_validator(mode="after")
    def _max_completion_tokens(self):  # the newer name wins when both are given
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions format; text_offset counts characters from the start of the prompt."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    """POST /v1/completions (stream=false). With stream=true: chunks of the same shape with text deltas."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    """POST /v1/chat/completions (stream=false). With stream=true: ``chat.completion.chunk`` objects whose
    choices carry a ``delta`` (the role first, then content pieces; finish_reason on the last)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


# ---- webhooks ----------------------------------------------------------------------------------------------

WebhookEventType = Literal["job.running", "job.succeeded", "job.failed", "job.cancelled"]
WebhookDeliveryStatus = Literal["pending", "succeeded", "failed"]


class WebhookEndpointCreate(Strict):
    url: str = Field(..., min_length=1, max_length=2048,
                     description="An http(s) URL that receives a POST per event; private, loopback and link-local "
                                 "addresses are refused unless the service allows them")
    events: list[WebhookEventType] = Field(..., min_length=1, max_length=16, description="Event types to receive")
    description: str = Field("", max_length=1024, pattern=r"^[^\x00]*$")


class WebhookEndpointPublic(BaseModel):
    id: str
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    url: str
    events: list[WebhookEventType]
    description: str
    created_at: int


class WebhookEndpointCreated(WebhookEndpointPublic):
    secret: str = Field(..., description="The signing secret (Standard Webhooks, whsec_…): shown only in this "
                                         "response; verify each delivery's webhook-signature with it")


class WebhookEndpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None


class WebhookAttemptPublic(BaseModel):
    attempt: int = Field(..., description="1 for the first try, 2 for the first retry, ...")
    started_at: int
    finished_at: int | None = Field(..., description="null: the attempt never finished (its worker was lost)")
    status_code: int | None = Field(..., description="The receiver's HTTP status; null when it gave none")
    error: str | None = Field(..., description="Why the attempt failed: connection error, timeout or non-2xx")
    response_body: str | None = Field(..., description="The first bytes of the receiver's answer")


class WebhookDeliveryPublic(BaseModel):
    id: str = Field(..., description="The message id: the webhook-id header, the same on every retry")
    object: Literal["webhook_delivery"] = "webhook_delivery"
    endpoint_id: str
    event_type: WebhookEventType
    job_id: str | None
    status: WebhookDeliveryStatus = Field(..., description="pending (retrying), succeeded (a 2xx) or failed "
                                                           "(given up after DISTILL_WEBHOOK_RETRY_WINDOW_S)")
    created_at: int
    delivered_at: int | None
    next_attempt_at: int | None = Field(..., description="When the next try is due (unix seconds); null once done")
    attempts: list[WebhookAttemptPublic] = Field(..., description="Every try, oldest first")


class WebhookDeliveriesPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookDeliveryPublic]
    has_more: bool
    first_id: str | None
    last_id: str | None

"""Settings from ``DISTILL_*`` environment variables, with embedded defaults that run
on one machine with nothing installed: SQLite, a local artifacts folder and Celery's
filesystem broker under ``./var``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILL_", extra="ignore")

    database_url: str = "sqlite:///./var/distill.db"
    """SQLAlchemy URL; e.g. postgresql+psycopg2://user@host/db."""
    broker_url: str = "filesystem://"
    """Celery broker; the embedded default is a durable on-disk queue under var/broker."""
    artifacts_dir: Path = Path("./var/artifacts")
    """Where uploads and finished models are stored (LocalStorage's root; shared by API and workers)."""
    work_dir: Path | None = None
    """Local scratch folder (DISTILL_WORK_DIR) where a worker writes a job's checkpoints and outputs,
    as <work_dir>/jobs/<job_id>, before handing finished artifacts to storage; the API unpacks
    uploaded archives under <work_dir>/tmp. Best on fast local disk, and on the artifacts' filesystem
    when storage is local (hand-over is then a rename). Unset: the artifacts folder itself, so jobs
    work in <artifacts_dir>/jobs/<job_id> as they always have."""
    queue: str = "distill"
    """Celery queue the API publishes to and workers consume."""
    device: str = "auto"
    """Worker device: auto (CUDA when present, else CPU), cpu or cuda:N."""
    inference_device: str = "cpu"
    """Device the API process serves /predict on."""
    max_upload_bytes: int = 512 * MiB
    """Largest accepted upload; larger bodies get 413."""
    max_extracted_bytes: int | None = None
    """Largest total size a model archive may unpack to (zip bombs stop here). Unset: 4 x max_upload_bytes
    (see ``extracted_bytes_limit``): safetensors weights barely compress, so a real model archive unpacks to
    little more than its own size, while a bomb's ratio is in the hundreds."""
    models_dir: Path | None = None
    """Allow-listed root for server-side teachers/students given as {"path": ...}; unset = disabled."""
    max_dataset_rows: int = 5_000_000
    max_student_parameters: int = 200_000_000
    max_job_seconds: int = 6 * 3600
    """A running job past this is stopped and failed with code time_limit."""
    max_job_attempts: int = 3
    """A job whose worker died this many times is failed instead of retried again."""
    checkpoint_interval_s: float = 60.0
    """A running job writes a step checkpoint at most this often (0 = every optimizer step)."""
    broker_visibility_timeout_s: int | None = None
    """Redis broker: seconds before a message a worker took but never acknowledged (the worker
    died) is handed to another worker, which resumes the job from its newest checkpoint.
    Default: max_job_seconds + 600, so a live worker's long job is never handed out twice."""
    heartbeat_timeout_s: float = 60.0
    """A running job whose heartbeat is older than this has lost its worker: the reaper re-queues it."""
    shutdown_grace_s: float = 20.0
    """On SIGTERM a worker checkpoints its job, hands it back to the queue and exits within this."""
    reconcile_interval_s: float = 5.0
    """How often each worker runs the reconciler (dead workers' jobs, queued jobs without a message)."""
    queued_resend_after_s: float = 60.0
    """A job queued this long without being claimed is published again (a lost broker message)."""
    database_idle_transaction_timeout_s: float | None = None
    """PostgreSQL: end a session idle inside a transaction this long. Workers set it to half the
    heartbeat timeout (a frozen worker must not hold its job's row lock past it); unset elsewhere."""
    database_pool_size: int = 40
    """Database connections each process keeps open once it has needed them (opened on demand, then reused): as
    many as the API's thread pool (40 threads, each request holds at most one), so a busy API does not open
    and close a connection per request (PostgreSQL forks a backend for each). Mind PostgreSQL's max_connections
    (100 by default) x API processes."""
    database_max_overflow: int = 10
    """Connections a process may open past database_pool_size (closed again when returned)."""
    sse_keepalive_s: float = 15.0
    """An event stream sends a keep-alive comment after this long without events."""
    sse_max_seconds: float = 3600.0
    """An event stream ends after this long (the client reconnects with Last-Event-ID)."""
    model_cache_size: int = 8
    """Finished models kept loaded in memory for /predict."""
    model_cache_bytes: int | None = 2048 * MiB
    """Bytes of weights (parameters and buffers) of the models kept loaded for /predict and completions;
    least recently used evicted first (model_cache_size bounds their count too). The model just loaded
    stays even if it alone is larger."""
    predict_max_batch: int = 64
    """/predict: concurrent requests for one model are run as one forward of at most this many rows
    (1 = no micro-batching; a larger request runs alone)."""
    predict_max_wait_ms: float = 2.0
    """/predict: how long a batch waits for more requests when it has fewer than predict_max_batch rows."""
    predict_max_queue: int = 1024
    """/predict: requests waiting for a batch in one API process; past it, 503 with Retry-After."""
    predict_torch_threads: int | None = 1
    """/predict: torch intra-op threads of each forward (set in the batcher's own threads only; unset: torch's
    default). One: a small model's forward on several threads spends more on waking them than it saves, badly so
    on a busy machine (an 8->16->3 MLP on 2 busy cores: 12 ms for 8 rows on 2 threads, 0.2 ms on one)."""
    max_predict_inputs: int = 10_000
    auth_cache_s: float = 5.0
    """Seconds an API process keeps a valid key's tenant in memory (0 = look it up on every request). A revoke
    by the admin CLI or any process sharing the artifacts folder is seen at the next request (a marker file);
    by a process on another machine with its own artifacts folder, within this long."""
    file_cache_s: float = 5.0
    """Seconds an API process keeps what a submit checks of an uploaded file (its purpose, kind, details and
    storage key: fixed at upload) in memory (0 = read it on every submit). A delete by any process sharing the
    artifacts folder is seen at the next submit (a marker file); by a process on another machine, within this long
    (a job submitted in between fails when its worker finds the file gone)."""
    served_model_cache_s: float = 5.0
    """Seconds an API process keeps a (tenant, model id) -> model record answer for /predict (0 = off). A deleted
    model is never served: each batch checks that its weights are still in storage."""
    generate_max_batch: int = 32
    """Completions: the sequences (prompts x n) of concurrent requests for one model are generated together, as one
    batch of at most this many rows with one KV cache (1 = one sequence at a time)."""
    generate_max_wait_ms: float = 5.0
    """Completions: how long a batch waits for more sequences when it has fewer than generate_max_batch."""
    generate_max_queue: int = 512
    """Completions: sequences waiting for a batch in one API process; past it, 503 with Retry-After."""
    generate_torch_threads: int | None = 1
    """Completions: torch intra-op threads of the generation threads (unset: torch's default). One, as for /predict:
    a small model's decode step on 2 busy cores took 10x longer on two threads than on one (threads waiting for
    each other at every operation)."""
    tenant_max_running_jobs: int = 8
    """A tenant with this many queued + running jobs gets 429 on the next submit."""
    submit_max_batch: int = 64
    """Job submits of one tenant arriving together in one API process are written, counted against the quota and
    committed as one transaction of at most this many (1 = one transaction per submit); nothing waits to fill one."""
    submit_max_pending: int = 1024
    """Checked submits waiting for their batch in one API process; past it, 503 with Retry-After."""
    tenant_max_storage_bytes: int = 50 * 1024 * MiB
    """An upload that would take a tenant's stored files (sum of their bytes) past this gets 413."""
    teacher_cache_bytes: int = 20 * 1024 * MiB
    """Workers keep causal-LM top-k teacher signals under <work root>/teacher-signals, shared across jobs
    (distill/teacher_cache.py), least recently used evicted past this many bytes; 0 = off (every job runs
    its teacher)."""
    webhooks_allow_private: bool = False
    """Let webhook URLs reach private, loopback, link-local and reserved addresses (DISTILL_WEBHOOKS_ALLOW_PRIVATE=1:
    tests, or receivers inside your own network). Off: such URLs are refused, at registration and again at
    every delivery (a name that re-resolves to an internal address is not contacted)."""
    webhook_timeout_s: float = 10.0
    """One delivery attempt (connect + send + response) gives up after this."""
    webhook_retry_base_s: float = 5.0
    """First retry delay; later ones are 6, 24, 120, 360, 720, 1440 and 2880 times it (5 s, 30 s, 2 min, 10 min,
    30 min, 1 h, 2 h, 4 h, then every 4 h). Retries are published by the reconciler, so they come at most every
    DISTILL_RECONCILE_INTERVAL_S."""
    webhook_retry_window_s: float = 86_400.0
    """A delivery not answered with a 2xx this long after its event is given up (marked failed)."""
    webhook_queue: str | None = None
    """Celery queue for webhook deliveries; unset: the jobs queue. A worker runs one task at a time, so with
    every worker busy on a long job deliveries wait: route them to a queue a light worker consumes
    (e.g. ``celery -A worker.celery_app worker -Q distill-webhooks --pool=threads``)."""

    @property
    def broker_dir(self) -> Path:
        return self.artifacts_dir.parent / "broker"

    max_dataset_columns: int = 65_536
    """Most columns a CSV dataset's header may have (label included), and most features on a JSONL line;
    checked on the header before any row is parsed. The engine takes at most 65,536 features."""

    @property
    def extracted_bytes_limit(self) -> int:
        """``max_extracted_bytes``, or 4 x ``max_upload_bytes`` when it is not set."""
        return self.max_extracted_bytes if self.max_extracted_bytes is not None else 4 * self.max_upload_bytes


@lru_cache
def get_settings() -> Settings:
    return Settings()

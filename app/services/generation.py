"""Batched text generation: concurrent completion requests for one model share one decode loop.

Every generated sequence is a *row*: a prompt (token ids) with its own sampling settings
(``max_tokens``, ``temperature`` / ``top_p`` or greedy, ``seed``, how many log-probabilities to
report). Rows are queued per served model (its id + weights' sha256: different models never share a
batch). A model's worker thread takes the queued rows, waits for more while fewer than ``max_batch``
are waiting until the oldest has waited ``max_wait_s``, and decodes them as one batch:

- **prefill**: the prompts left-padded to the longest, one forward with the attention mask and
  position ids counted from each row's first real token (``mask.cumsum - 1``), so a padded row sees
  the same positions as alone, filling one KV cache;
- **decode**: one forward of one token per row per step on that cache (the mask grows by a column of
  ones, each row's position by one);
- **per row**: the next token is the argmax (greedy) or a sample from the row's own
  ``torch.Generator`` (temperature, then top-p, as ``generate`` does), so a seeded row draws the same
  numbers whatever else shares its batch: a seeded request gives the same text batched or alone. Each
  token goes to the row's own queue as it is chosen (streaming needs nothing more), with its
  log-probability and the top ones when asked: ``log_softmax`` of the raw logits, before
  temperature and top-p. A row ends at EOS, at its ``max_tokens``, or when its reader cancels it (a stop
  sequence matched, the client left); ended rows leave the batch (their cache rows are dropped), so
  they cost nothing afterwards.

Batches are continuous: between two decode steps, rows that arrived meanwhile take the free slots
(up to ``max_batch`` rows in all). They are prefilled on their own, then join the running batch: the
shorter of the two caches (and masks) is left-padded with masked-out columns, and the leading columns
no remaining row attends to are cut when rows leave. Positions are counted per row, so padding never
moves a row's positions. This needs the cache's per-layer key/value tensors (transformers 5's
``DynamicCache`` of full-attention layers); with any other cache (sliding windows, older versions) a
batch runs to its end and rows queued meanwhile form the next one (they have waited already, so it
starts at once).

A model's worker thread sets torch's intra-op threads (``torch_threads``, DISTILL_GENERATE_TORCH_THREADS,
default 1): a decode step is many small operations, and on a busy CPU two threads waiting for each other
at every one of them made a step about 10x slower than one thread did.

The queue is bounded: past ``max_queue`` waiting rows a request is refused with 503 and
``Retry-After`` (the service is overloaded, not the client over a quota: not 429). A request with
more rows than that is still taken when nothing is waiting, so it can always run.

Greedy rows decoded batched equal the same rows decoded alone up to float rounding: the padded
positions get no attention weight, but matrix products of other shapes may round differently in the
last bits, which can only flip a near-tie between two tokens.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import get_settings
from ..errors import Unavailable

__all__ = ["GenerationBatcher", "RowSpec", "Row", "ServedLM", "Step", "decode", "generation_batcher"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSpec:
    """One sequence to generate."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    """0: greedy (argmax); else the logits are divided by it before sampling."""
    top_p: float = 1.0
    seed: int | None = None
    """Seeds the row's own generator (sampling only); None: a fresh random seed."""
    top_logprobs: int | None = None
    """None: no log-probabilities; k >= 0: the chosen token's and the k most likely tokens' per step."""


@dataclass(frozen=True)
class Step:
    """One generated token, with its log-probability and the ``top_logprobs`` most likely (token id,
    log-probability) pairs when the row asked for them (else None)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


_END = object()


class Row:
    """A queued or running row: the decode loop puts its steps in a queue, its reader takes them."""

    def __init__(self, spec: RowSpec):
        self.spec = spec
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self.arrived = time.monotonic()

    def steps(self) -> Iterator[Step]:
        """The row's steps as they are generated; ends when the row does; raises the decode loop's error."""
        while (item := self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Stop generating this row (its reader wants no more); the steps already queued stay readable."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # the decode loop's side
    def _put(self, step: Step) -> None:
        self._queue.put(step)

    def _end(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._queue.put(error)
        self._queue.put(_END)


@dataclass
class ServedLM:
    """What the decode loop needs of a loaded causal LM. ``lock`` is the model cache entry's: the
    model runs one batch at a time."""

    key: str
    model: torch.nn.Module
    eos_token_id: int | None
    pad_token_id: int | None
    lock: threading.Lock


# ---- the decode loop ---------------------------------------------------------------------------------------

def _forward_options(model: torch.nn.Module) -> tuple[str, dict]:
    """(the forward's KV-cache keyword, extra keywords): the cache is ``cache`` in transformers 5,
    ``past_key_values`` before; ``logits_to_keep=1`` (where taken) spares the prefill (B, T, V) logits."""
    parameters = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values",
            {"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


def _generator(spec: RowSpec, device: torch.device) -> torch.Generator | None:
    if spec.temperature <= 0:
        return None
    generator = torch.Generator(device=device)
    if spec.seed is None:
        generator.seed()  # non-deterministic
    else:
        generator.manual_seed(spec.seed)
    return generator


def _sample(logits: torch.Tensor, spec: RowSpec, generator: torch.Generator) -> int:
    """A token from one row's logits (V,): temperature, then top-p (keep the smallest set of most likely
    tokens whose probability reaches top_p, at least one), as transformers' warpers do."""
    scores = logits / spec.temperature
    if spec.top_p < 1.0:
        sorted_scores, order = torch.sort(scores)  # ascending
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - spec.top_p
        remove[-1] = False
        scores = scores.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator).item())


def _choose(logits: torch.Tensor, specs: list[RowSpec], generators: list) -> list[int]:
    """Next token per row from the last position's logits (B, V) (float32)."""
    tokens = logits.argmax(-1).tolist()
    for b, (spec, generator) in enumerate(zip(specs, generators)):
        if generator is not None:
            tokens[b] = _sample(logits[b], spec, generator)
    return tokens


def _steps(logits: torch.Tensor, specs: list[RowSpec], tokens: list[int]) -> list[Step]:
    if all(spec.top_logprobs is None for spec in specs):
        return [Step(token) for token in tokens]
    logprobs = torch.log_softmax(logits, dim=-1)  # (B, V): the model's own distribution
    steps = []
    for b, (spec, token) in enumerate(zip(specs, tokens)):
        if spec.top_logprobs is None:
            steps.append(Step(token))
            continue
        top = []
        if spec.top_logprobs:
            best = torch.topk(logprobs[b], min(spec.top_logprobs, logprobs.shape[-1]))
            top = list(zip(best.indices.tolist(), best.values.tolist()))
        steps.append(Step(token, logprobs[b, token].item(), top))
    return steps


def _left_padded(prompts: list[list[int]], fill: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), both (B, T): each prompt right-aligned after ``fill`` padding."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), fill, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[b, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def _left_pad(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    if columns == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class _Batch:
    """Rows being decoded together: their KV cache (T cached positions), the attention mask (B, T + 1)
    over the cache and the token each row feeds next, that token (B, 1) and its position (B, 1)."""

    def __init__(self, model: torch.nn.Module, rows: list[Row], eos_token_id: int | None, fill: int):
        """Prefill ``rows`` (left-padded) and choose each one's first token."""
        self.model, self.rows, self.eos_token_id = model, rows, eos_token_id
        device = next(model.parameters()).device
        self.cache_argument, self.extra = _forward_options(model)
        self.generators = [_generator(row.spec, device) for row in rows]
        self.produced = [0] * len(rows)
        input_ids, self.mask = _left_padded([row.spec.prompt_ids for row in rows], fill, device)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0 at each row's first real token
        self.positions = positions[:, -1:]
        self._advance(self._forward(input_ids, positions, None))

    def __len__(self) -> int:
        return len(self.rows)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        output = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                            **{self.cache_argument: cache}, **self.extra)
        self.cache = output.get("cache") if "cache" in output else output.get("past_key_values")
        return output.logits[:, -1, :].float()  # (B, V)

    def step(self) -> None:
        """One token for every row; rows that end leave the batch."""
        self._advance(self._forward(self.next_ids, self.positions, self.cache))

    def _advance(self, logits: torch.Tensor) -> None:
        specs = [row.spec for row in self.rows]
        tokens = _choose(logits, specs, self.generators)
        keep = []
        for b, (row, step) in enumerate(zip(self.rows, _steps(logits, specs, tokens))):
            row._put(step)
            self.produced[b] += 1
            if step.token == self.eos_token_id or self.produced[b] >= row.spec.max_tokens or row.cancelled:
                row._end()
            else:
                keep.append(b)
        next_ids = torch.tensor(tokens, dtype=torch.long, device=self.mask.device).unsqueeze(-1)
        if len(keep) < len(self.rows):  # ended rows leave the batch, and the cache
            self.rows = [self.rows[b] for b in keep]
            self.generators = [self.generators[b] for b in keep]
            self.produced = [self.produced[b] for b in keep]
            if not keep:
                return
            index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.positions, next_ids = self.mask[index], self.positions[index], next_ids[index]
            self._trim()
        self.next_ids, self.positions = next_ids, self.positions + 1
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(keep), 1))], dim=-1)

    def _layers(self) -> list | None:
        """The cache's per-layer tensors when they can be cut and joined (plain full-attention layers of
        transformers 5's DynamicCache); None otherwise (sliding windows, other caches): no joining then."""
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:
            return None
        layers = getattr(self.cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer or layer.keys is None for layer in layers):
            return None
        return layers

    def _trim(self) -> None:
        """Drop the leading cache columns no remaining row attends to (the padding of rows that left)."""
        layers = self._layers()
        if layers is None:
            return
        unused = int(self.mask.any(0).int().argmax())  # the first column some row attends to
        if unused:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
            self.mask = self.mask[:, unused:]

    @property
    def joinable(self) -> bool:
        return self._layers() is not None

    def join(self, other: "_Batch") -> None:
        """Take ``other``'s rows into this batch: the shorter cache and mask are left-padded (masked out)."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        pad_self, pad_other = width - self.mask.shape[1], width - other.mask.shape[1]
        for mine, theirs in zip(self._layers(), other._layers()):
            mine.keys = torch.cat([_left_pad(mine.keys, pad_self, 2), _left_pad(theirs.keys, pad_other, 2)])
            mine.values = torch.cat([_left_pad(mine.values, pad_self, 2), _left_pad(theirs.values, pad_other, 2)])
        self.mask = torch.cat([_left_pad(self.mask, pad_self, 1), _left_pad(other.mask, pad_other, 1)])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.positions = torch.cat([self.positions, other.positions])
        self.rows, self.generators = self.rows + other.rows, self.generators + other.generators
        self.produced = self.produced + other.produced


@torch.no_grad()
def decode(model: torch.nn.Module, rows: list[Row], eos_token_id: int | None, pad_token_id: int | None,
           admit: Callable[[int], list[Row]] | None = None) -> None:
    """Generate every row's tokens as one batch (see the module docstring), handing each step to its row
    and ending each row. Between steps ``admit(rows running)`` may hand over more rows: they are
    prefilled on their own and join the running batch (continuous batching). Raises on a failed forward
    (the caller ends the rows with the error)."""
    fill = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    batch = _Batch(model, rows, eos_token_id, fill)
    while True:
        if batch is not None and len(batch):
            batch.step()
        more = admit(len(batch) if batch is not None else 0) if admit and (batch is None or batch.joinable) else []
        if more:
            new = _Batch(model, more, eos_token_id, fill)
            if batch is None or not len(batch):
                batch = new
            elif len(new):
                batch.join(new)
        elif batch is None or not len(batch):
            return


# ---- the batcher ---------------------------------------------------------------------------------------------

@dataclass
class _Waiting:
    lm: ServedLM
    row: Row


@dataclass
class _ModelQueue:
    items: deque = field(default_factory=deque)
    worker: threading.Thread | None = None


class GenerationBatcher:
    """Per-model queues of rows and one decode thread per model with rows waiting (see the module docstring)."""

    def __init__(self, max_batch: int, max_wait_s: float, max_queue: int, torch_threads: int | None = None):
        self.max_batch, self.max_wait_s, self.max_queue = max(1, max_batch), max(0.0, max_wait_s), max_queue
        self.torch_threads = torch_threads
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._queues: dict[str, _ModelQueue] = {}
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Rows queued and not yet in a batch."""
        with self._lock:
            return self._waiting

    def submit(self, lm: ServedLM, specs: list[RowSpec]) -> list[Row]:
        """Queue the rows of one request; read each with ``Row.steps()``."""
        rows = [Row(spec) for spec in specs]
        with self._lock:
            if self._waiting and self._waiting + len(rows) > self.max_queue:
                raise Unavailable(f"the generation queue is full ({self._waiting} sequences waiting, at most "
                                  f"{self.max_queue}); retry shortly", headers={"Retry-After": "1"})
            model_queue = self._queues.setdefault(lm.key, _ModelQueue())
            model_queue.items.extend(_Waiting(lm, row) for row in rows)
            self._waiting += len(rows)
            if model_queue.worker is None:
                model_queue.worker = threading.Thread(target=self._work, args=(lm.key, model_queue),
                                                      name=f"generate-{lm.key[:30]}", daemon=True)
                model_queue.worker.start()
            self._arrived.notify_all()
        return rows

    def _next_batch(self, key: str, model_queue: _ModelQueue) -> list[_Waiting]:
        """The next batch of this model's rows (waiting up to max_wait_s for it to fill); [] when none is
        left, in which case the queue is removed (a later submit starts a new worker)."""
        with self._lock:
            items = model_queue.items
            if items and len(items) < self.max_batch and self.max_wait_s > 0:
                deadline = items[0].row.arrived + self.max_wait_s  # rows queued during the last batch go at once
                while len(items) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                    self._arrived.wait(left)
            batch = [items.popleft() for _ in range(min(self.max_batch, len(items)))]
            self._waiting -= len(batch)
            if not batch:
                del self._queues[key]
            return batch

    def _admit(self, model_queue: _ModelQueue, running: int) -> list[Row]:
        """Rows already waiting for this model, as many as fit beside ``running`` rows (no waiting here)."""
        with self._lock:
            taken = [model_queue.items.popleft().row for _ in range(min(self.max_batch - running,
                                                                         len(model_queue.items)))]
            self._waiting -= len(taken)
        for row in taken:
            if row.cancelled:
                row._end()
        return [row for row in taken if not row.cancelled]

    def _work(self, key: str, model_queue: _ModelQueue) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        while batch := self._next_batch(key, model_queue):
            for waiting in batch:
                if waiting.row.cancelled:
                    waiting.row._end()
            rows = [w.row for w in batch if not w.row.cancelled]
            if not rows:
                continue
            lm, started = batch[0].lm, list(rows)

            def admit(running: int) -> list[Row]:
                more = self._admit(model_queue, running)
                started.extend(more)
                return more

            try:
                with lm.lock:
                    decode(lm.model, rows, lm.eos_token_id, lm.pad_token_id, admit)
            except BaseException as error:  # noqa: BLE001 - every row's reader must hear of it
                log.exception("batched generation failed")
                for row in started:
                    row._end(error)  # a row that had ended already has been read to its end: harmless


_batcher: GenerationBatcher | None = None
_batcher_lock = threading.Lock()


def generation_batcher() -> GenerationBatcher:
    """The process's batcher, set by DISTILL_GENERATE_MAX_BATCH / _MAX_WAIT_MS / _MAX_QUEUE / _TORCH_THREADS."""
    global _batcher
    with _batcher_lock:
        if _batcher is None:
            settings = get_settings()
            _batcher = GenerationBatcher(settings.generate_max_batch, settings.generate_max_wait_ms / 1000,
                                         settings.generate_max_queue, settings.generate_torch_threads)
        return _batcher

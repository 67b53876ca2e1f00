"""A teacher-signal store shared across jobs: the top-k signal of a causal-LM token job,
computed once per (teacher, tokenized data, k, temperature, vocabulary) and reused.

Key (content address): sha256 over
    the teachers' weights   sha256 of each teacher directory's weight files (*.safetensors,
                            *.bin) and config.json, hashed in chunks once and memoized by
                            (path, size, mtime) in-process and in a sidecar beside the entries;
                            several teachers: each one's hash with its mixture weight
    the tokenized data      sha256 of input_ids, attention_mask and loss_mask (dtype, shape,
                            bytes): this captures the data, tokenizer, max_length and packing
    k, temperature, the shared vocabulary size, the teacher's dtype and FORMAT_VERSION.
    (Not the device: a signal made by a GPU worker is reused by a CPU worker and vice versa,
    although the two teachers' float32 outputs may differ in the last bits.)

Value: the :class:`~distill.losses.TopKSignal`, compressed, as ``<root>/teacher-signals/<key>.safetensors``
(never pickle; written to a temporary file and renamed, so a reader never sees half a file)
with the key's inputs in its metadata:

    top    (N, L)        float32  the top-1 log-probability (exact)
    scale  (N, L)        float32  d_max: the largest quantized gap below the top-1, ≤ GAP_CAP
    codes  (N, L, k)     uint8    gap d_i = top − logprob_i ≥ 0, companded:
                                  code = round(254 · sqrt(d_i / d_max)), 255 = "below top − GAP_CAP"
    ids    (N, L, k, w)  uint8    token ids, little-endian in w = 1, 2, 3 or 4 bytes (the smallest
                                  that holds the vocabulary: w = 2 for V ≤ 65536)
    tail   (N, L)        float32  log of the tail mass (exact)

so k · (1 + w) + 12 bytes per token position: 140 at k = 64 for V ≤ 256, 204 for V ≤ 65536,
268 for V ≤ 2^24 (the uncompressed float32/int32 signal: 8k + 4 = 516). The square-root
companding spends the 254 levels where the probability mass is (small gaps): with δ = 1/508
the error on a probability is ≤ p_top · (2·sqrt(d_max)·δ·max_d sqrt(d)e^{−d} + d_max·δ²)
≈ 0.011 · p_top at d_max = GAP_CAP = 40; measured on GPT-2-like teachers it is far smaller
(see ``benchmarks/bench_teacher_cache.py``). Gaps beyond GAP_CAP nats (p < p_top · 4e-18)
decode to ``LOG_PROB_FLOOR`` (probability 0), as masked vocabulary entries already are.

The stored signal is an approximation of the fresh one, so a job that uses the cache trains
from the DECODED signal on a miss too (compute → encode → store → decode → train): the first
job and every later job that hits train from the same tensors, bit for bit. With no cache
(budget 0 or None) the fresh float32 signal is used as before.

LRU with a byte budget: ``put`` evicts the least recently used entries (oldest mtime) until the
new one fits; ``get`` touches its entry. A signal bigger than the whole budget is not stored.
Several workers may share one root: a vanished or unreadable entry is a miss, never an error.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .losses import TopKSignal
from .losses.token import LOG_PROB_FLOOR

__all__ = ["TeacherCache", "encode_signal", "decode_signal", "encoded_bytes_per_token", "id_width",
           "data_hash", "weights_hash", "FORMAT_VERSION", "GAP_CAP"]

FORMAT_VERSION = 1
GAP_CAP = 40.0  # nats below the top-1; deeper entries decode to probability 0
_LEVELS = 254  # codes 0..254 carry a gap; 255 marks "deeper than GAP_CAP"
_FLOOR_CODE = 255
_HASH_CHUNK = 16 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SUBDIR = "teacher-signals"
_SIDECAR = "weight-hashes.json"
_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def id_width(vocab: int) -> int:
    """Bytes per token id: the smallest of 1, 2, 3, 4 that holds ids < vocab."""
    for width in (1, 2, 3):
        if vocab <= 1 << (8 * width):
            return width
    return 4


def encoded_bytes_per_token(k: int, vocab: int) -> int:
    return k * (1 + id_width(vocab)) + 12


def encode_signal(signal: TopKSignal, vocab: int) -> dict[str, torch.Tensor]:
    """The stored tensors of a top-k signal whose log-probabilities are sorted, most likely first."""
    logprobs = signal.logprobs.float()
    top = logprobs[..., 0].contiguous()
    gap = (top.unsqueeze(-1) - logprobs).clamp_min(0)
    deep = gap > GAP_CAP
    scale = gap.masked_fill(deep, 0).amax(-1)  # (N, L), ≤ GAP_CAP
    unit = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    codes = torch.round(torch.sqrt(gap.masked_fill(deep, 0) / unit) * _LEVELS).clamp_(0, _LEVELS).to(torch.uint8)
    codes[deep] = _FLOOR_CODE
    width = id_width(vocab)
    ids = signal.indices.to(torch.int64)
    planes = torch.stack([(ids >> (8 * j)) & 255 for j in range(width)], dim=-1).to(torch.uint8)
    out = {"top": top, "scale": scale.contiguous(), "codes": codes.contiguous(), "ids": planes.contiguous()}
    if signal.tail_logprob is not None:
        out["tail"] = signal.tail_logprob.float().contiguous()
    return out


def decode_signal(tensors: dict[str, torch.Tensor]) -> TopKSignal:
    """The float32 log-probabilities / int32 ids / float32 tail signal the stored tensors stand for."""
    codes, planes = tensors["codes"], tensors["ids"]
    fraction = codes.float() / _LEVELS
    logprobs = tensors["top"].unsqueeze(-1) - tensors["scale"].unsqueeze(-1) * fraction * fraction
    logprobs = logprobs.masked_fill(codes == _FLOOR_CODE, LOG_PROB_FLOOR)
    ids = torch.zeros(planes.shape[:-1], dtype=torch.int64)
    for j in range(planes.shape[-1]):
        ids |= planes[..., j].to(torch.int64) << (8 * j)
    return TopKSignal(logprobs=logprobs.contiguous(), indices=ids.to(torch.int32), tail_logprob=tensors.get("tail"))


def data_hash(tokens: dict) -> str:
    """sha256 of the tokenized data: input_ids, attention_mask, loss_mask (dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name in ("input_ids", "attention_mask", "loss_mask"):
        tensor = tokens[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy() if tensor.dtype != torch.bool
                      else tensor.to(torch.uint8).numpy())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def weights_hash(model_dir: str | Path, sidecar: Path | None = None) -> str:
    """sha256 over a model directory's weight files and config.json (name + content hash each).
    Each file's hash is memoized by (path, size, mtime): in-process, and in ``sidecar`` when given."""
    folder = Path(model_dir).resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and (p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json"))
    stored = {}
    if sidecar is not None:
        try:
            stored = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            stored = {}
    digest, added = hashlib.sha256(), False
    for path in files:
        info = path.stat()
        memo_key = (str(path), info.st_size, info.st_mtime_ns)
        text_key = f"{memo_key[0]}|{memo_key[1]}|{memo_key[2]}"
        with _memo_lock:
            value = _memo.get(memo_key) or stored.get(text_key)
        if value is None:
            value, added = _file_hash(path), True
            stored[text_key] = value
        with _memo_lock:
            _memo[memo_key] = value
        digest.update(f"{path.relative_to(folder)}:{value};".encode())
    if added and sidecar is not None:
        alive = {key: value for key, value in stored.items() if Path(key.rsplit("|", 2)[0]).exists()}
        _write_atomic_text(sidecar, json.dumps(alive))
    return digest.hexdigest()


def _write_atomic_text(path: Path, text: str) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # the memo is an optimisation only


@dataclass
class CacheEntry:
    signal: TopKSignal
    stored_bytes: int


class TeacherCache:
    """Top-k teacher signals under ``<root>/teacher-signals/``, at most ``max_bytes`` in all
    (None or 0: off — :attr:`enabled` is False and the recipe computes the signal as before)."""

    def __init__(self, root: str | Path, max_bytes: int | None):
        self.root = Path(root) / _SUBDIR
        self.max_bytes = int(max_bytes or 0)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def key(self, teachers: list[tuple[str | Path, float]], tokens: dict, k: int, temperature: float,
            vocab: int, teacher_dtype: str = "torch.float32") -> tuple[str, dict]:
        """(the content address, its inputs as strings). ``teachers``: (model dir, mixture weight);
        ``teacher_dtype``: the dtype the teacher runs in (its weights' hash is of the files)."""
        self.root.mkdir(parents=True, exist_ok=True)
        sidecar = self.root / _SIDECAR
        inputs = {"format": str(FORMAT_VERSION),
                  "teachers": json.dumps([[weights_hash(path, sidecar), float(weight)] for path, weight in teachers]),
                  "data": data_hash(tokens), "k": str(int(k)), "temperature": repr(float(temperature)),
                  "vocab": str(int(vocab)), "teacher_dtype": str(teacher_dtype)}
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        return key, inputs

    def get(self, key: str) -> CacheEntry | None:
        """The decoded signal stored under ``key`` (touching it), or None."""
        if not self.enabled:
            return None
        from safetensors.torch import load_file

        path = self.path(key)
        try:
            tensors = load_file(str(path))
            now = time.time_ns()
            os.utime(path, ns=(now, now))
            return CacheEntry(decode_signal(tensors), path.stat().st_size)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a damaged entry is a miss; drop it so it is rewritten
            path.unlink(missing_ok=True)
            return None

    def entries(self) -> list[tuple[int, str, int, Path]]:
        """(mtime_ns, name, size, path) of every stored signal, least recently used first."""
        rows = []
        for path in self.root.glob("*.safetensors"):
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            rows.append((info.st_mtime_ns, path.name, info.st_size, path))
        return sorted(rows)

    def put(self, key: str, tensors: dict[str, torch.Tensor], inputs: dict) -> int | None:
        """Store encoded tensors under ``key``, evicting least recently used entries until the
        total fits the budget. The stored size in bytes, or None when not stored (too big, off)."""
        if not self.enabled:
            return None
        from safetensors.torch import save_file

        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".part")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={k: str(v) for k, v in inputs.items()})
            size = os.path.getsize(tmp)
            if size > self.max_bytes:
                return None
            target = self.path(key)
            others = [row for row in self.entries() if row[3] != target]
            total = sum(row[2] for row in others)
            for _, _, row_size, row_path in others:
                if total + size <= self.max_bytes:
                    break
                row_path.unlink(missing_ok=True)
                total -= row_size
            os.replace(tmp, target)
            now = time.time_ns()
            os.utime(target, ns=(now, now))
            return size
        finally:
            Path(tmp).unlink(missing_ok=True)

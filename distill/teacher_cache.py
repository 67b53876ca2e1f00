"""A teacher-signal store shared across jobs: a causal-LM job's teacher signal, computed once per
(teacher, tokenized data, k, temperature, vocabulary) and reused, in one of two forms:

* the top-k signal (:class:`~distill.losses.TopKSignal`), compressed: :func:`encode_signal`,
  :meth:`TeacherCache.put`, :meth:`TeacherCache.get`;
* the full-vocabulary logits (``k=None`` in the key), raw float16: :meth:`TeacherCache.open_full`
  → :class:`FullLogitsWriter` → :class:`FullLogits`, :meth:`TeacherCache.get_full`.

Both live under ``<root>/teacher-signals/`` and share one least-recently-used byte budget.

Key (content address): sha256 over
    the teachers' weights   sha256 of each teacher directory's weight files (*.safetensors,
                            *.bin) and config.json, hashed in chunks once and memoized by
                            (path, size, mtime) in-process and in a sidecar beside the entries;
                            several teachers: each one's hash with its mixture weight
    the tokenized data      sha256 of input_ids, attention_mask and loss_mask (dtype, shape,
                            bytes): this captures the data, tokenizer, max_length and packing
    k ("full" for the full vocabulary), temperature, the shared vocabulary size, the teacher's
    dtype and FORMAT_VERSION.
    (Not the device: a signal made by a GPU worker is reused by a CPU worker and vice versa,
    although the two teachers' float32 outputs may differ in the last bits.)

Top-k value: ``<root>/teacher-signals/<key>.safetensors`` (never pickle; written to a temporary
file and renamed, so a reader never sees half a file), the key's inputs in its metadata. For P
token positions and k entries each, the entries of a position are stored in ASCENDING TOKEN-ID
order (which makes the ids cheap) and the values follow the ids:

    top     (P,)   float32  the top-1 log-probability (exact)
    tail    (P,)   float32  log of the tail mass (exact; absent if the signal had none)
    scale   (P,)   float16  d_max: the largest gap top − logprob_i ≤ GAP_CAP at the position
    ids     Rice-coded gaps between consecutive sorted ids (the first id is its own gap):
            ``ids_low`` the b low bits of every gap (b // 8 byte planes, then one packed bit plane
            per remaining bit), ``ids_high`` the quotient gap >> b in unary (q zeros, then a one),
            all positions in one bit stream; b is chosen per stored signal to minimise its size
    values  c_i = round(L · sqrt(d_i / d_max)) ∈ [0, L] (square-root companding, L levels), stored
            as r_i = L − c_i (small for the many deep entries), L + 1 meaning "below top − GAP_CAP";
            Rice-coded the same way (``values_low``, ``values_high``)
    layout  int64 [FORMAT_VERSION, k, vocab, L, b_ids, b_values, P]; ``shape`` the leading shape

Encoding and decoding are vectorised (numpy's packbits/unpackbits, flatnonzero, cumsum, take),
block by block of about a million entries: no Python loop over positions or entries. The decoded
signal keeps each position's entries in ascending id order (the losses sum over the entries and do
not depend on their order), with float32 log-probabilities, int32 ids and the exact tail.

Size (rate control). The ids cost what the data makes them cost: sorted gaps of k ids out of V
with the best Rice parameter b take at most k·(b + 1) + (V − k) >> b bits, b = ⌊log2(V / k)⌋, i.e.
≤ 96 bytes at k = 64 for any V ≤ 65536 (~92 when the top-k ids are spread uniformly, as a random
teacher's are; fewer when they cluster, as a real LM's frequent tokens do), ≤ 106 for V ≤ 151936,
≤ 112 for V ≤ 262144 (ids must be < MAX_VOCAB = 2^24). The values get what is left of a target of
``target_bytes_per_token(k) = 10 + ⌈k · 17.5 / 8⌉`` bytes (150 at k = 64): the encoder takes the
finest L of ``LEVEL_LADDER`` (254 down to 8, steps of 2^¼) whose Rice-coded values fit. At L = 8 the
values cost ≤ 5 bits an entry whatever the data, so for V ≤ 65536 at k = 64 an entry is at most
10 + 96 + 40 = 146 bytes per token (plus ~0.6 KiB of file header): the 150 goal holds for every
input, the precision is what gives way. For larger V a pathological input can exceed it by the
ids' excess (V = 151936: ≤ 155.3, V = 262144: ≤ 162); measured on random and Zipfian logits at
V = 151936 the encoder still meets 150 (by coarser values for the random ones).
:func:`bytes_per_token_bound` states the bound for any (k, V), :func:`stored_levels` the L taken.

Error. With L levels over d_max the error on a stored probability is at most
p_top · :func:`prob_error_bound` (L), to first order p_top · (2·sqrt(d_max)·δ·max_d sqrt(d)e^{−d} +
d_max·δ²), δ = 1/(2L): ≈ 0.011 · p_top at L = 254 and d_max = GAP_CAP = 40 (the format-1 precision), 0.018 at L = 151;
measured errors are far smaller (``benchmarks/bench_teacher_cache.py`` prints max and mean |p − p̂|
and KL(fresh ‖ decoded) for a random GPT-2 teacher and a Zipfian realistic one). The top-1
log-probability and the tail are exact; ids are exact. Gaps beyond GAP_CAP nats (p < p_top · 4e-18)
decode to ``LOG_PROB_FLOOR`` (probability 0), as masked vocabulary entries already are.

The stored signal is an approximation of the fresh one, so a job that uses the cache trains
from the DECODED signal on a miss too (compute → encode → store → decode → train): encoding is
deterministic and decoding is a pure function of the stored tensors, so the first job and every
later job that hits train from the same tensors, bit for bit. With no cache (budget 0 or None)
the fresh float32 signal is used as before.

Full-vocabulary value: ``<root>/teacher-signals/<key>.f16``, one file: a 16-byte preamble
(magic, header length), a JSON header (shape (N, L, V), dtype, byte order, format, the key's
inputs) padded to 4096 bytes, then the teacher's logits (NOT divided by the temperature: the
consumer uses them as it would fresh logits) as raw little-endian float16, N·L·V·2 bytes, row-major.
Raw, not safetensors: safetensors' loaders mmap or read the whole file, and a full-vocabulary
signal is far bigger than a batch (e.g. 4096 rows × 512 × 50257 × 2 bytes = 211 GB); here a batch's
rows are read with ``os.preadv`` into a fresh tensor, so the process's memory holds one batch, not
the file (the pages sit in the kernel's page cache, reclaimable, not in the worker's RSS). A writer
fills a temporary file with ``os.pwrite`` (rows in any order, e.g. as teacher batches finish),
fsyncs it and renames it into place on commit, so a reader sees the whole entry or none; an
aborted or garbage-collected writer removes its temporary file.

LRU with a byte budget: ``put`` and ``open_full`` evict the least recently used entries of either
kind (oldest mtime) until the new one fits; ``get`` and ``get_full`` touch their entry. A signal
bigger than the whole budget is not stored. Several workers may share one root: a vanished or
unreadable entry is a miss, never an error (a reader that holds a FullLogits keeps its open file
even if another worker evicts the entry meanwhile).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .losses import TopKSignal
from .losses.token import LOG_PROB_FLOOR

__all__ = ["TeacherCache", "CacheEntry", "FullLogits", "FullLogitsWriter", "encode_signal", "decode_signal",
           "target_bytes_per_token", "bytes_per_token_bound", "prob_error_bound", "data_hash", "weights_hash",
           "stored_levels", "FORMAT_VERSION", "GAP_CAP", "LEVEL_LADDER", "MAX_LEVELS", "MIN_LEVELS", "MAX_VOCAB"]

FORMAT_VERSION = 2
GAP_CAP = 40.0  # nats below the top-1; deeper entries decode to probability 0
MAX_LEVELS = 254  # the finest value quantization (format 1's)
MIN_LEVELS = 8  # the coarsest: ≤ 5 bits an entry whatever the data
MAX_VOCAB = 1 << 24  # token ids the top-k format takes
LEVEL_LADDER = tuple(sorted({max(MIN_LEVELS, round(MAX_LEVELS * 2 ** (-j / 4))) for j in range(21)}, reverse=True))
_BITS_PER_ENTRY = 17.5  # the target: 10 bytes of per-position header + 17.5 bits an entry = 150 B at k = 64
_HEADER_BITS = 80  # top (4) + tail (4) + scale (2) bytes per position
_ROOT_BINS = 1 << 16  # the rate control's histogram of sqrt(d / d_max)
_CHUNK = 1 << 20  # entries (a multiple of 8) or stream bytes per vectorised block: bounds temporaries
_HASH_CHUNK = 16 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SUBDIR = "teacher-signals"
_SIDECAR = "weight-hashes.json"
_TOPK_SUFFIX = ".safetensors"
_FULL_SUFFIX = ".f16"
_FULL_MAGIC = b"DSTLF16\n"
_FULL_ALIGN = 4096
_LITTLE = sys.byteorder == "little"
_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


# ---- sizes and error bounds ----------------------------------------------------------------------------------


def target_bytes_per_token(k: int) -> int:
    """The size the encoder aims at: 10 bytes of per-position header + 17.5 bits an entry (150 at k = 64)."""
    return _HEADER_BITS // 8 + math.ceil(k * _BITS_PER_ENTRY / 8)


def _rice_bound(count: int, total: int) -> int:
    """The most bits ``count`` Rice-coded numbers summing to ≤ ``total`` take with the best parameter."""
    return min(count * (b + 1) + (total >> b) for b in range(40))


def bytes_per_token_bound(k: int, vocab: int) -> float:
    """An upper bound on the bytes a top-k position takes, whatever the signal (not counting the file's
    fixed header of well under a kilobyte): the target, or, where even the coarsest values (L = MIN_LEVELS,
    ≤ 5 bits an entry) do not fit beside the ids' worst case, that sum. 146 → 150 at k = 64, V ≤ 65536."""
    ids = _rice_bound(k, vocab - k)  # sorted distinct ids < vocab: the gaps sum to ≤ vocab − k
    values = min(k * (b + 1 + ((MIN_LEVELS + 1) >> b)) for b in range(8))
    return max(float(target_bytes_per_token(k)), (_HEADER_BITS + ids + values) / 8)


def prob_error_bound(levels: int, d_max: float = GAP_CAP) -> float:
    """The largest |p − p̂| / p_top of a stored probability with ``levels`` levels over d_max nats: s =
    sqrt(d / d_max) is rounded to the nearest of levels + 1 points, so ŝ is within δ = 1/(2·levels) of s;
    the worst |e^{−d_max s²} − e^{−d_max ŝ²}| over s, evaluated on a fine grid. To first order it is
    2·sqrt(d_max)·δ·max_d sqrt(d)e^{−d} + d_max·δ² (≈ 0.011 at 254 levels and d_max = GAP_CAP)."""
    s = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    delta = 1 / (2 * levels)
    exact = torch.exp(-d_max * s * s)
    worst = max(float((exact - torch.exp(-d_max * (s + sign * delta).clamp(0, 1) ** 2)).abs().max())
                for sign in (-1, 1))
    return worst * (1 + 1e-6)


# ---- Rice-coded bit streams (vectorised) ---------------------------------------------------------------------


def _rice_from_counts(counts: np.ndarray) -> tuple[int, int]:
    """(b, bits): the Rice parameter with the fewest bits for values with histogram ``counts`` (counts[v]
    values equal v): b low bits + a unary quotient (v >> b zeros and a one) each."""
    counts = counts.astype(np.int64)
    n = int(counts.sum())
    if n == 0:
        return 0, 0
    levels = np.arange(counts.size, dtype=np.int64)
    return min(((b, n * (b + 1) + int(counts @ (levels >> b))) for b in range(counts.size.bit_length() + 1)),
               key=lambda row: row[1])


def _rice_parameter(values: torch.Tensor, limit: int) -> tuple[int, int]:
    """(b, bits): :func:`_rice_from_counts` for ``values`` (1-D, 0 ≤ v ≤ limit)."""
    return _rice_from_counts(np.bincount(values.numpy(), minlength=limit + 1))


def _join(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.concatenate(parts)) if parts else torch.zeros(0, dtype=torch.uint8)


def _pack_groups(values: np.ndarray, width: int) -> np.ndarray:
    """``width`` (1-7) bits of each value, packed: each group of 8 values fills ``width`` bytes, value j
    of a group in bits [j·width, (j+1)·width) of the group's little-endian word."""
    groups = -(-len(values) // 8)
    padded = np.zeros(groups * 8, np.uint64)
    padded[:len(values)] = values & ((1 << width) - 1)
    words = (padded.reshape(groups, 8) << (np.arange(8, dtype=np.uint64) * np.uint64(width))).sum(1, dtype=np.uint64)
    return np.ascontiguousarray(words.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :width]).reshape(-1)


def _unpack_groups(packed: np.ndarray, width: int, count: int) -> np.ndarray:
    """The ``count`` values (uint64) of :func:`_pack_groups`."""
    groups = -(-count // 8)
    words = np.zeros((groups, 8), np.uint8)
    words[:, :width] = packed.reshape(groups, width)
    shifted = words.view("<u8") >> (np.arange(8, dtype=np.uint64) * np.uint64(width))
    return (shifted & np.uint64((1 << width) - 1)).reshape(-1)[:count]


def _rice_encode(values: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) uint8 streams of ``values`` (1-D int, 0 ≤ v < 2^31): low = the b low bits of each value,
    as b // 8 byte planes (bits 0-7, 8-15, ...), then the b % 8 bits left packed in groups of 8 values
    (:func:`_pack_groups`, block by block of _CHUNK values); high = each quotient v >> b in unary (that
    many zero bits, then a one), one stream for all values, little-endian bit order."""
    x = values.to(torch.int32).numpy()
    planes, rest = divmod(b, 8)
    low = [((x >> (8 * j)) & 255).astype(np.uint8) for j in range(planes)]
    for start in range(0, len(x) if rest else 0, _CHUNK):
        low.append(_pack_groups((x[start:start + _CHUNK] >> (8 * planes)).astype(np.uint64), rest))
    high, carry = [], np.zeros(0, np.uint8)
    for start in range(0, len(x), _CHUNK):
        ones = np.cumsum((x[start:start + _CHUNK] >> b).astype(np.int64) + 1) - 1  # each value's closing one bit
        bits = np.zeros(len(carry) + int(ones[-1]) + 1, np.uint8)
        bits[:len(carry)] = carry
        bits[ones + len(carry)] = 1
        whole = len(bits) - len(bits) % 8
        high.append(np.packbits(bits[:whole], bitorder="little"))
        carry = bits[whole:]
    high.append(np.packbits(carry, bitorder="little"))
    return _join(low), _join(high)


class _RiceReader:
    """Decodes :func:`_rice_encode`'s streams block by block, in order: :meth:`take` the next n values,
    n a multiple of 8 (and of _CHUNK's blocks' boundaries: a divisor of _CHUNK) except for the last."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor, b: int, count: int):
        self.planes, self.rest = divmod(b, 8)
        self.b, self.count = b, count
        self.low, self.high = low.numpy(), high.numpy()
        need = count * self.planes + -(-count // 8) * self.rest
        if self.low.size != need:
            raise ValueError(f"teacher cache: a low stream of {self.low.size} bytes, expected {need}")
        self.done = 0  # values returned
        self.previous = -1  # bit index of the last one bit consumed
        self.pending = np.zeros(0, np.int64)  # bit indices of one bits found but not yet consumed
        self.byte = 0  # the next high-stream byte to scan

    def take(self, n: int) -> np.ndarray:
        """The next n values (int32)."""
        start, stop = self.done, self.done + n
        if stop > self.count or (start % 8 and n):
            raise ValueError("teacher cache: a read past the end of a stream, or out of step")
        out = np.zeros(n, np.int32)
        for j in range(self.planes):
            out |= self.low[j * self.count + start:j * self.count + stop].astype(np.int32) << (8 * j)
        if self.rest:
            base = self.planes * self.count + start // 8 * self.rest
            packed = self.low[base:base + -(-n // 8) * self.rest]
            out |= _unpack_groups(packed, self.rest, n).astype(np.int32) << (8 * self.planes)
        while self.pending.size < n:  # the unary quotients: gaps between consecutive one bits, minus one
            if self.byte >= self.high.size:
                raise ValueError("teacher cache: a high stream ends early")
            block = self.high[self.byte:self.byte + max(n // 4, 1024)]
            found = np.flatnonzero(np.unpackbits(block, bitorder="little")) + 8 * self.byte
            self.pending = np.concatenate([self.pending, found]) if self.pending.size else found
            self.byte += block.size
        ones, self.pending = self.pending[:n], self.pending[n:]
        if n:
            out |= (np.diff(ones, prepend=self.previous) - 1).astype(np.int32) << self.b
            self.previous = int(ones[-1])
        self.done = stop
        return out


# ---- the top-k format ----------------------------------------------------------------------------------------


def _value_codes(root: torch.Tensor, deep: torch.Tensor, levels: int) -> torch.Tensor:
    """r = levels − round(levels · sqrt(d / d_max)) (int32), levels + 1 for gaps beyond GAP_CAP."""
    codes = levels - torch.round(root * levels).to(torch.int32)
    return codes.masked_fill_(deep, levels + 1)


def _choose_levels(root: torch.Tensor, deep: torch.Tensor, budget: int) -> tuple[int, torch.Tensor, int]:
    """(levels, codes, Rice parameter): the finest LEVEL_LADDER levels whose Rice-coded value codes take at
    most ``budget`` bits (else the coarsest). The search runs on a histogram of sqrt(d / d_max) over
    2^16 bins (one pass over the entries), and the pick is checked on the exact codes."""
    bins = _ROOT_BINS
    binned = torch.round(root * (bins - 1)).to(torch.int32).masked_fill_(deep, bins)
    histogram = np.bincount(binned.numpy(), minlength=bins + 1).astype(np.int64)
    del binned
    centers = np.arange(bins) / (bins - 1)

    def estimate(index: int) -> int:
        levels = LEVEL_LADDER[index]
        codes = np.append(levels - np.rint(centers * levels).astype(np.int64), levels + 1)
        return _rice_from_counts(np.bincount(codes, weights=histogram, minlength=levels + 2))[1]

    lo, hi = 0, len(LEVEL_LADDER) - 1  # the finest levels that fit (the cost falls with the levels)
    if estimate(lo) > budget:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if estimate(mid) <= budget else (mid, hi)
        lo = hi
    while True:  # the histogram rounds a few entries differently: check the exact size
        levels = LEVEL_LADDER[lo]
        codes = _value_codes(root, deep, levels)
        value_b, bits = _rice_parameter(codes, levels + 1)
        if bits <= budget or lo == len(LEVEL_LADDER) - 1:
            return levels, codes, value_b
        lo += 1


def encode_signal(signal: TopKSignal, vocab: int, target: int | None = None) -> dict[str, torch.Tensor]:
    """The stored tensors of a top-k signal (any entry order): see the module docstring. ``target``: bytes per
    position to aim at (default :func:`target_bytes_per_token`); the finest value levels that fit are used.
    Deterministic: the same signal always gives the same tensors."""
    k = signal.k
    lead = tuple(signal.shape)
    logprobs = signal.logprobs.detach().cpu().float().reshape(-1, k)
    ids = signal.indices.detach().cpu().reshape(-1, k)
    positions = logprobs.shape[0]
    if not 1 <= k <= vocab <= MAX_VOCAB:
        raise ValueError(f"teacher cache: k = {k} entries need a vocabulary of k to {MAX_VOCAB} ids, got {vocab}")
    if positions and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"teacher cache: token ids must lie in [0, {vocab})")
    ids, order = ids.to(torch.int32).sort(dim=-1)
    gaps = torch.cat([ids[:, :1], ids.diff(dim=-1) - 1], dim=-1).reshape(-1)
    if positions and int(gaps.min()) < 0:
        raise ValueError("teacher cache: a position lists the same token id twice")
    logprobs = logprobs.gather(-1, order)
    top = logprobs.amax(-1) if positions else torch.zeros(0)
    gap = (top.unsqueeze(-1) - logprobs).clamp_min(0)
    deep = (gap > GAP_CAP) | gap.isnan()
    gap = gap.masked_fill_(deep, 0)
    scale = gap.amax(-1).to(torch.float16) if positions else torch.zeros(0, dtype=torch.float16)
    unit = scale.float()
    unit = torch.where(unit > 0, unit, torch.ones_like(unit)).unsqueeze(-1)
    root = torch.sqrt(gap / unit).clamp_(max=1.0).reshape(-1)
    deep = deep.reshape(-1)
    del gap, logprobs, order
    id_b, id_bits = _rice_parameter(gaps, vocab - 1)
    header = _HEADER_BITS if signal.tail_logprob is not None else _HEADER_BITS - 32
    fixed = 8 * (128 + 8 * len(lead))  # layout, shape, and the streams' last partial bytes
    budget = 8 * positions * (target or target_bytes_per_token(k)) - header * positions - id_bits - fixed

    levels, codes, value_b = _choose_levels(root, deep, budget)
    ids_low, ids_high = _rice_encode(gaps, id_b)
    values_low, values_high = _rice_encode(codes, value_b)
    out = {"top": top.contiguous(), "scale": scale.contiguous(),
           "ids_low": ids_low, "ids_high": ids_high, "values_low": values_low, "values_high": values_high,
           "layout": torch.tensor([FORMAT_VERSION, k, vocab, levels, id_b, value_b, positions], dtype=torch.int64),
           "shape": torch.tensor(lead, dtype=torch.int64)}
    if signal.tail_logprob is not None:
        out["tail"] = signal.tail_logprob.detach().cpu().float().reshape(-1).contiguous()
    return out


def stored_levels(tensors: dict[str, torch.Tensor]) -> int:
    """The value levels L the encoder chose for these stored tensors."""
    return int(tensors["layout"][3])


def decode_signal(tensors: dict[str, torch.Tensor]) -> TopKSignal:
    """The signal the stored tensors stand for: float32 log-probabilities, int32 ids and the float32 tail,
    each position's entries in ascending token-id order (the losses do not depend on the order). Raises
    ValueError on tensors that are not a format-2 signal."""
    layout = [int(v) for v in tensors["layout"].tolist()]
    if len(layout) != 7 or layout[0] != FORMAT_VERSION:
        raise ValueError(f"teacher cache: not a format-{FORMAT_VERSION} top-k signal")
    _, k, vocab, levels, id_b, value_b, positions = layout
    lead = tuple(int(v) for v in tensors["shape"].tolist())
    if math.prod(lead) != positions or k < 1 or not 1 <= levels <= MAX_LEVELS or not k <= vocab <= MAX_VOCAB:
        raise ValueError("teacher cache: an inconsistent layout")
    top, scale, tail = tensors["top"], tensors["scale"].float(), tensors.get("tail")
    if top.shape != (positions,) or scale.shape != (positions,) or (tail is not None and tail.shape != (positions,)):
        raise ValueError("teacher cache: per-position tensors of the wrong shape")
    count = positions * k
    ids_reader = _RiceReader(tensors["ids_low"], tensors["ids_high"], id_b, count)
    values_reader = _RiceReader(tensors["values_low"], tensors["values_high"], value_b, count)
    # r → (c / L)², c = L − r; the floor code L + 1 maps to infinity, then to LOG_PROB_FLOOR
    squares = ((levels - np.arange(levels + 2, dtype=np.float32)) / np.float32(levels)) ** 2
    squares[levels + 1] = np.inf
    logprobs = torch.empty(positions, k, dtype=torch.float32)
    indices = torch.empty(positions, k, dtype=torch.int32)
    out_values, out_ids = logprobs.numpy(), indices.numpy()
    top_np, scale_np = top.float().numpy(), scale.numpy()
    block = max(8, _CHUNK // k // 8 * 8)  # positions per block: block · k is a multiple of 8
    for start in range(0, positions, block):
        stop = min(positions, start + block)
        n = (stop - start) * k
        ids = out_ids[start:stop]
        gaps = ids_reader.take(n).reshape(stop - start, k)
        gaps += 1
        np.cumsum(gaps, axis=1, out=ids)
        ids -= 1
        if int(ids[:, -1].max()) >= vocab or int(ids[:, 0].min()) < 0:
            raise ValueError("teacher cache: a token id out of range")
        try:
            depth = np.take(squares, values_reader.take(n).reshape(stop - start, k))
        except IndexError:
            raise ValueError("teacher cache: a value code out of range") from None
        depth *= scale_np[start:stop, None]  # scale 0 (a one-token position): 0 · inf = nan below
        values = out_values[start:stop]
        np.subtract(top_np[start:stop, None], depth, out=values)
        values[~(values > LOG_PROB_FLOOR)] = LOG_PROB_FLOOR  # beyond GAP_CAP (−inf or nan): probability 0
    return TopKSignal(logprobs=logprobs.reshape(*lead, k), indices=indices.reshape(*lead, k),
                      tail_logprob=None if tail is None else tail.reshape(lead))


# ---- content keys --------------------------------------------------------------------------------------------


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




# ---- the full-vocabulary store -------------------------------------------------------------------------------


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError("teacher cache: a full-vocabulary entry ends early")
        done += got


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _discard(fd: int, path: str) -> None:
    _close_quietly(fd)
    Path(path).unlink(missing_ok=True)


def _full_header(shape: tuple[int, int, int], inputs: dict) -> bytes:
    text = json.dumps({"format": FORMAT_VERSION, "shape": list(shape), "dtype": "float16", "byteorder": "little",
                       "inputs": {key: str(value) for key, value in inputs.items()}}).encode()
    size = -(-(16 + len(text)) // _FULL_ALIGN) * _FULL_ALIGN
    return (_FULL_MAGIC + len(text).to_bytes(8, "little") + text).ljust(size, b" ")


def _read_full_header(fd: int) -> tuple[tuple[int, int, int], int, dict]:
    """(shape, data offset, inputs) of an open full-vocabulary file; ValueError if it is not one, or short."""
    preamble = os.pread(fd, 16, 0)
    if len(preamble) != 16 or preamble[:8] != _FULL_MAGIC:
        raise ValueError("teacher cache: not a full-vocabulary entry")
    length = int.from_bytes(preamble[8:], "little")
    if length > 1 << 20:
        raise ValueError("teacher cache: a full-vocabulary header too large")
    header = json.loads(os.pread(fd, length, 16))
    shape = tuple(int(v) for v in header["shape"])
    if (header["format"] != FORMAT_VERSION or header["dtype"] != "float16" or header["byteorder"] != "little"
            or len(shape) != 3 or min(shape) < 0):
        raise ValueError("teacher cache: an unsupported full-vocabulary entry")
    offset = -(-(16 + length) // _FULL_ALIGN) * _FULL_ALIGN
    if os.fstat(fd).st_size != offset + 2 * math.prod(shape):
        raise ValueError("teacher cache: a full-vocabulary entry of the wrong size")
    return shape, offset, header.get("inputs", {})


class FullLogits:
    """A stored full-vocabulary signal: the teacher's logits (N, L, V) as float16, read a batch of rows at
    a time with :meth:`rows`. It holds the file open, so it stays readable if the entry is evicted
    meanwhile; :meth:`close` (or garbage collection) releases it."""

    def __init__(self, fd: int, path: Path, shape: tuple[int, int, int], offset: int, inputs: dict):
        self.path, self.shape, self.inputs = path, tuple(shape), inputs
        self._fd, self._offset = fd, offset
        self._row_bytes = 2 * shape[1] * shape[2]
        self._closer = weakref.finalize(self, _close_quietly, fd)

    @property
    def nbytes(self) -> int:
        """The logits' bytes, N·L·V·2 (the file adds a header of a few KiB)."""
        return self.shape[0] * self._row_bytes

    def rows(self, indices) -> torch.Tensor:
        """Rows ``indices`` (any order, repeats allowed) as a fresh (B, L, V) float16 tensor, read with
        ``os.preadv`` straight into it: no mmap, so the process holds this batch, not the file."""
        index = torch.as_tensor(indices).reshape(-1)
        if index.numel() == 0:
            index = index.long()
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"rows: indices must be integers, got {index.dtype}")
        order = [int(i) for i in index.tolist()]
        if order and not (0 <= min(order) and max(order) < self.shape[0]):
            raise IndexError(f"rows: indices must lie in [0, {self.shape[0]})")
        if not self._closer.alive:
            raise ValueError("rows: the entry is closed")
        out = torch.empty((len(order), self.shape[1], self.shape[2]), dtype=torch.float16)
        flat = memoryview(out.numpy().reshape(-1).view(np.uint8))
        size = self._row_bytes
        start = 0
        while start < len(order):  # runs of consecutive rows are one read
            stop = start + 1
            while stop < len(order) and order[stop] == order[stop - 1] + 1:
                stop += 1
            _pread_into(self._fd, flat[start * size:stop * size], self._offset + order[start] * size)
            start = stop
        if not _LITTLE:
            out = torch.from_numpy(out.numpy().byteswap())
        return out

    def close(self) -> None:
        self._closer()


class FullLogitsWriter:
    """Fills a new full-vocabulary entry: :meth:`write` row blocks in any order, then :meth:`commit` (every
    row written; fsync, then an atomic rename) or :meth:`abort`. Usable as a context manager (an
    exception aborts); a writer garbage-collected before commit removes its temporary file too."""

    def __init__(self, cache: TeacherCache, key: str, shape: tuple[int, int, int], inputs: dict):
        self._cache, self._key, self.shape = cache, key, shape
        header = _full_header(shape, inputs)
        self._offset, self._inputs = len(header), {k: str(v) for k, v in inputs.items()}
        self._row_bytes = 2 * shape[1] * shape[2]
        cache.root.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(dir=cache.root, prefix=".tmp-", suffix=".part")
        self._fd = fd
        self._cleanup = weakref.finalize(self, _discard, fd, self._tmp)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + shape[0] * self._row_bytes)
        except BaseException:
            self.abort()
            raise
        self._written = torch.zeros(shape[0], dtype=torch.bool)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row_bytes

    def write(self, row_start: int, logits: torch.Tensor) -> None:
        """Store rows [row_start, row_start + b) from ``logits`` (b, L, V), any float dtype, as float16."""
        if not self._cleanup.alive:
            raise ValueError("write: the writer is closed (committed or aborted)")
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError("write: logits must be a floating-point tensor")
        count = logits.shape[0] if logits.ndim == 3 else -1
        if logits.ndim != 3 or tuple(logits.shape[1:]) != self.shape[1:]:
            raise ValueError(f"write: logits must be (b, {self.shape[1]}, {self.shape[2]}), "
                             f"got {tuple(logits.shape)}")
        row_start = int(row_start)
        if row_start < 0 or row_start + count > self.shape[0]:
            raise IndexError(f"write: rows [{row_start}, {row_start + count}) outside [0, {self.shape[0]})")
        data = logits.detach().to(torch.float16).cpu().contiguous().numpy()
        if not _LITTLE:
            data = data.byteswap()
        _pwrite_all(self._fd, memoryview(data.reshape(-1).view(np.uint8)), self._offset + row_start * self._row_bytes)
        self._written[row_start:row_start + count] = True

    def commit(self) -> FullLogits:
        """Publish the entry (all rows must have been written), evicting LRU entries to keep the budget."""
        if not self._cleanup.alive:
            raise ValueError("commit: the writer is closed (committed or aborted)")
        if not bool(self._written.all()):
            missing = int((~self._written).sum())
            self.abort()
            raise ValueError(f"commit: {missing} of {self.shape[0]} rows were never written")
        try:
            os.fsync(self._fd)
            target = self._cache.full_path(self._key)
            self._cache._make_room(self._offset + self.nbytes, target)
            os.replace(self._tmp, target)
            now = time.time_ns()
            os.utime(self._fd, ns=(now, now))
        except BaseException:
            self.abort()
            raise
        self._cleanup.detach()  # the file is published; its descriptor now belongs to the entry
        return FullLogits(self._fd, target, self.shape, self._offset, self._inputs)

    def abort(self) -> None:
        """Drop the partial entry (nothing is published). Idempotent."""
        self._cleanup()

    def __enter__(self) -> FullLogitsWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            self.abort()


# ---- the store -----------------------------------------------------------------------------------------------


@dataclass
class CacheEntry:
    signal: TopKSignal
    stored_bytes: int


class TeacherCache:
    """Teacher signals under ``<root>/teacher-signals/``, at most ``max_bytes`` in all (None or 0: off —
    :attr:`enabled` is False and the recipe computes the signal as before): top-k signals (:meth:`put`,
    :meth:`get`) and full-vocabulary logits (:meth:`open_full`, :meth:`get_full`)."""

    def __init__(self, root: str | Path, max_bytes: int | None):
        self.root = Path(root) / _SUBDIR
        self.max_bytes = int(max_bytes or 0)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def path(self, key: str) -> Path:
        """The file of a top-k entry."""
        return self.root / f"{key}{_TOPK_SUFFIX}"

    def full_path(self, key: str) -> Path:
        """The file of a full-vocabulary entry."""
        return self.root / f"{key}{_FULL_SUFFIX}"

    def key(self, teachers: list[tuple[str | Path, float]], tokens: dict, k: int | None, temperature: float,
            vocab: int, teacher_dtype: str = "torch.float32") -> tuple[str, dict]:
        """(the content address, its inputs as strings). ``teachers``: (model dir, mixture weight); ``k``: the
        top-k size, None for the full vocabulary; ``teacher_dtype``: the dtype the teacher runs in (its
        weights' hash is of the files)."""
        self.root.mkdir(parents=True, exist_ok=True)
        sidecar = self.root / _SIDECAR
        inputs = {"format": str(FORMAT_VERSION),
                  "teachers": json.dumps([[weights_hash(path, sidecar), float(weight)] for path, weight in teachers]),
                  "data": data_hash(tokens), "k": "full" if k is None else str(int(k)),
                  "temperature": repr(float(temperature)), "vocab": str(int(vocab)),
                  "teacher_dtype": str(teacher_dtype)}
        key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
        return key, inputs

    def _touch(self, target: Path | int) -> None:
        now = time.time_ns()
        try:
            os.utime(target, ns=(now, now))
        except OSError:
            pass  # evicted meanwhile: the reader still holds what it read

    def get(self, key: str) -> CacheEntry | None:
        """The decoded top-k signal stored under ``key`` (touching it), or None."""
        if not self.enabled:
            return None
        from safetensors.torch import load_file

        path = self.path(key)
        try:
            tensors = load_file(str(path))
            self._touch(path)
            return CacheEntry(decode_signal(tensors), path.stat().st_size)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a damaged entry is a miss; drop it so it is rewritten
            path.unlink(missing_ok=True)
            return None

    def get_full(self, key: str) -> FullLogits | None:
        """The full-vocabulary entry stored under ``key`` (touching it), or None."""
        if not self.enabled:
            return None
        path = self.full_path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            shape, offset, inputs = _read_full_header(fd)
        except (OSError, ValueError, KeyError, TypeError):  # damaged: a miss; drop it so it is rewritten
            _close_quietly(fd)
            path.unlink(missing_ok=True)
            return None
        self._touch(fd)
        return FullLogits(fd, path, shape, offset, inputs)

    def open_full(self, key: str, shape: tuple[int, int, int], inputs: dict) -> FullLogitsWriter | None:
        """A writer for a new full-vocabulary entry of ``shape`` (N, L, V), or None when the cache is off or
        the entry (N·L·V·2 bytes + its header) exceeds the whole budget. Least recently used entries are
        evicted now to make room (and again on commit, in case other workers filled it meanwhile)."""
        if not self.enabled:
            return None
        if len(shape) != 3 or any(int(v) != v or int(v) < 0 for v in shape) or min(shape[1:]) < 1:
            raise ValueError(f"open_full: shape must be (N, L, V) with N ≥ 0 and L, V ≥ 1, got {tuple(shape)}")
        shape = tuple(int(v) for v in shape)
        size = len(_full_header(shape, inputs)) + 2 * math.prod(shape)
        if size > self.max_bytes:
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        self._make_room(size, self.full_path(key))
        return FullLogitsWriter(self, key, shape, inputs)

    def entries(self) -> list[tuple[int, str, int, Path]]:
        """(mtime_ns, name, size, path) of every stored signal of either kind, least recently used first."""
        rows = []
        for pattern in (f"*{_TOPK_SUFFIX}", f"*{_FULL_SUFFIX}"):
            for path in self.root.glob(pattern):
                try:
                    info = path.stat()
                except FileNotFoundError:
                    continue
                rows.append((info.st_mtime_ns, path.name, info.st_size, path))
        return sorted(rows)

    def _make_room(self, size: int, target: Path) -> None:
        """Evict least recently used entries (not ``target``) until they and ``size`` fit the budget."""
        others = [row for row in self.entries() if row[3] != target]
        total = sum(row[2] for row in others)
        for _, _, row_size, row_path in others:
            if total + size <= self.max_bytes:
                break
            row_path.unlink(missing_ok=True)
            total -= row_size

    def put(self, key: str, tensors: dict[str, torch.Tensor], inputs: dict) -> int | None:
        """Store encoded top-k tensors under ``key``, evicting least recently used entries until the
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
            self._make_room(size, target)
            os.replace(tmp, target)
            self._touch(target)
            return size
        finally:
            Path(tmp).unlink(missing_ok=True)

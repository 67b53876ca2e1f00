"""The full-vocabulary store of the teacher cache (distill/teacher_cache.py): a (N, L, V) float16 file
written row blocks at a time and read back a batch of rows at a time, under the same LRU byte budget as
the top-k signals."""

from __future__ import annotations

import gc
import sys
import threading

import pytest
import torch

from distill.losses import teacher_topk
from distill.teacher_cache import FullLogits, TeacherCache, encode_signal

SHAPE = (12, 5, 33)  # N rows, L positions, V vocabulary


def _logits(shape=SHAPE, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * 6).to(dtype)


def _store(cache, key, logits, block=5, order=None):
    writer = cache.open_full(key, tuple(logits.shape), {"k": "full", "note": key})
    assert writer is not None
    starts = list(range(0, logits.shape[0], block))
    for start in (order(starts) if order else starts):
        writer.write(start, logits[start:start + block])
    return writer.commit()


def _leftovers(cache):
    return sorted(p.name for p in cache.root.glob(".tmp-*"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_round_trip_equals_the_float16_cast(tmp_path, dtype):
    cache = TeacherCache(tmp_path, 1 << 20)
    logits = _logits(dtype=dtype)
    logits[0, 0, 0], logits[1, 0, 0] = 1e6, -float("inf")  # beyond float16: inf, as the cast gives
    entry = _store(cache, "k1", logits, block=5, order=lambda s: s[::-1])  # blocks written last first
    expected = logits.to(torch.float16)
    assert isinstance(entry, FullLogits) and entry.shape == SHAPE and entry.nbytes == 12 * 5 * 33 * 2
    for source in (entry, cache.get_full("k1")):
        rows = torch.tensor([7, 0, 11, 3, 3, 8, 9, 10])  # any order, repeats, runs of consecutive rows
        got = source.rows(rows)
        assert got.dtype == torch.float16 and got.shape == (8, 5, 33)
        assert torch.equal(got, expected[rows])
        assert torch.equal(source.rows(torch.arange(12)), expected)
        assert source.rows([]).shape == (0, 5, 33)
    assert cache.full_path("k1").stat().st_size == entry.nbytes + 4096  # raw data + one header block
    assert _leftovers(cache) == []


def test_rows_are_read_without_mapping_the_file(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    cache = TeacherCache(tmp_path, 1 << 20)
    entry = _store(cache, "k", _logits())
    entry = cache.get_full("k")
    batch = entry.rows(torch.tensor([2, 5]))
    with open("/proc/self/maps") as maps:
        assert str(cache.full_path("k")) not in maps.read()
    batch.add_(1)  # a fresh tensor: writing to it leaves the store alone
    assert torch.equal(cache.get_full("k").rows([2, 5]), _logits().to(torch.float16)[[2, 5]])


def test_bad_writes_and_reads_are_refused(tmp_path):
    cache = TeacherCache(tmp_path, 1 << 20)
    writer = cache.open_full("k", SHAPE, {})
    with pytest.raises(ValueError, match="must be"):
        writer.write(0, _logits((2, 5, 32)))
    with pytest.raises(IndexError):
        writer.write(11, _logits((2, 5, 33)))
    with pytest.raises(TypeError):
        writer.write(0, torch.zeros(2, 5, 33, dtype=torch.int64))
    writer.write(0, _logits((6, 5, 33)))
    with pytest.raises(ValueError, match="6 of 12 rows were never written"):
        writer.commit()  # a half-filled entry is never published
    assert cache.get_full("k") is None and _leftovers(cache) == []
    with pytest.raises(ValueError):
        cache.open_full("k", (2, 0, 4), {})
    entry = _store(cache, "k", _logits())
    with pytest.raises(IndexError):
        entry.rows([12])
    with pytest.raises(IndexError):
        entry.rows([-1])


def test_abort_and_failures_leave_nothing_behind(tmp_path):
    cache = TeacherCache(tmp_path, 1 << 20)
    writer = cache.open_full("a", SHAPE, {})
    writer.write(0, _logits()[:4])
    assert len(_leftovers(cache)) == 1
    writer.abort()
    writer.abort()  # idempotent
    assert _leftovers(cache) == [] and cache.get_full("a") is None
    with pytest.raises(ValueError, match="closed"):
        writer.write(0, _logits()[:4])
    with pytest.raises(RuntimeError):
        with cache.open_full("b", SHAPE, {}) as writer:
            writer.write(0, _logits()[:4])
            raise RuntimeError("the teacher failed")
    assert _leftovers(cache) == [] and cache.get_full("b") is None
    writer = cache.open_full("c", SHAPE, {})  # dropped without commit: garbage collection removes it
    del writer
    gc.collect()
    assert _leftovers(cache) == [] and cache.entries() == []


def test_one_budget_counts_full_and_top_k_entries(tmp_path):
    full_size = 12 * 5 * 33 * 2 + 4096
    topk = encode_signal(teacher_topk(_logits((64, 40), seed=9), 8, 1.0), 40)
    probe = TeacherCache(tmp_path / "probe", 1 << 30)
    topk_size = probe.put("x", topk, {})
    cache = TeacherCache(tmp_path, full_size + 2 * topk_size)  # one full entry and two top-k ones
    assert cache.put("t1", topk, {}) == topk_size and cache.put("t2", topk, {}) == topk_size
    _store(cache, "f1", _logits())
    assert {row[1] for row in cache.entries()} == {"t1.safetensors", "t2.safetensors", "f1.f16"}
    cache.put("t3", topk, {})  # evicts the least recently used: t1
    assert {row[1] for row in cache.entries()} == {"t2.safetensors", "f1.f16", "t3.safetensors"}
    assert cache.get("t2") is not None and cache.get("t3") is not None  # f1 is now the least recently used
    cache.put("t4", topk, {})
    assert cache.get_full("f1") is None and {row[1] for row in cache.entries()} == {
        "t2.safetensors", "t3.safetensors", "t4.safetensors"}
    _store(cache, "f2", _logits(seed=1))  # a full entry evicts top-k ones: t2 (LRU) and then t3 ... as needed
    assert sum(row[2] for row in cache.entries()) <= cache.max_bytes
    assert cache.get_full("f2") is not None and "f2.f16" in {row[1] for row in cache.entries()}
    assert cache.get("t2") is None


def test_an_entry_bigger_than_the_whole_budget_is_refused(tmp_path):
    cache = TeacherCache(tmp_path, 12 * 5 * 33 * 2)  # the data alone; the header does not fit
    topk = encode_signal(teacher_topk(_logits((16, 40)), 8, 1.0), 40)
    cache.put("t", topk, {})
    assert cache.open_full("f", SHAPE, {}) is None
    assert [row[1] for row in cache.entries()] == ["t.safetensors"]  # nothing evicted for it
    assert TeacherCache(tmp_path / "off", 0).open_full("f", SHAPE, {}) is None  # cache off
    assert TeacherCache(tmp_path / "off", 0).get_full("f") is None


def test_a_reader_never_sees_a_half_written_entry(tmp_path):
    cache = TeacherCache(tmp_path, 1 << 22)
    shape = (64, 8, 257)
    logits = _logits(shape, seed=4)
    expected = logits.to(torch.float16)
    seen, stop = [], threading.Event()

    def reader():
        other = TeacherCache(tmp_path, 1 << 22)  # another worker on the same root
        while not stop.is_set():
            entry = other.get_full("k")
            if entry is None:
                seen.append("miss")
            else:
                seen.append(torch.equal(entry.rows(torch.arange(64)), expected))
                entry.close()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        writer = cache.open_full("k", shape, {})
        for start in range(0, 64, 4):
            writer.write(start, logits[start:start + 4])
            assert cache.get_full("k") is None  # nothing is published before the commit
        writer.commit()
        while thread.is_alive() and all(item == "miss" for item in seen[-3:]):
            stop.wait(0.001)  # until the reader has seen the published entry
    finally:
        stop.set()
        thread.join()
    assert seen and seen[-1] is True  # the reader saw the published entry
    assert all(item in ("miss", True) for item in seen)  # a miss, or the whole entry: never part of it


def test_damaged_and_evicted_entries(tmp_path):
    cache = TeacherCache(tmp_path, 1 << 20)
    _store(cache, "a", _logits())
    path = cache.full_path("a")
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 2)  # a short file
    assert cache.get_full("a") is None and not path.exists()  # a miss, dropped so it is rewritten
    path.write_bytes(b"not a teacher signal")
    assert cache.get_full("a") is None and not path.exists()
    held = _store(cache, "b", _logits(seed=2))
    cache.full_path("b").unlink()  # evicted by another worker while this one trains from it
    assert torch.equal(held.rows([1, 2]), _logits(seed=2).to(torch.float16)[[1, 2]])
    held.close()
    with pytest.raises(ValueError, match="closed"):
        held.rows([0])

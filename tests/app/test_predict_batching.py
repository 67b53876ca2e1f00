"""Micro-batched /predict: batched answers equal one-by-one answers, errors and models never mix.

Unit tests drive the batcher and the batch runner in-process (a real MLP and a real tiny BERT
classifier); the end-to-end tests send concurrent requests to the live API (real worker, real
model)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch

from app.errors import NotFound, Unavailable, Unprocessable
from app.services import models as service
from app.services.batching import MicroBatcher
from distill.models import MLP, MLPArchitecture

from .helpers import job_body, submit, upload, wait_for


# ---- the batcher alone ---------------------------------------------------------------------------------------

def test_batcher_groups_concurrent_requests_and_keeps_their_rows_apart():
    batches: list[list[list]] = []

    def run(requests):
        batches.append(requests)
        return [[row * 10 for row in rows] if rows != [13] else ValueError("unlucky") for rows in requests]

    async def main():
        batcher = MicroBatcher(max_batch=8, max_wait_s=0.05, max_pending=100)
        calls = [batcher.submit("a", rows, run) for rows in ([1], [2, 3], [13], [4], [5, 6, 7], [8])]
        results = await asyncio.gather(*calls, return_exceptions=True)
        batcher.shutdown()
        return results

    results = asyncio.run(main())
    assert results[:2] == [[10], [20, 30]] and results[3:] == [[40], [50, 60, 70], [80]]
    assert isinstance(results[2], ValueError)  # only the request that failed
    # 9 rows with max_batch 8: whole requests, never split: [1],[2,3],[13],[4] and [5,6,7] = 8 rows, then [8]
    assert [sum(len(r) for r in b) for b in batches] == [8, 1]


def test_batcher_never_mixes_keys_and_bounds_its_queue():
    seen: dict[str, list] = {"a": [], "b": []}

    def runner(key):
        def run(requests):
            seen[key].extend(row for rows in requests for row in rows)
            return [[f"{key}{row}" for row in rows] for rows in requests]
        return run

    async def main():
        batcher = MicroBatcher(max_batch=64, max_wait_s=0.05, max_pending=4)
        tasks = [asyncio.ensure_future(batcher.submit(k, [n], runner(k))) for n, k in enumerate("abab")]
        await asyncio.sleep(0)  # all four are queued, waiting for their window
        with pytest.raises(Unavailable) as refused:
            await batcher.submit("a", [99], runner("a"))
        results = await asyncio.gather(*tasks)
        batcher.shutdown()
        return refused.value, results

    refused, results = asyncio.run(main())
    assert refused.status == 503 and refused.headers["Retry-After"] == "1"
    assert results == [["a0"], ["b1"], ["a2"], ["b3"]]
    assert seen == {"a": [0, 2], "b": [1, 3]}


# ---- the batch runner on real models -------------------------------------------------------------------------

@pytest.fixture
def fresh_cache(monkeypatch):
    models = {}
    cache = service.ModelCache(8, lambda record: models[record.id], capacity_bytes=None)
    monkeypatch.setattr(service, "_cache", cache)
    return models


def record(model_id: str, kind: str, task: str):
    return SimpleNamespace(id=model_id, sha256="0" * 64, kind=kind, task=task, storage_key="unused")


def test_run_batch_mlp_equals_one_by_one_and_keeps_errors_per_request(fresh_cache):
    torch.manual_seed(0)
    fresh_cache["m"] = MLP(MLPArchitecture(input_dim=5, hidden_dims=[7], num_classes=3)).eval()
    model = record("m", "mlp", "classification")
    rows = torch.randn(6, 5).tolist()
    requests = [[rows[0]], [rows[1], rows[2]], [rows[3], [1.0, 2.0]], [rows[4], rows[5]]]
    batched = service.run_batch(model, requests)
    assert isinstance(batched[2], Unprocessable) and batched[2].param == "inputs[1]"  # its own index
    alone = [service.run_batch(model, [r])[0] for r in requests]
    for i in (0, 1, 3):
        assert [p["label"] for p in batched[i]] == [p["label"] for p in alone[i]]
        assert torch.allclose(torch.tensor([p["probabilities"] for p in batched[i]]),
                              torch.tensor([p["probabilities"] for p in alone[i]]), atol=1e-5)

    service.model_cache().discard("m")  # deleted while queued: 404, not a stale answer
    gone = service.run_batch(model, requests[:2])
    assert all(isinstance(e, NotFound) for e in gone)


def test_run_batch_text_classifier_pads_to_the_longest_and_equals_one_by_one(fresh_cache):
    from tests.distill.hf_factories import make_word_tokenizer, tiny_bert_classifier

    words = "the a cat dog sat ran on under mat log big small very quickly".split()
    tokenizer = make_word_tokenizer(words)
    torch.manual_seed(0)
    fresh_cache["t"] = (tiny_bert_classifier(tokenizer, num_labels=4).eval(), tokenizer)
    model = record("t", "hf", "text_classification")
    texts = ["the cat", "a very big dog ran quickly under the small log", "dog", "the small cat sat on the mat"]
    batched = service.run_batch(model, [[texts[0]], [texts[1], texts[2]], [texts[3]]])
    flat = [p for request in batched for p in request]
    for text, got in zip(texts, flat):
        (alone,) = service.run_batch(model, [[text]])[0]
        assert got["label"] == alone["label"]
        assert torch.allclose(torch.tensor(got["probabilities"]), torch.tensor(alone["probabilities"]), atol=1e-5)


def test_model_cache_is_bounded_by_bytes():
    sizes = {"a": 600, "b": 300, "c": 500}
    cache = service.ModelCache(8, lambda r: r.id, capacity_bytes=1000, sizer=lambda loaded: sizes[loaded])
    for name in "abc":
        cache.get(record(name, "mlp", "classification"))
    assert [k.split(":")[0] for k in cache.keys()] == ["b", "c"] and cache.bytes == 800
    big = service.ModelCache(8, lambda r: r.id, capacity_bytes=100, sizer=lambda loaded: 10_000)
    big.get(record("x", "mlp", "classification"))  # over the budget alone: still served and kept
    assert [k.split(":")[0] for k in big.keys()] == ["x"]
    mlp = MLP(MLPArchitecture(input_dim=5, hidden_dims=[7], num_classes=3))
    assert service.loaded_bytes(mlp) == 4 * (5 * 7 + 7 + 7 * 3 + 3)


# ---- end to end ----------------------------------------------------------------------------------------------

_models: dict[str, str] = {}
_lock = threading.Lock()


def finished_model(client, problem, hidden: int) -> str:
    with _lock:
        if hidden not in _models:
            teacher = upload(client, problem.teacher, "model")
            training = upload(client, problem.train_csv, "dataset")
            body = job_body(teacher["id"], training["id"], epochs=1)
            body["student"]["architecture"]["hidden_dims"] = [hidden]
            job = wait_for(client, submit(client, body)["id"])
            assert job["status"] == "succeeded", job["error"]
            _models[hidden] = job["result_model_id"]
        return _models[hidden]


def concurrently(client, calls: list[tuple[str, list]]) -> list:
    """POST every (model id, inputs) at once from its own thread; the responses in order."""
    barrier = threading.Barrier(len(calls))

    def post(call):
        model_id, inputs = call
        barrier.wait()
        return client.post(f"/models/{model_id}/predict", json={"inputs": inputs})

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(post, calls))


def same(a: list[dict], b: list[dict]) -> bool:
    return [p["label"] for p in a] == [p["label"] for p in b] and torch.allclose(
        torch.tensor([p["probabilities"] for p in a]), torch.tensor([p["probabilities"] for p in b]), atol=1e-5)


def test_concurrent_single_rows_equal_sequential(client, workers, problem):
    model_id = finished_model(client, problem, 16)
    rows = problem.val_x[:32].tolist()
    sequential = []
    for row in rows:
        response = client.post(f"/models/{model_id}/predict", json={"inputs": [row]})
        assert response.status_code == 200, response.text
        sequential.append(response.json()["predictions"])
    concurrent = concurrently(client, [(model_id, [row]) for row in rows])
    assert all(r.status_code == 200 for r in concurrent), [r.text for r in concurrent if r.status_code != 200]
    for got, expected in zip(concurrent, sequential):
        assert got.json()["model"] == model_id and same(got.json()["predictions"], expected)


def test_good_and_bad_requests_and_different_models_in_one_window(client, workers, problem):
    first, second = finished_model(client, problem, 16), finished_model(client, problem, 8)
    rows = problem.val_x[:24].tolist()
    calls = []
    for i, row in enumerate(rows):
        model_id = first if i % 2 else second
        if i % 6 == 5:
            calls.append((model_id, [row, row[:3]]))  # a short row: this request's inputs[1]
        elif i % 6 == 3:
            calls.append(("model-000000000000000000000000", [row]))  # no such model
        else:
            calls.append((model_id, [row]))
    responses = concurrently(client, calls)
    for (model_id, inputs), response in zip(calls, responses):
        if len(inputs) == 2:
            assert response.status_code == 422 and response.json()["param"] == "inputs[1]", response.text
        elif model_id.startswith("model-0000"):
            assert response.status_code == 404, response.text
        else:
            assert response.status_code == 200, response.text
            assert response.json()["model"] == model_id
            alone = client.post(f"/models/{model_id}/predict", json={"inputs": inputs}).json()["predictions"]
            assert same(response.json()["predictions"], alone)
    # the two students differ, so a mixed-up batch would show
    a = client.post(f"/models/{first}/predict", json={"inputs": rows[:8]}).json()["predictions"]
    b = client.post(f"/models/{second}/predict", json={"inputs": rows[:8]}).json()["predictions"]
    assert not same(a, b)

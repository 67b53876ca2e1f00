"""The teacher-signal store through the real stack: a worker keeps a causal-LM job's top-k
teacher signal under its work folder (DISTILL_TEACHER_CACHE_BYTES, on by default), and an
identical job later reuses it without running the teacher, training to the same weights."""

from __future__ import annotations

from safetensors.torch import load_file

from .helpers import events, submit, wait_for
from .test_llm_e2e import download_model_dir, lm_body, uploaded  # noqa: F401 - the module fixture


def _signal_event(client, job_id: str) -> dict:
    (event,) = [e["data"] for e in events(client, job_id) if e["type"] == "teacher_signal"]
    return event


def test_a_repeat_job_reuses_the_teacher_signal(client, workers, uploaded, tmp_path):  # noqa: F811
    # k and temperature of their own: no other test's job makes this signal
    body = lm_body(uploaded, {"derive": {"num_layers": 1}}, teacher_signal={"top_k": 7})
    body["hyperparameters"].update(epochs=1, temperature=1.7)
    first = wait_for(client, submit(client, body)["id"], timeout=300)
    assert first["status"] == "succeeded", first["error"]
    second = wait_for(client, submit(client, body)["id"], timeout=300)
    assert second["status"] == "succeeded", second["error"]
    miss, hit = _signal_event(client, first["id"]), _signal_event(client, second["id"])
    assert (miss["cache"], hit["cache"]) == ("miss", "hit") and miss["cache_key"] == hit["cache_key"]
    a = load_file(str(download_model_dir(client, first["result_model_id"], tmp_path / "a") / "model.safetensors"))
    b = load_file(str(download_model_dir(client, second["result_model_id"], tmp_path / "b") / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[name] == b[name]).all() for name in a)

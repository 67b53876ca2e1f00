"""Every storage key, spelled once.

A key is a relative, ``/``-separated name inside the artifact store (see
:mod:`app.storage`); records keep keys, never paths, so the same row resolves on any
machine and on any backend. The strings below are the layout data already on disk is
stored under: change one and existing files, models and jobs stop resolving.

::

    files/<file_id>/                  file_folder: everything of one uploaded file
        content<suffix>               file_content: the bytes as uploaded (.csv, .jsonl, .tar.gz, ...)
        content.jsonl                 generated_file: a teacher-generated training set
        model/                        file_model_dir: an uploaded model archive, unpacked
    models/<model_id>/                model_folder: everything of one finished model
        model.safetensors             model_file: an MLP student
        model/                        model_dir: a Hugging Face student directory
        <model_id>.tar.gz             model_archive: that directory as a download
        adapter/                      adapter_dir: a LoRA student's PEFT adapter folder
        <model_id>-adapter.tar.gz     adapter_archive: that folder as a download (?format=adapter)
    jobs/<job_id>/                    job_folder: a job's checkpoints and outputs while it runs
"""

from __future__ import annotations

import re

__all__ = ["file_folder", "file_content", "file_model_dir", "generated_file", "model_folder", "model_file",
           "model_dir", "model_archive", "adapter_dir", "adapter_archive", "job_folder"]

# Ids are minted by app.tables.new_id ("file-<hex>"); anything else here is a bug or an attack
# (a "/" or ".." would step into another record's folder).
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_SUFFIX = re.compile(r"(\.[a-z0-9]{1,16}){0,2}")


def _id(value: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"not a valid id for a storage key: {value!r}")
    return value


def file_folder(file_id: str) -> str:
    """The folder of one uploaded file; deleting it removes everything the file owns."""
    return f"files/{_id(file_id)}"


def file_content(file_id: str, suffix: str = "") -> str:
    """The uploaded bytes; ``suffix`` is the upload's extension (``".csv"``, ``".tar.gz"``) or ``""``."""
    if not _SUFFIX.fullmatch(suffix):
        raise ValueError(f"not a valid file suffix for a storage key: {suffix!r}")
    return f"{file_folder(file_id)}/content{suffix}"


def file_model_dir(file_id: str) -> str:
    """Where an uploaded model archive is unpacked (the model may sit one folder further down)."""
    return f"{file_folder(file_id)}/model"


def generated_file(file_id: str) -> str:
    """A dataset a job generated (sequence-level KD's teacher outputs), stored as a file of its own."""
    return file_content(file_id, ".jsonl")


def model_folder(model_id: str) -> str:
    """The folder of one finished model."""
    return f"models/{_id(model_id)}"


def model_file(model_id: str) -> str:
    """An MLP student's weights."""
    return f"{model_folder(model_id)}/model.safetensors"


def model_dir(model_id: str) -> str:
    """A Hugging Face student's directory (config, safetensors shards, tokenizer), as served."""
    return f"{model_folder(model_id)}/model"


def model_archive(model_id: str) -> str:
    """That directory packed as ``<model_id>.tar.gz``, which the download endpoint sends."""
    return f"{model_folder(model_id)}/{model_id}.tar.gz"


def adapter_dir(model_id: str) -> str:
    """A LoRA student's adapter folder (adapter_config.json, adapter_model.safetensors)."""
    return f"{model_folder(model_id)}/adapter"


def adapter_archive(model_id: str) -> str:
    """That folder packed as ``<model_id>-adapter.tar.gz``, sent by the download's ``format=adapter``."""
    return f"{model_folder(model_id)}/{model_id}-adapter.tar.gz"


def job_folder(job_id: str) -> str:
    """A job's checkpoints and outputs while it runs (relative to the work folder, see app.storage)."""
    return f"jobs/{_id(job_id)}"

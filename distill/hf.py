"""Hugging Face models: checking a model directory, loading it safely, deriving students.

A *model directory* is what ``save_pretrained`` writes: ``config.json``, the weights as
safetensors (``model.safetensors``, or shards listed in ``model.safetensors.index.json``)
and usually the tokenizer files. Models are only ever built through the transformers
Auto classes, and always with ``trust_remote_code=False``, ``use_safetensors=True`` and
``local_files_only=True``:

- nothing is unpickled: a directory holding a pickle-format file (``pytorch_model.bin``,
  ``*.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``, ``*.pickle``, ``*.joblib``, e.g.
  also ``training_args.bin``) is refused, with a message naming the file;
- no custom code runs: a ``config.json`` (or ``tokenizer_config.json``) with ``auto_map``
  is refused;
- nothing is downloaded.

Every failure is a :class:`~distill.errors.ModelFormatError` (spec problems a
:class:`~distill.errors.SpecError`, tokenizer mismatches a
:class:`~distill.errors.VocabularyMismatch`) with a message meant for the user.

Deriving a student (:func:`derive_student`) works for decoder-only and encoder-only
families whose transformer blocks sit in one ``nn.ModuleList`` (GPT-2, Llama, Qwen2/3,
Mistral, Gemma, Phi, GPT-NeoX, BERT, RoBERTa, DistilBERT, ...); encoder-decoder models
(T5, BART) are refused.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import safe_json
from .errors import DistillError, ModelFormatError, SpecError, VocabularyMismatch
from .models import count_parameters

__all__ = [
    "PICKLE_SUFFIXES",
    "inspect_model_dir",
    "load_tokenizer",
    "load_causal_lm",
    "load_classifier",
    "transformer_layers",
    "evenly_spaced_layers",
    "derive_student",
    "student_from_config",
    "shared_vocab_size",
    "save_hf",
    "model_card",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
HIDDEN_SIZE_FIELDS = ("hidden_size", "n_embd", "d_model", "dim")
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index")
# Where the block list sits under ``model.base_model`` in the common families.
KNOWN_LAYER_PATHS = ("layers", "h", "encoder.layer", "transformer.layer", "decoder.layers", "blocks", "layer")
_SAFE = {"trust_remote_code": False, "local_files_only": True}
MAX_JSON_BYTES = 64 << 20  # config.json / tokenizer_config.json / the shard index: real ones are KiB to a few MiB
TASKS = ("causal_lm", "text_classification")


# --------------------------------------------------------------------------- model directories

def _as_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelFormatError(f"'{path.name}' is not a model directory (expected a folder with config.json and "
                               "*.safetensors weights)")
    return path


def _scrub(exc: Exception, path: Path) -> str:
    """A library's error message without the server's folder in it (errors reach users)."""
    text = str(exc)
    for full in {str(path), str(path.resolve())}:
        text = text.replace(full, path.name)
    return text


def _refuse_pickles(path: Path) -> None:
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.suffix.lower() in PICKLE_SUFFIXES:
            rel = file.relative_to(path).as_posix()
            raise ModelFormatError(
                f"the model directory contains '{rel}', a pickle-format file; pickled files are refused because "
                "loading them can run arbitrary code. Convert the weights to safetensors (e.g. "
                "model.save_pretrained(dir) in transformers >= 4.35 writes model.safetensors) and remove "
                f"'{rel}' from the upload"
            )


def _read_json(path: Path, name: str) -> dict:
    """A JSON object file of the model directory, read before transformers parses it: at most
    MAX_JSON_BYTES, nesting and integers bounded (distill.safe_json), so a hostile config is a
    ModelFormatError naming the file rather than a RecursionError or an out-of-memory."""
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ModelFormatError(f"{name} is larger than {MAX_JSON_BYTES} bytes")
        data = safe_json.loads(path.read_bytes())
    except FileNotFoundError:
        raise ModelFormatError(f"the model directory has no {name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{name} is not valid JSON: {exc}") from None
    except safe_json.JSONLimitError as exc:
        raise ModelFormatError(f"{name}: {exc}") from None
    except OSError as exc:
        raise ModelFormatError(f"cannot read {name}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{name} must hold a JSON object")
    return data


def _refuse_custom_code(raw: dict, name: str) -> None:
    if "auto_map" in raw:
        raise ModelFormatError(
            f"{name} has an 'auto_map' entry: the model needs custom Python code shipped with it, which is never "
            "run here (trust_remote_code is off). Use a model whose architecture is built into transformers"
        )


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files that hold the weights, checked to exist (shards via the index)."""
    index_path = path / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path, INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(f"{INDEX_FILE} has no 'weight_map' object")
        shards: dict[str, list[str]] = {}
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", "..") \
                    or not shard.endswith(".safetensors"):
                raise ModelFormatError(f"{INDEX_FILE} maps tensor '{tensor}' to an invalid file name {shard!r}",
                                       tensor=tensor)
            shards.setdefault(shard, []).append(tensor)
        for shard, tensors in sorted(shards.items()):
            if not (path / shard).is_file():
                raise ModelFormatError(f"weight shard '{shard}' listed in {INDEX_FILE} is missing "
                                       f"({len(tensors)} tensors, e.g. '{tensors[0]}')", tensor=tensors[0])
        _check_index_tensors(path, shards)
        return [path / shard for shard in sorted(shards)]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        raise ModelFormatError(f"expected the weights in {WEIGHTS_FILE} (or shards listed in {INDEX_FILE}); "
                               f"found only {', '.join(found)}")
    raise ModelFormatError(f"the model directory has no safetensors weights ({WEIGHTS_FILE} or {INDEX_FILE}); "
                           "save the model with save_pretrained() in a recent transformers")


def _header(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header, without reading the data."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            return {name: list(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFormatError(f"'{file.name}' is not a readable safetensors file: {exc}") from None


def _check_index_tensors(path: Path, shards: dict[str, list[str]]) -> None:
    for shard, tensors in sorted(shards.items()):
        present = _header(path / shard)
        for tensor in tensors:
            if tensor not in present:
                raise ModelFormatError(f"{INDEX_FILE} puts tensor '{tensor}' in '{shard}', which does not hold it",
                                       tensor=tensor)


def _config_value(config: Any, names: tuple[str, ...]) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def context_length(config: Any) -> int | None:
    """The longest sequence the model's position embeddings cover (None if the config doesn't say)."""
    return _config_value(config, CONTEXT_FIELDS)


def layer_count(config: Any) -> int | None:
    """The number of transformer blocks, whatever the family calls the field."""
    return _config_value(config, LAYER_COUNT_FIELDS)


def _task(architectures: list[str] | None) -> str | None:
    for name in architectures or []:
        if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
            return "causal_lm"
        if name.endswith("ForSequenceClassification"):
            return "text_classification"
    return None


def _has_tokenizer_files(path: Path) -> bool:
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def _check_dir(path: str | Path) -> tuple[Path, dict, list[Path]]:
    """The safety and structure checks every entry point runs: (dir, raw config, weight files)."""
    path = _as_dir(path)
    _refuse_pickles(path)
    if not (path / CONFIG_FILE).is_file():
        raise ModelFormatError(f"the model directory has no {CONFIG_FILE}")
    raw = _read_json(path / CONFIG_FILE, CONFIG_FILE)
    _refuse_custom_code(raw, CONFIG_FILE)
    if (path / "tokenizer_config.json").is_file():
        _refuse_custom_code(_read_json(path / "tokenizer_config.json", "tokenizer_config.json"), "tokenizer_config.json")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ModelFormatError(f"{CONFIG_FILE} has no 'model_type'")
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelFormatError(f"model_type '{model_type}' in {CONFIG_FILE} is not supported by the installed "
                               "transformers (custom architectures are not run)")
    return path, raw, _weight_files(path)


def _load_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **_SAFE)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; all mean "bad config"
        raise ModelFormatError(f"{CONFIG_FILE} could not be loaded: {_scrub(exc, Path(path))}") from None


def _raw_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **_SAFE)
    except Exception as exc:  # noqa: BLE001
        raise ModelFormatError(f"the tokenizer files could not be loaded: {_scrub(exc, Path(path))}") from None


def inspect_model_dir(path: str | Path, check_tokenizer: bool = True) -> dict:
    """Validate a Hugging Face model directory and describe it, without loading the weights.

    Runs the safety checks (module docstring), parses config.json, checks that every
    safetensors header parses (and, when sharded, that every shard in the index exists and
    holds the tensors the index says) and counts the stored parameters from the shapes (tied
    weights are stored, and counted, once). With ``check_tokenizer`` the tokenizer, if there
    is one, is loaded to get its length. Returns::

        {"format": "hf", "model_type", "architectures", "vocab_size", "tokenizer_vocab_size",
         "has_tokenizer", "has_chat_template", "num_layers", "hidden_size", "num_attention_heads", "parameters",
         "task": "causal_lm" | "text_classification" | None, "num_labels"}

    ``num_labels`` is the config's for a text_classification model, else None.
    """
    path, raw, weight_files = _check_dir(path)
    parameters = 0
    for file in weight_files:
        for name, shape in _header(file).items():
            parameters += math.prod(shape)
    config = _load_config(path)
    architectures = list(getattr(config, "architectures", None) or raw.get("architectures") or [])
    task = _task(architectures)
    has_tokenizer = _has_tokenizer_files(path)
    tokenizer_vocab_size = None
    has_chat_template = (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file()
    if has_tokenizer and (path / "tokenizer_config.json").is_file():
        has_chat_template = has_chat_template or bool(
            _read_json(path / "tokenizer_config.json", "tokenizer_config.json").get("chat_template"))
    if has_tokenizer and check_tokenizer:
        tokenizer = _raw_tokenizer(path)
        tokenizer_vocab_size = len(tokenizer)
        has_chat_template = has_chat_template or bool(getattr(tokenizer, "chat_template", None))
    return {
        "format": "hf",
        "model_type": config.model_type,
        "architectures": architectures,
        "vocab_size": _config_value(config, ("vocab_size",)),
        "tokenizer_vocab_size": tokenizer_vocab_size,
        "has_tokenizer": has_tokenizer,
        "has_chat_template": has_chat_template,
        "num_layers": _config_value(config, LAYER_COUNT_FIELDS),
        "hidden_size": _config_value(config, HIDDEN_SIZE_FIELDS),
        "num_attention_heads": _config_value(config, ("num_attention_heads", "n_head", "n_heads", "num_heads")),
        "parameters": parameters,
        "task": task,
        "num_labels": getattr(config, "num_labels", None) if task == "text_classification" else None,
        "context_length": context_length(config),
    }


# --------------------------------------------------------------------------- loading

def fuse_activations(model: nn.Module) -> int:
    """Swap transformers' Python-level tanh-GELU modules (``NewGELUActivation``, GPT-2's ``gelu_new``, and
    ``FastGELUActivation``: five elementwise ops forward, and their autograd backward) for the one
    fused kernel computing the same function, ``F.gelu(approximate="tanh")`` (transformers' own
    ``GELUTanh``, which its docs call equivalent up to rounding). In place, in memory only: a saved model
    keeps its config and weights (activations hold none). Returns how many were swapped."""
    from transformers import activations

    slow = tuple(c for c in (getattr(activations, "NewGELUActivation", None),
                             getattr(activations, "FastGELUActivation", None)) if c is not None)
    fused = getattr(activations, "GELUTanh", None)
    if not slow or fused is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in slow:
                setattr(parent, name, fused())
                swapped += 1
    return swapped


def _ensure_pad_token(tokenizer) -> None:
    """Give a tokenizer without a pad token one (eos, else unk), in memory only."""
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
        if fallback is None:
            raise ModelFormatError("the tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback


def load_tokenizer(path: str | Path):
    """The directory's tokenizer (AutoTokenizer, no remote code); pad = eos (or unk) if it had none."""
    path, _, _ = _check_dir(path)
    if not _has_tokenizer_files(path):
        raise ModelFormatError("the model directory has no tokenizer (tokenizer.json or tokenizer_config.json "
                               "with its vocabulary files); save it with tokenizer.save_pretrained(dir)")
    tokenizer = _raw_tokenizer(path)
    _ensure_pad_token(tokenizer)
    return tokenizer


def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise SpecError(f"unknown dtype {dtype!r}", param="dtype")
    return resolved


def _from_pretrained(auto_class, path: Path, what: str, **kwargs):
    try:
        model, info = auto_class.from_pretrained(path, use_safetensors=True, output_loading_info=True,
                                                 **_SAFE, **kwargs)
    except DistillError:
        raise
    except Exception as exc:  # noqa: BLE001 - shape mismatches, bad headers, unsupported classes
        raise ModelFormatError(f"the model could not be loaded as a {what}: {_scrub(exc, Path(path))}") from None
    return model, info


def _missing_error(missing: list[str], what: str) -> ModelFormatError:
    first = sorted(missing)[0]
    return ModelFormatError(f"the weights lack tensor '{first}' ({len(missing)} missing) needed by the {what}; "
                            f"the safetensors files do not match {CONFIG_FILE}", tensor=first)


def load_causal_lm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None):
    """A causal LM (AutoModelForCausalLM) in eval mode on ``device``.

    ``dtype`` None loads float32; pass a torch dtype (or its name, or "auto" for the stored
    dtype) to override. Refuses a classification checkpoint and weights that lack tensors."""
    info = inspect_model_dir(path, check_tokenizer=False)
    if info["task"] == "text_classification":
        raise ModelFormatError(f"the model is a text classifier ({', '.join(info['architectures'])}), "
                               "not a causal language model")
    from transformers import AutoModelForCausalLM

    model, loading = _from_pretrained(AutoModelForCausalLM, Path(path), "causal language model", dtype=_dtype(dtype))
    if loading.get("missing_keys"):
        raise _missing_error(list(loading["missing_keys"]), "causal language model")
    return model.to(device).eval()


def load_classifier(path: str | Path, device: str | torch.device = "cpu", num_labels: int | None = None):
    """A sequence classifier (AutoModelForSequenceClassification) in float32 eval mode on ``device``.

    The checkpoint may be a classifier, or a base/LM checkpoint of a family that has a
    classification class (the head is then freshly initialised). ``num_labels`` different
    from the checkpoint's re-initialises the head. Missing body weights are refused. If
    the config has no pad token id, the tokenizer's is used (GPT-style classifiers need it)."""
    info = inspect_model_dir(path, check_tokenizer=False)
    if num_labels is not None and (not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1):
        raise SpecError(f"num_labels must be a positive integer, got {num_labels!r}", param="num_labels")
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    new_head = info["task"] != "text_classification"
    if num_labels is not None and num_labels != info["num_labels"]:
        kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
        new_head = True
    from transformers import AutoModelForSequenceClassification

    model, loading = _from_pretrained(AutoModelForSequenceClassification, Path(path), "text classifier", **kwargs)
    missing = list(loading.get("missing_keys") or [])
    prefix = getattr(model, "base_model_prefix", "")
    body_missing = [k for k in missing if prefix and k.startswith(prefix + ".")]
    if body_missing or (missing and not new_head):
        raise _missing_error(body_missing or missing, "text classifier")
    if model.config.pad_token_id is None and _has_tokenizer_files(Path(path)):
        tokenizer = load_tokenizer(path)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device).eval()


# --------------------------------------------------------------------------- students

def transformer_layers(model: nn.Module) -> tuple[nn.Module, str]:
    """``(parent, attribute)`` such that ``getattr(parent, attribute)`` is the ModuleList of
    transformer blocks: GPT-2 ``transformer.h``, Llama/Qwen/Mistral ``model.layers``, BERT
    ``bert.encoder.layer``, DistilBERT ``distilbert.transformer.layer``, ...; otherwise the
    ModuleList with the most parameters whose length is the config's layer count."""
    config = getattr(model, "config", None)
    expected = _config_value(config, LAYER_COUNT_FIELDS) if config is not None else None
    base = getattr(model, "base_model", model)
    for dotted in KNOWN_LAYER_PATHS:
        *parents, attribute = dotted.split(".")
        parent = base
        for name in parents:
            parent = getattr(parent, name, None)
            if not isinstance(parent, nn.Module):
                break
        else:
            blocks = getattr(parent, attribute, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0 and (expected is None or len(blocks) == expected):
                return parent, attribute
    best: tuple[int, nn.Module, str] | None = None
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.ModuleList) and len(child) > 0 and (expected is None or len(child) == expected):
                size = sum(p.numel() for p in child.parameters())
                if best is None or size > best[0]:
                    best = (size, module, child_name)
    if best is None:
        raise SpecError(f"cannot find the transformer blocks of this {type(model).__name__}; deriving a student "
                        "by layer selection is not supported for it", param="student.derive")
    return best[1], best[2]


def evenly_spaced_layers(total: int, k: int) -> list[int]:
    """``k`` of ``total`` layer indices spread evenly, first and last included:
    ``round(i * (total - 1) / (k - 1))`` for i in 0..k-1 (halves round up), e.g. 6 of 12 ->
    [0, 2, 4, 7, 9, 11], 3 of 12 -> [0, 6, 11]. k = 1 keeps layer 0; k = total keeps all."""
    if k == 1:
        return [0]
    return [math.floor(i * (total - 1) / (k - 1) + 0.5) for i in range(k)]


def _layer_choice(total: int, layers: list[int] | None, num_layers: int | None) -> list[int]:
    if (layers is None) == (num_layers is None):
        raise SpecError("give exactly one of 'layers' (teacher layer indices) or 'num_layers'",
                        param="student.derive.layers")
    if num_layers is not None:
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= total:
            raise SpecError(f"num_layers must be an integer from 1 to the teacher's {total} layers, got {num_layers!r}",
                            param="student.derive.num_layers")
        return evenly_spaced_layers(total, num_layers)
    if not isinstance(layers, (list, tuple)) or not layers:
        raise SpecError("layers must be a non-empty list of teacher layer indices", param="student.derive.layers")
    for index in layers:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < total:
            raise SpecError(f"layer index {index!r} is not in 0..{total - 1} (the teacher has {total} layers)",
                            param="student.derive.layers")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise SpecError(f"layers must be strictly increasing (no repeats), got {list(layers)}",
                        param="student.derive.layers")
    return list(layers)


def _set_layer_count(config: Any, total: int, kept: list[int]) -> None:
    # Per-layer lists first (layer_types, ...): strict configs check them against the count.
    for key, value in list(config.to_dict().items()):
        if "layer" in key and isinstance(value, list) and len(value) == total:
            setattr(config, key, [value[i] for i in kept])
    attribute_map = getattr(config, "attribute_map", {}) or {}
    for name in LAYER_COUNT_FIELDS:
        if name in attribute_map:
            continue  # an alias: setting the real field below covers it
        if getattr(config, name, None) == total:
            setattr(config, name, len(kept))
    if _config_value(config, LAYER_COUNT_FIELDS) != len(kept):
        raise SpecError(f"cannot set the layer count of a {type(config).__name__}", param="student.derive")


def _renumber(blocks: nn.ModuleList) -> None:
    """Set per-layer index attributes (e.g. attention ``layer_idx``, the KV-cache slot) to the new position."""
    for position, block in enumerate(blocks):
        for module in block.modules():
            for attribute in LAYER_INDEX_ATTRIBUTES:
                value = getattr(module, attribute, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(module, attribute, position)


def _check_rebuilds(student: nn.Module) -> None:
    """The config alone must rebuild the student's structure (what save/load relies on): same
    tensor names and shapes, same layer indices. Built on the meta device, so it costs no memory."""
    with torch.device("meta"):
        fresh = type(student)(copy.deepcopy(student.config))
    mine = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))
        raise SpecError(f"the derived student does not match its config (first difference: {diff[0][0]})",
                        param="student.derive")
    fresh_modules = dict(fresh.named_modules())
    for name, module in student.named_modules():
        other = fresh_modules.get(name)
        for attribute in LAYER_INDEX_ATTRIBUTES:
            if other is not None and getattr(module, attribute, None) != getattr(other, attribute, None):
                raise SpecError(f"the derived student's {name}.{attribute} does not match a reload",
                                param="student.derive")


def _check_forward(model: nn.Module) -> None:
    vocab = _config_value(model.config, ("vocab_size",)) or 2
    device = next(model.parameters()).device
    input_ids = (torch.arange(4, device=device) % vocab).unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"the derived student does not run: {exc}", param="student.derive") from None
    finally:
        model.train(was_training)
    if logits.shape[0] != 1:
        raise SpecError("the derived student returned logits of an unexpected shape", param="student.derive")


def derive_student(teacher: nn.Module, layers: list[int] | None = None, num_layers: int | None = None) -> nn.Module:
    """A smaller student initialised from ``teacher`` (DistilBERT-style): the teacher's
    embeddings, the chosen transformer blocks in order, and its final norm and head.

    Give ``layers`` (strictly increasing teacher layer indices) or ``num_layers`` (k layers
    spread by :func:`evenly_spaced_layers`). The teacher is not modified; only the kept
    blocks are copied. The student's config gets the new layer count (and per-layer lists
    such as ``layer_types`` are subset), its blocks' ``layer_idx`` become 0..k-1, and it is
    checked to rebuild from its config (so save/load round-trips) and to run forward.
    Raises SpecError (param ``student.derive.layers`` / ``student.derive.num_layers`` /
    ``student.derive``) for bad choices and unsupported models (encoder-decoder)."""
    config = getattr(teacher, "config", None)
    if config is None:
        raise SpecError("derive needs a transformers model with a config", param="student.derive")
    if getattr(config, "is_encoder_decoder", False):
        raise SpecError(f"deriving a student by layer selection is not supported for encoder-decoder models "
                        f"({config.model_type})", param="student.derive")
    parent, attribute = transformer_layers(teacher)
    blocks: nn.ModuleList = getattr(parent, attribute)
    total = len(blocks)
    kept = _layer_choice(total, layers, num_layers)
    parent_path = next(name for name, module in teacher.named_modules() if module is parent)
    # Swap in only the kept blocks while copying, so the teacher's other blocks aren't duplicated.
    setattr(parent, attribute, nn.ModuleList([blocks[i] for i in kept]))
    try:
        student = copy.deepcopy(teacher)
    finally:
        setattr(parent, attribute, blocks)
    student_parent = student.get_submodule(parent_path) if parent_path else student
    _renumber(getattr(student_parent, attribute))
    _set_layer_count(student.config, total, kept)
    _check_rebuilds(student)
    _check_forward(student)
    return student


_FORBIDDEN_OVERRIDES = {"model_type", "auto_map", "architectures", "transformers_version", "_name_or_path"}


def student_from_config(teacher_config: Any, overrides: dict, task: str) -> nn.Module:
    """A freshly initialised (float32) model of the teacher's family: the teacher's config with
    ``overrides`` applied (e.g. ``{"num_hidden_layers": 4, "hidden_size": 256}``; aliases such as
    GPT-2's ``num_hidden_layers`` -> ``n_layer`` work). ``task`` is "causal_lm" or
    "text_classification" (``num_labels`` may be overridden). Keys the config does not have
    are refused (SpecError param ``student.architecture.config.<key>``); when the layer count
    changes, per-layer lists (``layer_types``) are regenerated, and when the width or head
    count changes a ``head_dim`` that followed them is re-derived."""
    if task not in TASKS:
        raise SpecError(f"task must be one of {', '.join(TASKS)}, got {task!r}", param="task")
    if not isinstance(overrides, dict):
        raise SpecError("the config overrides must be an object", param="student.architecture.config")
    base = teacher_config.to_dict()
    attribute_map = getattr(teacher_config, "attribute_map", {}) or {}
    data = dict(base)
    for key, value in overrides.items():
        param = f"student.architecture.config.{key}"
        if key in _FORBIDDEN_OVERRIDES:
            raise SpecError(f"'{key}' cannot be overridden: the student is of the teacher's family", param=param)
        if key == "num_labels":
            data.pop("id2label", None)
            data.pop("label2id", None)
            data["num_labels"] = value
            continue
        real = attribute_map.get(key, key)
        if real not in base:
            raise SpecError(f"unknown config key '{key}' for a {teacher_config.model_type} model", param=param)
        data[real] = value
    overridden = {attribute_map.get(k, k) for k in overrides}
    old_layers = _config_value(teacher_config, LAYER_COUNT_FIELDS)
    new_layers = next((data[f] for f in LAYER_COUNT_FIELDS if f in data and f in overridden), old_layers)
    if new_layers != old_layers:
        for key, value in base.items():
            if "layer" in key and isinstance(value, list) and len(value) == old_layers and key not in overridden:
                data.pop(key)  # regenerated by the config class for the new count
    head_dim = base.get("head_dim")
    heads_field = attribute_map.get("num_attention_heads", "num_attention_heads")
    width_field = attribute_map.get("hidden_size", "hidden_size")
    if head_dim is not None and "head_dim" not in overridden and ({heads_field, width_field} & overridden) \
            and base.get(heads_field) and base.get(width_field) and base[width_field] // base[heads_field] == head_dim:
        data["head_dim"] = None
    data.pop("dtype", None)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = type(teacher_config).from_dict(data)
        auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
        return auto.from_config(config, trust_remote_code=False, dtype=torch.float32)
    except DistillError:
        raise
    except Exception as exc:  # noqa: BLE001 - config validation errors come in many types
        raise SpecError(f"the student config is invalid: {exc}", param="student.architecture.config") from None


def student_parameters_from_config(teacher_dir: str | Path, overrides: dict, task: str) -> int:
    """Parameters of ``student_from_config(teacher's config, overrides, task)``, counted on the
    meta device: no memory and no initialisation, so a submit-time size check is cheap."""
    config = _load_config(_as_dir(teacher_dir))
    with torch.device("meta"):
        return count_parameters(student_from_config(config, overrides, task))


# --------------------------------------------------------------------------- vocabularies

def _specials(tokenizer) -> set[str]:
    return set(getattr(tokenizer, "all_special_tokens", []) or [])


def shared_vocab_size(teacher_tokenizer, student_tokenizer, teacher_vocab_rows: int, student_vocab_rows: int) -> int:
    """The vocabulary size both models' logits are sliced to (``logits[..., :shared]``) for
    token-level distillation, which needs one tokenizer on both sides.

    The tokenizers must have the same token -> id map (``get_vocab()``, added tokens included),
    the same length and the same set of special tokens (which of them is eos/pad may differ:
    a chat model's eos is still the same token id). Then ``len(tokenizer)`` is returned; each
    model's embedding rows (``*_vocab_rows``) must cover it — rows beyond it (a teacher padded
    to a multiple of 64, like Qwen's 152064 rows for 151936 tokens) are cut off by the slice.

    Raises VocabularyMismatch (param ``student``) when the tokenizers differ, and
    ModelFormatError when a model has fewer rows than its tokenizer has tokens."""
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    difference = None
    if teacher_vocab != student_vocab or len(teacher_tokenizer) != len(student_tokenizer):
        teacher_by_id = {i: t for t, i in teacher_vocab.items()}
        student_by_id = {i: t for t, i in student_vocab.items()}
        for i in sorted(set(teacher_by_id) | set(student_by_id)):
            if teacher_by_id.get(i) != student_by_id.get(i):
                difference = (f"first difference at id {i}: teacher {teacher_by_id.get(i)!r}, "
                              f"student {student_by_id.get(i)!r}")
                break
        difference = (f"the teacher's tokenizer has {len(teacher_tokenizer)} tokens and the student's "
                      f"{len(student_tokenizer)}" + (f"; {difference}" if difference else ""))
    elif _specials(teacher_tokenizer) != _specials(student_tokenizer):
        only = sorted(_specials(teacher_tokenizer) ^ _specials(student_tokenizer))
        difference = f"their special tokens differ ({', '.join(map(repr, only[:5]))})"
    if difference:
        raise VocabularyMismatch(
            f"token-level distillation needs the teacher and the student to share one tokenizer, but they differ: "
            f"{difference}. Use the teacher's tokenizer for the student, or use \"method\": \"sequence\" "
            "(the student learns from teacher-generated text), which works across tokenizers",
            param="student",
        )
    shared = len(teacher_tokenizer)
    for who, rows in (("teacher", teacher_vocab_rows), ("student", student_vocab_rows)):
        if rows < shared:
            raise ModelFormatError(f"the {who}'s embedding matrix has {rows} rows but its tokenizer has {shared} "
                                   "tokens; the model and tokenizer do not belong together", param=who)
    return shared


# --------------------------------------------------------------------------- output

def save_hf(model: nn.Module, tokenizer, out_dir: str | Path, card_markdown: str) -> Path:
    """Write a loadable model directory: weights as safetensors (save_pretrained), the
    tokenizer, and ``README.md`` (the model card). Returns the directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers >= 5 writes safetensors only
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / "README.md").write_text(card_markdown, encoding="utf-8")
    _refuse_pickles(out_dir)  # never hand out a pickle, whatever the library version did
    if not (out_dir / WEIGHTS_FILE).is_file() and not (out_dir / INDEX_FILE).is_file():
        raise ModelFormatError("save_pretrained wrote no safetensors weights")
    return out_dir


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
        if len(text) > 12:
            text = format(value, ".6g")
    elif isinstance(value, (list, tuple)):
        text = ", ".join(_cell(v) for v in value)
    elif value is None:
        text = "—"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _yaml_string(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def _training_section(history: list[dict]) -> list[str]:
    """The loss per epoch (what the service's report draws as curves), as a table."""
    if not history:
        return []
    lines = ["", "## Training", "", f"{len(history)} epochs.", "",
             "| Epoch | Step | Training loss | Validation loss |", "| --- | --- | --- | --- |"]
    lines += [f"| {_cell(r.get('epoch'))} | {_cell(r.get('step'))} | {_cell(r.get('train_loss'))} | "
              f"{_cell(r.get('validation_loss'))} |" for r in history]
    return lines


def model_card(info: dict) -> str:
    """A Markdown model card with YAML front matter (``library_name: transformers``, ``tags``,
    ``base_model``, ``pipeline_tag``) and sections for the teacher, data, method,
    hyperparameters (table) and evaluation (table). ``info`` keys: teacher, student, task,
    method, loss, data, hyperparameters (dict), history (the per-epoch records: a loss table),
    evaluation (dict; a dict of dicts, e.g. ``{"teacher": {...}, "student": {...}}``, becomes one
    column per key)."""
    teacher = info.get("teacher") or "unknown"
    student = info.get("student") or "distilled-student"
    task = info.get("task")
    pipeline = {"causal_lm": "text-generation", "text_classification": "text-classification"}.get(task)
    front = ["---", "library_name: transformers", "tags:", "- distillation"]
    front.append(f"base_model: {_yaml_string(teacher)}")
    if pipeline:
        front.append(f"pipeline_tag: {pipeline}")
    front.append("---")
    lines = [*front, "", f"# {student}", "",
             f"A student model distilled from **{teacher}**" + (f" for {task.replace('_', ' ')}" if task else "") + ".",
             "", "## Teacher", "", f"- Teacher: `{teacher}`"]
    lines += ["", "## Data", ""]
    data = info.get("data")
    if isinstance(data, dict):
        lines += [f"- {k}: {_cell(v)}" for k, v in _flatten(data).items()]
    else:
        lines.append(f"- {_cell(data) if data is not None else 'not recorded'}")
    lines += ["", "## Method", "", f"- Method: {_cell(info.get('method'))}", f"- Loss: {_cell(info.get('loss'))}"]
    if task:
        lines.append(f"- Task: {task}")
    lines += ["", "## Hyperparameters", "", "| Hyperparameter | Value |", "| --- | --- |"]
    for key, value in _flatten(info.get("hyperparameters") or {}).items():
        lines.append(f"| {_cell(key)} | {_cell(value)} |")
    lines += _training_section(info.get("history") or [])
    lines += ["", "## Evaluation", ""]
    evaluation = info.get("evaluation") or {}
    if evaluation and all(isinstance(v, dict) for v in evaluation.values()):
        columns = list(evaluation)
        metrics: list[str] = []
        for column in columns:
            for metric in _flatten(evaluation[column]):
                if metric not in metrics:
                    metrics.append(metric)
        lines.append("| Metric | " + " | ".join(_cell(c) for c in columns) + " |")
        lines.append("| --- |" + " --- |" * len(columns))
        for metric in metrics:
            row = [_cell(_flatten(evaluation[c]).get(metric)) for c in columns]
            lines.append(f"| {_cell(metric)} | " + " | ".join(row) + " |")
    elif evaluation:
        lines += ["| Metric | Value |", "| --- | --- |"]
        lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in _flatten(evaluation).items()]
    else:
        lines.append("No evaluation was recorded.")
    lines += ["", "## Usage", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer" if task != "text_classification"
              else "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
              "", 'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
              ("model = AutoModelForCausalLM" if task != "text_classification"
               else "model = AutoModelForSequenceClassification") + '.from_pretrained("path/to/this/folder")',
              "```", ""]
    return "\n".join(lines)

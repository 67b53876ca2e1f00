"""LoRA students (PEFT): train low-rank adapters on a frozen transformers student.

    apply_lora(model, lora, task)   LoRA layers in place of the student's linear layers; every
                                    other weight frozen (a classifier's head keeps training)
    train as usual                  the loop optimizes requires_grad parameters only
    export_lora(model, dest, ...)   dest/: the adapters merged into the weights (a plain
                                    transformers directory, loads without peft);
                                    dest-adapter/: the PEFT adapter folder (adapter_config.json,
                                    adapter_model.safetensors) for PeftModel.from_pretrained

The student stays the transformers model it was (``GPT2LMHeadModel``, ...), its linear
layers now PEFT ``lora.Linear`` modules: ``get_output_embeddings``, ``base_model`` (the
body), ``generate`` and safetensors ``save_model``/``load_model`` (step checkpoints) work as
before. The PEFT wrapper, needed to save and merge the adapters, rides along in
:class:`LoraState` on the model.

Parameters: ``trainable`` counts what the run trains (adapters, plus a classifier's head);
``total`` counts the merged student, i.e. what is downloaded and served.
"""

from __future__ import annotations

import copy
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import SpecError
from .models import count_parameters

if TYPE_CHECKING:
    from .spec import LoraSpec

__all__ = ["LoraState", "apply_lora", "lora_state", "is_lora", "trainable_parameters", "student_parameters",
           "lora_details", "describe", "merged_copy", "save_adapter", "export_lora", "adapter_dir", "adapter_card",
           "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]

ADAPTER_SUFFIX = "-adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_STATE = "_distill_lora"  # the attribute holding a LoraState on the adapted student
_PEFT_TASK = {"causal_lm": "CAUSAL_LM", "text_classification": "SEQ_CLS"}


@dataclass
class LoraState:
    peft_model: Any
    """The PEFT wrapper around the student (``peft_model.base_model.model`` is the student)."""
    settings: dict
    """r, alpha, dropout and target_modules as the spec gave them."""
    adapted_modules: list[str]
    """The modules that got LoRA layers."""
    trained_modules: list[str]
    """Modules trained in full beside the adapters (a classifier's head)."""
    trainable_parameters: int
    total_parameters: int
    """The merged student's parameters (what the download holds)."""
    merged: bool = False


def lora_state(model: nn.Module) -> LoraState | None:
    return model.__dict__.get(_STATE)


def is_lora(model: nn.Module) -> bool:
    return lora_state(model) is not None


def _head_modules(model: nn.Module) -> list[str]:
    """A sequence classifier's head: its top-level children with weights outside the body
    (``classifier``, ``score``, DistilBERT's ``pre_classifier`` + ``classifier``, ...)."""
    body = getattr(model, "base_model_prefix", "")
    return [name for name, child in model.named_children()
            if name != body and any(True for _ in child.parameters())]


def apply_lora(model: nn.Module, lora: "LoraSpec", task: str) -> nn.Module:
    """Give ``model`` LoRA adapters (in place) and freeze everything else; returns ``model``.

    The adapters' A matrices are drawn from torch's global RNG (seeded by the run), so a
    resumed run rebuilds the same student before its checkpoint is loaded. Raises SpecError
    (param ``student.lora.target_modules``) for module names the student lacks or can't adapt."""
    from peft import LoraConfig, get_peft_model

    if task not in _PEFT_TASK:
        raise SpecError(f"LoRA is for transformers students (task causal_lm or text_classification), not {task}",
                        param="student.lora")
    total = count_parameters(model)
    heads = _head_modules(model) if task == "text_classification" else []
    if task == "text_classification" and not heads:
        raise SpecError("this classifier has no head outside its body to train beside the adapters",
                        param="student.lora")
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type=_PEFT_TASK[task], modules_to_save=list(heads) or None)  # peft extends it
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D: "fan_in_fan_out is set to True", as it should be
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(model, config)
    except (ValueError, TypeError) as exc:  # names not found, or a module type LoRA can't wrap
        raise SpecError(f"student.lora.target_modules: {exc}", param="student.lora.target_modules") from None
    adapted = sorted(peft_model.base_model.targeted_module_names)
    _refuse_tied_head(model, adapted)
    state = LoraState(peft_model=peft_model, settings=lora.model_dump(), adapted_modules=adapted,
                      trained_modules=heads,
                      trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
                      total_parameters=total)
    model.__dict__[_STATE] = state  # not a submodule: the state dict (and checkpoints) stay the student's
    return model


def _refuse_tied_head(model: nn.Module, adapted: list[str]) -> None:
    """An output head tied to the input embeddings can't take a merged adapter: merging
    would change the embeddings too, so the merged model would not be the trained one."""
    head = model.get_output_embeddings()
    names = {name for name, module in model.named_modules() if module is head} if head is not None else set()
    embeddings = model.get_input_embeddings()
    if names & set(adapted) and head is not None and embeddings is not None \
            and head.base_layer.weight is embeddings.weight:
        raise SpecError(f"the output head {sorted(names)[0]!r} shares its weights with the input embeddings; "
                        "leave it out of student.lora.target_modules", param="student.lora.target_modules")


def trainable_parameters(model: nn.Module) -> int:
    state = lora_state(model)
    return state.trainable_parameters if state else sum(p.numel() for p in model.parameters() if p.requires_grad)


def student_parameters(model: nn.Module) -> int:
    """The student's parameters as downloaded: for a LoRA student, its merged size."""
    state = lora_state(model)
    return state.total_parameters if state else count_parameters(model)


def lora_details(model: nn.Module) -> dict | None:
    """What a model record shows of the adapters, or None for a student trained in full."""
    state = lora_state(model)
    if state is None:
        return None
    return {**state.settings, "adapted_modules": len(state.adapted_modules), "trained_modules": state.trained_modules,
            "trainable_parameters": state.trainable_parameters, "total_parameters": state.total_parameters}


def describe(model: nn.Module) -> str | None:
    """One line for the model card."""
    state = lora_state(model)
    if state is None:
        return None
    s = state.settings
    targets = s["target_modules"] if isinstance(s["target_modules"], str) else ", ".join(s["target_modules"])
    head = f" + {', '.join(state.trained_modules)} trained in full" if state.trained_modules else ""
    return (f"LoRA r={s['r']}, alpha={s['alpha']:g}, dropout={s['dropout']:g}, targets: {targets} "
            f"({len(state.adapted_modules)} modules{head}); {state.trainable_parameters} of "
            f"{state.total_parameters} parameters trained")


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of a LoRA student with the adapters merged in (as it will be downloaded);
    ``model`` itself is untouched. Costs one more copy of the student in memory."""
    state = lora_state(model)
    if state is None or state.merged:
        return model
    copied = copy.deepcopy(model)  # the state's PEFT wrapper is copied with it, pointing at the copy
    merged = lora_state(copied).peft_model.merge_and_unload()
    del merged.__dict__[_STATE]
    return merged


def adapter_dir(model_dir: Path) -> Path:
    """Where the adapter folder of an exported model directory goes: ``final`` → ``final-adapter``."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + ADAPTER_SUFFIX)


def save_adapter(model: nn.Module, folder: Path, readme: str = "") -> Path:
    """The PEFT adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ README).
    ``base_model_name_or_path`` is left empty: the student's path is a server path, never shown."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = lora_state(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = get_peft_model_state_dict(state.peft_model)
    # Own copies: safetensors refuses aliased tensors, and the checkpoint layout is PEFT's.
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()},
              str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(state.peft_model.peft_config["default"])
    config.base_model_name_or_path = None
    config.revision = None
    config.inference_mode = True
    config.save_pretrained(str(folder))
    settings = json.loads((folder / ADAPTER_CONFIG).read_text())
    if settings.get("base_model_name_or_path") is not None:  # never a server path, whatever peft filled in
        settings["base_model_name_or_path"] = None
        (folder / ADAPTER_CONFIG).write_text(json.dumps(settings, indent=2, sort_keys=True))
    if readme:
        (folder / "README.md").write_text(readme, encoding="utf-8")
    return folder


def export_lora(model: nn.Module, dest: Path, tokenizer=None, card: str = "") -> Path:
    """Write the adapter folder (:func:`adapter_dir` of ``dest``), then merge the adapters into
    the student in place and save it at ``dest`` as a plain transformers directory. The
    student is merged afterwards (no more training); returns ``dest``."""
    from .hf import save_hf

    state = lora_state(model)
    if not state.merged:
        save_adapter(model, adapter_dir(dest), adapter_card(model))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state.peft_model.merge_and_unload()  # returns ``model``: LoRA layers replaced by merged weights
        state.merged = True
    return save_hf(model, tokenizer, dest, card)


def adapter_card(model: nn.Module) -> str:
    """The adapter folder's README: what it is and how to load it."""
    return "\n".join(["---", "library_name: peft", "tags:", "- distillation", "- lora", "---", "",
                      "# LoRA adapter of a distilled student", "", f"- {describe(model)}", "",
                      "It applies on top of the student the job started from (the uploaded student, or the layers",
                      "derived from the teacher). The model download beside it has these adapters merged in.", "",
                      "```python", "from peft import PeftModel", "",
                      'model = PeftModel.from_pretrained(base_student, "path/to/this/folder")',
                      "merged = model.merge_and_unload()  # the weights of the merged download", "```", ""])

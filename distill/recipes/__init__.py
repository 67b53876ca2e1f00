"""Task recipes: one file per (task, method), each a :class:`~distill.recipes.base.Recipe`
that the one training loop (:mod:`distill.loop`) drives.

    classification.py        MLP classifier on tabular data: classic soft targets
    causal_lm.py             causal LM, token-level: match the teacher's next-token distributions
    causal_lm_sequence.py    causal LM, sequence-level: train on teacher-generated completions
    causal_lm_on_policy.py   causal LM, on-policy (GKD): the student samples, the teacher scores
    causal_lm_uld.py         causal LM, token-level across tokenizers: ULD (loss.type "uld")
    text_classification.py   transformers text classifier: soft targets over the labels

A recipe file registers itself with ``@register("task", "method")``; this package finds
every file in its folder, so adding a task or a method is one new file. Recipes import
transformers only when they run, so discovering them is cheap.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import LOSS_RECIPES, RECIPES, Recipe, RunContext, register

__all__ = ["Recipe", "RunContext", "register", "get_recipe", "recipe_exists", "TASKS", "METHODS", "RECIPES"]

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

TASKS: tuple[str, ...] = tuple(dict.fromkeys(task for task, _ in RECIPES))
METHODS: tuple[str, ...] = tuple(dict.fromkeys(method for _, method in RECIPES))


def recipe_exists(task: str, method: str) -> bool:
    return (task, method) in RECIPES


def get_recipe(task: str, method: str, loss_type: str | None = None) -> type[Recipe]:
    """The recipe for (task, method); a recipe registered for (task, method, loss_type) wins
    (e.g. the cross-tokenizer ULD loss runs its own token-level recipe)."""
    from ..errors import SpecError

    if loss_type is not None and (task, method, loss_type) in LOSS_RECIPES:
        return LOSS_RECIPES[(task, method, loss_type)]
    if (task, method) not in RECIPES:
        available = ", ".join(m for t, m in RECIPES if t == task)
        raise SpecError(f"method {method!r} is not available for task {task!r}"
                        + (f" (available: {available})" if available else ""), param="method")
    return RECIPES[(task, method)]

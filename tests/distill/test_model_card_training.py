"""The model card's training section: the loss per epoch the engine recorded."""

from __future__ import annotations

from distill import hf


def test_model_card_has_the_loss_per_epoch():
    history = [{"epoch": 1, "step": 10, "train_loss": 2.5, "validation_loss": 2.75},
               {"epoch": 2, "step": 20, "train_loss": 1.25, "validation_loss": None}]
    card = hf.model_card({"teacher": "t", "task": "causal_lm", "history": history, "evaluation": {}})
    assert "## Training" in card and "2 epochs." in card
    assert "| 1 | 10 | 2.5 | 2.75 |" in card and "| 2 | 20 | 1.25 | — |" in card
    assert card.index("## Training") < card.index("## Evaluation")
    assert "## Training" not in hf.model_card({"teacher": "t", "evaluation": {}})

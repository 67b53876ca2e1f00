"""Placeholder: on-policy distillation (being written)."""
from .causal_lm import CausalLMToken
from .base import register


@register("causal_lm", "on_policy")
class CausalLMOnPolicy(CausalLMToken):
    pass

"""The per-op rules of the channel analysis: one registry (``registry``) keyed by the ATen op,
and the rules themselves (``shape``: moving and reshaping; ``index``: picking by index;
``compute``: arithmetic, reductions, contractions, attention; ``experts``: mixture-of-experts
matmuls). Importing this package registers them all."""
from . import compute, experts, index, shape  # noqa: F401  (registers the rules)
from .registry import RULES, RULES_BY_NAME, RuleContext, apply_rule, is_weight, qualified_name, register

__all__ = ["RULES", "RULES_BY_NAME", "RuleContext", "apply_rule", "is_weight", "qualified_name", "register"]

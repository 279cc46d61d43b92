"""Plan: turn an analysis into per-layer fine-tuning decisions (rates, ranks, trainable set)."""

from spectune.plan.apply import apply_trainable, match_names, param_groups
from spectune.plan.build import decide, plan, plan_table, policy_config
from spectune.plan.export import axolotl_fragment, peft_kwargs
from spectune.plan.policies import POLICIES
from spectune.plan.schema import LoraDecision, Plan, PlanError

__all__ = [
    "POLICIES",
    "LoraDecision",
    "Plan",
    "PlanError",
    "apply_trainable",
    "axolotl_fragment",
    "decide",
    "match_names",
    "param_groups",
    "peft_kwargs",
    "plan",
    "plan_table",
    "policy_config",
]

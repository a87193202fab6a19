"""Attaching a spec's adapters to a model: the plan (qadapt.adapters.placement) carried out in place."""

from __future__ import annotations

from torch import nn

from qadapt.adapters.head import TOKEN_CLASSIFIER, TrainedHead
from qadapt.adapters.inject import wrap_modules
from qadapt.adapters.placement import plan_adapters
from qadapt.adapters.spec import AdapterSpec


def attach_adapters(model: nn.Module, spec: AdapterSpec) -> list[str]:
    """Attach the adapters `spec` describes to `model` in place; return the wrapped module names.

    A token-classification model's new head is trained whole beside them (qadapt.adapters.head).
    """
    plan = plan_adapters(model, spec)
    if has_token_classifier(model):
        plan[TOKEN_CLASSIFIER] = TrainedHead
    return wrap_modules(model, plan)


def has_token_classifier(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForTokenClassification")

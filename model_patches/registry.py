"""The one list of supported model families.

Each family file calls ``register_model_patch`` once; the README's supported-model table, the error for
an unsupported model and the test matrix are all generated from ``MODEL_PATCHES``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..errors import UnsupportedModelError
from .common import default_layout

DISPATCHES = ("experts_interface", "instance_patch")


@dataclass(frozen=True)
class ModelPatch:
    """How hf-hetermoe finds and accelerates one model family's routed experts.

    Attributes:
        family: display name, e.g. "Mixtral".
        model_types: ``config.model_type`` values of the family.
        modeling_module: transformers module defining the experts class.
        experts_class: name of the experts class in ``modeling_module``.
        tiny_config: builds a small config of the family (tests, demo, compatibility matrix).
        dispatch: "experts_interface" (transformers' ``ALL_EXPERTS_FUNCTIONS``) or "instance_patch".
        layout: reads an ``ExpertLayout`` off one experts module.
        patch_instance: for ``dispatch="instance_patch"`` families (which ignore ``ALL_EXPERTS_FUNCTIONS``):
            ``patch_instance(experts, layout, backend) -> undo`` rebinds that one module's forward (never the
            class) and returns a zero-argument function that restores it.
        quirks: upstream behaviours a prepared model reproduces on purpose (listed in the docs).
    """

    family: str
    model_types: tuple[str, ...]
    modeling_module: str
    experts_class: str
    tiny_config: Callable[[], object]
    dispatch: str = "experts_interface"
    layout: Callable[[nn.Module], object] = default_layout
    patch_instance: Callable[[nn.Module, object, str], Callable[[], None]] | None = None
    quirks: tuple[str, ...] = field(default_factory=tuple)

    def experts_type(self) -> type[nn.Module]:
        return getattr(importlib.import_module(self.modeling_module), self.experts_class)


MODEL_PATCHES: dict[str, ModelPatch] = {}


def register_model_patch(patch: ModelPatch) -> ModelPatch:
    """Validate and register ``patch`` under each of its model types."""
    if not patch.model_types:
        raise ValueError(f"ModelPatch {patch.family!r} declares no model_types")
    if patch.dispatch not in DISPATCHES:
        raise ValueError(f"ModelPatch {patch.family!r}: dispatch={patch.dispatch!r} is not one of {DISPATCHES}")
    if (patch.dispatch == "instance_patch") != (patch.patch_instance is not None):
        raise ValueError(f"ModelPatch {patch.family!r}: patch_instance is required exactly when dispatch='instance_patch'")
    taken = [t for t in patch.model_types if t in MODEL_PATCHES]
    if taken:
        raise ValueError(f"model types {taken} of {patch.family!r} are already registered by {MODEL_PATCHES[taken[0]].family!r}")
    for model_type in patch.model_types:
        MODEL_PATCHES[model_type] = patch
    return patch


def supported_model_types() -> list[str]:
    return sorted(MODEL_PATCHES)


def get_model_patch(model_type: str) -> ModelPatch:
    try:
        return MODEL_PATCHES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by hf-hetermoe; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None

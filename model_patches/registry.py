"""The one list of supported model families.

Each family file calls ``register_model_patch`` once; the README's supported-model table
(``supported_models_markdown``), the error for an unsupported model, the test matrix and ``MODEL_COMPATIBILITY.md``
are all generated from ``MODEL_PATCHES``.

Adding a family
---------------
Write ``model_patches/<family>.py`` with a ``ModelPatch``:

* families whose experts class is decorated with transformers' ``@use_experts_implementation`` set
  ``dispatch="experts_interface"``; transformers then calls the registered ``"hetermoe"`` function with the
  ``ExpertLayout`` that ``layout(experts)`` reads (``common.default_layout`` unless the family overrides
  ``_apply_gate`` or stores its weights differently);
* the others set ``dispatch="instance_patch"`` and give ``patch_instance(module, layout, backend) -> undo``, which
  rebinds that one module's ``forward`` (never the class) so that its routed experts run through
  ``common.routed(...)`` and the kernels. The router is still called as a module, so its hooks (and
  ``output_router_logits``) see the same outputs.

Layer anatomy (the disaggregated runtime)
-----------------------------------------
``ModelPatch.anatomy`` (a ``LayerAnatomy``, see ``anatomy.py``) splits one decoder layer into

* ``attention_half(patch, layer, *args, **kwargs) -> LayerSplit``: norms, attention, residuals, router and
  shared experts (everything but the routed experts), on the attention ranks. ``LayerSplit`` carries
  ``hidden [T, H]``, ``top_k_index [T, k]`` and ``top_k_weights [T, k]`` (what to ship to the expert ranks; all
  three are ``None`` for a dense layer) and what ``finish`` needs;
* ``expert_half(patch, layer, hidden, top_k_index, top_k_weights) -> routed [T, H]``: the routed experts only,
  on the expert ranks (they need only the experts module of the layer);
* ``finish(patch, layer, split, routed) -> layer output``: exactly what ``layer(*args, **kwargs)`` returns.

Running the three in sequence equals ``layer(...)`` forward and backward (``tests/test_anatomy.py``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .anatomy import LayerAnatomy
from .common import default_layout

DISPATCHES = ("experts_interface", "instance_patch")
# The transformers auto class each task's model is built with (tests, compatibility matrix, demo).
TASKS = {
    "causal_lm": "AutoModelForCausalLM",
    "seq2seq_lm": "AutoModelForSeq2SeqLM",
    "image_text_to_text": "AutoModelForImageTextToText",  # vision-language models: their text stack has the experts
    "token_classification": "AutoModelForTokenClassification",  # encoders with a per-token classifier (no generate)
}


@dataclass(frozen=True)
class ModelPatch:
    """How hf-hetermoe finds and accelerates one model family's routed experts.

    Attributes:
        family: display name, e.g. "Mixtral".
        model_types: ``config.model_type`` values of the family.
        modeling_module: transformers module defining the experts class.
        experts_class: name of the class ``prepare`` acts on in ``modeling_module``: the experts module for
            ``experts_interface`` families, the module whose forward is rebound for ``instance_patch`` ones.
        tiny_config: builds a small config of the family (tests, demo, compatibility matrix).
        dispatch: "experts_interface" (transformers' ``ALL_EXPERTS_FUNCTIONS``) or "instance_patch".
        layout: reads an ``ExpertLayout`` off one ``experts_class`` module.
        patch_instance: for ``dispatch="instance_patch"`` families (which ignore ``ALL_EXPERTS_FUNCTIONS``):
            ``patch_instance(module, layout, backend) -> undo`` rebinds that one module's forward (never the
            class) and returns a zero-argument function that restores it.
        probe: for ``instance_patch`` families: ``probe(module, generator) -> args``, random CPU inputs of the
            class's own ``forward`` (float ones are moved to the weights' device and dtype); ``prepare`` runs that
            forward and the rebound one on them and refuses a module where they differ.
        anatomy: how a decoder layer splits into an attention half and an expert half (``anatomy.py``);
            ``None`` where no split is offered.
        task: "causal_lm" (``AutoModelForCausalLM``), "seq2seq_lm" (``AutoModelForSeq2SeqLM``),
            "image_text_to_text" (``AutoModelForImageTextToText``: a vision-language model, verified on text) or
            "token_classification" (``AutoModelForTokenClassification``: a per-token classifier, no ``generate``).
        auto_class_name: the transformers auto class that builds the family when it is not the task's (Mistral4's
            ``Mistral4ForCausalLM`` is mapped under ``AutoModelForImageTextToText`` only).
        notes: one line on the family's routing and weight layout (README table).
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
    probe: Callable[[nn.Module, torch.Generator], tuple] | None = None
    anatomy: LayerAnatomy | None = None
    task: str = "causal_lm"
    auto_class_name: str | None = None
    notes: str = ""
    quirks: tuple[str, ...] = field(default_factory=tuple)

    def experts_type(self) -> type[nn.Module]:
        """The ``experts_class`` of the installed transformers.

        Raises:
            UnsupportedModelError: this transformers version does not ship that class.
        """
        try:
            return getattr(importlib.import_module(self.modeling_module), self.experts_class)
        except (ImportError, AttributeError) as err:
            import transformers

            raise UnsupportedModelError(
                f"{self.family}: transformers {transformers.__version__} has no {self.modeling_module}."
                f"{self.experts_class}, the module hf-hetermoe patches; upgrade transformers "
                f"(`pip install -U transformers`) or use experts_implementation='grouped_mm' ({err})"
            ) from None

    def available(self) -> bool:
        """Whether the installed transformers ships this family's experts class."""
        try:
            self.experts_type()
        except UnsupportedModelError:
            return False
        return True

    @property
    def generative(self) -> bool:
        """Whether the family's model has a language-modelling head (``generate`` works)."""
        return self.task != "token_classification"

    def auto_class(self):
        """The transformers auto class that builds this family's model with its task's head."""
        import transformers

        return getattr(transformers, self.auto_class_name or TASKS[self.task])


MODEL_PATCHES: dict[str, ModelPatch] = {}


def register_model_patch(patch: ModelPatch) -> ModelPatch:
    """Validate and register ``patch`` under each of its model types."""
    if not patch.model_types:
        raise ValueError(f"ModelPatch {patch.family!r} declares no model_types")
    if patch.dispatch not in DISPATCHES:
        raise ValueError(f"ModelPatch {patch.family!r}: dispatch={patch.dispatch!r} is not one of {DISPATCHES}")
    if patch.task not in TASKS:
        raise ValueError(f"ModelPatch {patch.family!r}: task={patch.task!r} is not one of {sorted(TASKS)}")
    if (patch.dispatch == "instance_patch") != (patch.patch_instance is not None):
        raise ValueError(
            f"ModelPatch {patch.family!r}: patch_instance is required exactly when dispatch='instance_patch'"
        )
    if patch.anatomy is not None and (patch.dispatch == "instance_patch") != (patch.anatomy.expert_fn is not None):
        raise ValueError(
            f"ModelPatch {patch.family!r}: anatomy.expert_fn is required exactly when dispatch='instance_patch' "
            "(experts-interface families run their experts module itself as the expert half)"
        )
    taken = [t for t in patch.model_types if t in MODEL_PATCHES]
    if taken:
        owner = MODEL_PATCHES[taken[0]].family
        raise ValueError(f"model types {taken} of {patch.family!r} are already registered by {owner!r}")
    for model_type in patch.model_types:
        MODEL_PATCHES[model_type] = patch
    return patch


def supported_model_types() -> list[str]:
    return sorted(MODEL_PATCHES)


def model_patches() -> list[ModelPatch]:
    """Every registered family once, in registration order."""
    seen: dict[int, ModelPatch] = {}
    for patch in MODEL_PATCHES.values():
        seen.setdefault(id(patch), patch)
    return list(seen.values())


def get_model_patch(model_type: str) -> ModelPatch:
    try:
        return MODEL_PATCHES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by hf-hetermoe; supported model types: "
            f"{', '.join(supported_model_types())}"
        ) from None


def supported_models_markdown() -> str:
    """The README's supported-models table, generated from the registry."""
    rows = [
        "| Family | `model_type` | Dispatch | Layer anatomy | Routing and expert layout |",
        "|---|---|---|---|---|",
    ]
    for patch in model_patches():
        types = ", ".join(f"`{t}`" for t in patch.model_types)
        dispatch = "experts interface" if patch.dispatch == "experts_interface" else "instance patch"
        anatomy = "no"
        if patch.anatomy is not None:  # the zebra runtime trains decoder-only LMs (runtime/model_parts.py)
            anatomy = "yes (not yet in the zebra runtime)" if patch.task == "seq2seq_lm" else "yes"
        rows.append(f"| {patch.family} | {types} | {dispatch} | {anatomy} | {patch.notes} |")
    return "\n".join(rows) + "\n"

"""Model families hf-hetermoe supports (installed as ``hf_hetermoe.model_patches``).

One file per family; importing this package registers them all. To add a family: write
``model_patches/<family>.py`` calling ``register_model_patch`` and add its import below
(``registry.py`` says what a ``ModelPatch`` holds, including the layer anatomy).
"""

from . import (  # noqa: F401  (registration on import)
    apply_gate,
    dbrx,
    deepseek_v2,
    deepseek_v3,
    ernie4_5_moe,
    glm4_moe,
    gpt_oss,
    granitemoe,
    jetmoe,
    llama4,
    mixtral,
    nllb_moe,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
    standard,
    switch_transformers,
    vision_language,
)
from .anatomy import LayerAnatomy, LayerSplit, attention_half, decoder_layers, expert_half, finish
from .common import activation_name, default_layout
from .registry import (
    MODEL_PATCHES,
    ModelPatch,
    get_model_patch,
    model_patches,
    register_model_patch,
    supported_model_types,
    supported_models_markdown,
)

__all__ = [
    "MODEL_PATCHES",
    "LayerAnatomy",
    "LayerSplit",
    "ModelPatch",
    "activation_name",
    "attention_half",
    "decoder_layers",
    "default_layout",
    "expert_half",
    "finish",
    "get_model_patch",
    "model_patches",
    "register_model_patch",
    "supported_model_types",
    "supported_models_markdown",
]

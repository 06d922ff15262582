"""Model dimensions the planner needs, read from a transformers config object or a plain dict.

MoE families name the same quantities differently (Mixtral ``num_local_experts``, Qwen3-MoE
``num_experts`` and ``moe_intermediate_size``, DeepSeek ``n_routed_experts`` and ``first_k_dense_replace``,
OLMoE ``num_experts``). :func:`model_dims` tries each known name in order and says which one is missing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_hetermoe.errors import ConfigError

# Attribute names per quantity, first match wins (order matters: `moe_intermediate_size` before the dense one).
_NAMES: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "d_model", "n_embd"),
    "num_layers": ("num_hidden_layers", "num_layers", "n_layer"),
    "num_experts": ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"),
    "top_k": ("num_experts_per_tok", "num_experts_per_token", "moe_top_k", "top_k", "moe_k", "moe_topk"),
    "expert_intermediate_size": (
        "moe_intermediate_size", "expert_intermediate_size", "expert_ffn_hidden_size", "intermediate_size", "ffn_dim",
    ),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size",),
}


@dataclass
class ModelDims:
    """The dimensions of an MoE decoder that the cost model uses. All sizes are element counts."""

    hidden_size: int = field(metadata={"help": "H, the residual width."})
    num_layers: int = field(metadata={"help": "Decoder layers (MoE and dense) in the model."})
    num_experts: int = field(metadata={"help": "E, routed experts per MoE layer."})
    top_k: int = field(metadata={"help": "Routed experts per token."})
    expert_intermediate_size: int = field(metadata={"help": "I, intermediate width of one routed expert."})
    num_attention_heads: int = field(metadata={"help": "Query heads."})
    num_key_value_heads: int = field(default=0, metadata={"help": "KV heads (GQA); 0 means equal to query heads."})
    head_dim: int = field(default=0, metadata={"help": "Per-head width; 0 means hidden_size // heads."})
    vocab_size: int = field(default=32000, metadata={"help": "Vocabulary size (LM head and embedding)."})
    num_shared_experts: int = field(default=0, metadata={"help": "Shared (always-on) experts, run on attention GPUs."})
    shared_intermediate_size: int = field(default=0, metadata={"help": "Intermediate width of one shared expert."})
    first_dense_layers: int = field(default=0, metadata={"help": "Leading dense (non-MoE) layers (DeepSeek)."})
    moe_layer_mask: tuple[bool, ...] = field(
        default=(),
        metadata={
            "help": "Per layer, whether it has routed experts, where the config says so layer by layer "
            "(mlp_layer_types, mlp_only_layers / decoder_sparse_step, Jamba's expert_layer_period); empty: every "
            "layer from first_dense_layers on."
        },
    )
    dense_intermediate_size: int = field(default=0, metadata={"help": "MLP width of the dense layers."})
    attention_sublayers: int = field(
        default=1, metadata={"help": "Attention blocks per decoder layer (LongCat-Flash: 2)."}
    )
    dense_mlps_per_layer: int = field(
        default=0,
        metadata={"help": "Dense MLPs of dense_intermediate_size beside the routed experts in every layer "
                          "(LongCat-Flash: 2); they run with attention."},
    )
    zero_experts: int = field(
        default=0,
        metadata={"help": "Identity ('zero') experts among the router's choices (LongCat-Flash): they cost nothing, "
                          "so a token reaches top_k * E / (E + zero_experts) real experts on average."},
    )
    gated: bool = field(default=True, metadata={"help": "Gated (SwiGLU) experts: three matrices instead of two."})
    tie_word_embeddings: bool = field(default=False, metadata={"help": "LM head shares the embedding matrix."})
    model_type: str = field(default="", metadata={"help": "transformers model_type, for messages only."})

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_experts", "top_k", "expert_intermediate_size",
                     "num_attention_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ModelDims.{name}={value!r} must be a positive integer")
        if self.top_k > self.num_experts + self.zero_experts:
            raise ConfigError(f"ModelDims.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        for name in ("attention_sublayers", "dense_mlps_per_layer", "zero_experts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (1 if name == "attention_sublayers" else 0):
                raise ConfigError(f"ModelDims.{name}={value!r} must be a non-negative integer (attention_sublayers: "
                                  "at least 1)")
        if self.num_key_value_heads == 0:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if not 0 <= self.first_dense_layers < self.num_layers:
            raise ConfigError(
                f"ModelDims.first_dense_layers={self.first_dense_layers} must be in [0, num_layers={self.num_layers})"
            )
        self.moe_layer_mask = tuple(bool(m) for m in self.moe_layer_mask)  # JSON gives a list
        if self.moe_layer_mask and (len(self.moe_layer_mask) != self.num_layers or not any(self.moe_layer_mask)):
            raise ConfigError(
                f"ModelDims.moe_layer_mask has {len(self.moe_layer_mask)} entries, "
                f"{sum(self.moe_layer_mask)} of them MoE: it needs one per layer (num_layers={self.num_layers}) and "
                "at least one MoE layer"
            )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` has routed experts (the others are dense)."""
        return self.moe_layer_mask[layer] if self.moe_layer_mask else layer >= self.first_dense_layers

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(li) for li in range(self.num_layers))

    @property
    def routed_top_k(self) -> float:
        """Real experts a token reaches on average: ``top_k``, less the picks of identity experts (balanced)."""
        return self.top_k * self.num_experts / (self.num_experts + self.zero_experts)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert."""
        return (3 if self.gated else 2) * self.hidden_size * self.expert_intermediate_size

    @property
    def attention_half_params(self) -> int:
        """Parameters of one layer's attention half: q/k/v/o projections and norms (of each attention block), router,
        shared experts, the dense MLPs that run beside the experts."""
        h = self.hidden_size
        attn = (h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h + 2 * h) * self.attention_sublayers
        per_mlp = (3 if self.gated else 2) * h
        shared = self.num_shared_experts * per_mlp * max(self.shared_intermediate_size, 0)
        dense = self.dense_mlps_per_layer * per_mlp * self.dense_intermediate_size
        return attn + h * (self.num_experts + self.zero_experts) + shared + dense

    @property
    def embedding_params(self) -> int:
        """Embedding plus LM head parameters (counted once when tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "moe_layer_mask": list(self.moe_layer_mask)}  # as JSON gives it back

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDims:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown ModelDims keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


def _moe_layer_mask(cfg: dict[str, Any], num_layers: int, first_dense: int) -> tuple[bool, ...]:
    """Which layers have routed experts, as transformers' modeling files decide it from the config; ``()`` where a
    prefix of ``first_dense`` dense layers (or none) says it all."""
    kinds = cfg.get("layers_block_type")  # Nemotron-H: one block kind per layer ("mamba", "attention", "moe", ...)
    if isinstance(kinds, (list, tuple)) and len(kinds) == num_layers and "moe" in kinds:
        return tuple(k == "moe" for k in kinds)
    types = cfg.get("mlp_layer_types")  # "dense" / "sparse" (or "moe", "hash_moe") per layer
    if isinstance(types, (list, tuple)) and len(types) == num_layers:
        return tuple(t != "dense" for t in types)
    period = cfg.get("expert_layer_period")  # Jamba: experts where layer % period == offset
    if period:
        return tuple(li % int(period) == int(cfg.get("expert_layer_offset") or 0) for li in range(num_layers))
    # Qwen2/3-MoE: mlp_only_layers and decoder_sparse_step; Ernie-4.5: moe_layer_interval, layers start..end.
    only = set(cfg.get("mlp_only_layers") or ())
    step = int(cfg.get("decoder_sparse_step") or cfg.get("moe_layer_interval") or 1)
    last = cfg.get("moe_layer_end_index")
    last = num_layers - 1 if last is None or last < 0 else int(last)
    mask = tuple(li >= first_dense and li not in only and (li + 1) % step == 0 and li <= last
                 for li in range(num_layers))
    return () if mask == tuple(li >= first_dense for li in range(num_layers)) else mask


def _first(cfg: dict[str, Any], quantity: str) -> Any:
    for name in _NAMES[quantity]:
        if cfg.get(name) is not None:
            return cfg[name]
    return None


def model_dims(config: Any) -> ModelDims:
    """Extract :class:`ModelDims` from a transformers ``PretrainedConfig``, a config dict, a ``ModelDims``,
    or a path to ``config.json`` / a checkpoint directory."""
    if isinstance(config, ModelDims):
        return config
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"model config {str(config)!r} not found: pass a config.json or a checkpoint directory")
        config = json.loads(path.read_text())
    cfg = dict(config) if isinstance(config, dict) else config.to_dict()
    # Multimodal / composite configs keep the decoder under text_config.
    if _first(cfg, "num_experts") is None and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    values = {q: _first(cfg, q) for q in _NAMES}
    if values["num_layers"] is None and isinstance(cfg.get("layers_block_type"), list):  # Nemotron-H (hybrid)
        values["num_layers"] = len(cfg["layers_block_type"])
    for q in ("num_experts", "top_k"):  # HunYuan-MoE may give one value per layer: plan for the largest
        if isinstance(values[q], (list, tuple)):
            values[q] = max(values[q]) if values[q] else None
    missing = [f"{q} (tried {', '.join(_NAMES[q])})" for q, v in values.items() if v is None]
    if missing:
        raise ConfigError(
            f"model config of type {cfg.get('model_type', '?')!r} lacks {'; '.join(missing)}: "
            "it is not an MoE config the planner understands; pass a dict with these keys"
        )
    act = str(cfg.get("hidden_act", "silu"))
    # Shared experts: DeepSeek n_shared_experts, Ernie-4.5 moe_num_shared_experts, Qwen2-MoE one of
    # shared_expert_intermediate_size, HunYuan-MoE always one shared MLP of intermediate_size.
    n_shared = int(cfg.get("n_shared_experts") or cfg.get("moe_num_shared_experts")
                   or (1 if cfg.get("shared_expert_intermediate_size") else 0)
                   or (1 if cfg.get("model_type") == "hunyuan_v1_moe" else 0))
    shared_size = int(cfg.get("shared_expert_intermediate_size") or cfg.get("moe_shared_expert_intermediate_size")
                      or (cfg.get("intermediate_size") if cfg.get("model_type") == "hunyuan_v1_moe" else 0)
                      or (values["expert_intermediate_size"] if n_shared else 0))
    first_dense = int(cfg.get("first_k_dense_replace") or cfg.get("moe_layer_start_index")
                      or cfg.get("num_dense_layers") or 0)  # DeepSeek, Ernie-4.5, LFM2-MoE
    gated = cfg.get("model_type") not in {"switch_transformers", "nllb_moe", "gpt_bigcode"} and act != "gelu_new"
    # LongCat-Flash: two attention blocks and two dense MLPs (ffn_hidden_size) in every layer, beside one MoE block
    # whose router also picks among zero_expert_num identity experts.
    longcat = cfg.get("model_type") == "longcat_flash"
    return ModelDims(
        **{q: int(v) for q, v in values.items()},
        num_key_value_heads=int(cfg.get("num_key_value_heads") or 0),
        head_dim=int(cfg.get("head_dim") or 0),
        num_shared_experts=n_shared,
        shared_intermediate_size=shared_size,
        first_dense_layers=first_dense,
        moe_layer_mask=_moe_layer_mask(cfg, int(values["num_layers"]), first_dense),
        dense_intermediate_size=int(cfg.get("intermediate_size") or cfg.get("ffn_hidden_size") or 0),
        attention_sublayers=2 if longcat else 1,
        dense_mlps_per_layer=2 if longcat else 0,
        zero_experts=int(cfg.get("zero_expert_num") or 0),
        gated=gated,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        model_type=str(cfg.get("model_type", "")),
    )

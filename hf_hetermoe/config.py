"""User-facing configuration of ``hetermoe.prepare``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .errors import ConfigError

BACKENDS = ("auto", "triton", "reference")


@dataclass
class HeterMoEConfig:
    """How ``prepare`` accelerates a model's routed experts.

    Round-trips through ``to_dict``/``from_dict`` and JSON. Unknown keys are rejected by ``from_dict``.
    """

    backend: str = field(
        default="auto",
        metadata={
            "help": "Which implementation runs the expert operators: 'auto' (Triton kernels on CUDA tensors, the "
            "plain-PyTorch reference elsewhere), 'triton' (always Triton; on CPU only under TRITON_INTERPRET=1) or "
            "'reference' (plain PyTorch, same results). HETERMOE_BACKEND overrides it."
        },
    )
    autotune: bool = field(
        default=True,
        metadata={
            "help": "Autotune the Triton kernels' tiles per shape bucket on first use, cached on disk "
            "(hf_hetermoe.kernels.tuning). False pins the measured defaults for the whole process (as "
            "HETERMOE_AUTOTUNE=0 does); True leaves the decision to HETERMOE_AUTOTUNE."
        },
    )
    recompute_gate_up: bool = field(
        default=False,
        metadata={
            "help": "Save no gate/up pre-activations for the experts' backward and run the gate/up matmul again "
            "there: T * k * 2I fewer saved elements per MoE layer (Qwen3-30B-A3B: 24 KiB per token per layer, 6x "
            "the layer's input) for 4/18 more expert FLOPs; the same gradients. Cheaper than checkpointing whole "
            "layers when the experts' activations are what does not fit."
        },
    )
    fused_cross_entropy: bool = field(
        default=True,
        metadata={
            "help": "In training mode with labels, compute a causal LM's loss from the head's input chunk by chunk "
            "(hf_hetermoe.fused_loss) instead of materialising [B, S, V] logits: outputs.logits is then None. "
            "Evaluation, calls without labels and non-causal-LM models are unaffected."
        },
    )
    fused_rms_norm: bool = field(
        default=True,
        metadata={
            "help": "Run the model's RMSNorm modules through one fused Triton kernel per direction "
            "(model_patches.norms): only classes whose own forward matches a known operation order on a "
            "numerical check at prepare time, with the same roundings. CPU tensors keep the plain-PyTorch path."
        },
    )
    backward_on_calling_thread: bool = field(
        default=True,
        metadata={
            "help": "Run backward passes on the thread that calls them (torch.autograd.set_multithreading_enabled"
            "(False) for the thread that calls prepare, the training loop's; unpreparing the last model prepared "
            "on that thread restores it) instead of handing the whole backward to autograd's per-device worker "
            "thread, where its C++ calls ran ~2.5x slower than the same calls in the forward. It matters where "
            "steps are host-bound (small batches): "
            "Qwen3-30B-A3B's experts on an H100 host, forward+backward, 113 -> 148 TF/s at T=1024, 211 -> 247 at "
            "T=2048, 350 -> 358 at T=4096, the same gradients to the bit (benchmarks/NOTES.md, v2.29). PyTorch "
            "plans the same default (pytorch/pytorch#192082). HETERMOE_CALLING_THREAD_BACKWARD=0/1 overrides it; "
            "False leaves autograd's mode as it is."
        },
    )
    implementation_name: str = field(
        default="hetermoe",
        metadata={
            "help": "Name under which the experts function is registered in transformers' ALL_EXPERTS_FUNCTIONS."
        },
    )

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"HeterMoEConfig.backend={self.backend!r} is not one of {BACKENDS}")
        if not isinstance(self.autotune, bool):
            raise ConfigError(f"HeterMoEConfig.autotune must be a bool, got {self.autotune!r}")
        if not isinstance(self.recompute_gate_up, bool):
            raise ConfigError(f"HeterMoEConfig.recompute_gate_up must be a bool, got {self.recompute_gate_up!r}")
        if not isinstance(self.fused_cross_entropy, bool):
            raise ConfigError(f"HeterMoEConfig.fused_cross_entropy must be a bool, got {self.fused_cross_entropy!r}")
        if not isinstance(self.fused_rms_norm, bool):
            raise ConfigError(f"HeterMoEConfig.fused_rms_norm must be a bool, got {self.fused_rms_norm!r}")
        if not isinstance(self.backward_on_calling_thread, bool):
            raise ConfigError(
                f"HeterMoEConfig.backward_on_calling_thread must be a bool, got {self.backward_on_calling_thread!r}"
            )
        if not isinstance(self.implementation_name, str) or not self.implementation_name.isidentifier():
            raise ConfigError(
                f"HeterMoEConfig.implementation_name={self.implementation_name!r} must be a Python identifier, "
                "e.g. 'hetermoe'"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> HeterMoEConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown HeterMoEConfig keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> HeterMoEConfig:
        return cls.from_dict(json.loads(text))

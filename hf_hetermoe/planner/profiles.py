"""Device profiles: measured (``hetermoe profile``) or built from published ratios (:mod:`.presets`).

``profiles.json``::

    {
      "format": "hetermoe-profiles/1",
      "model": {... ModelDims ...},
      "devices": {
        "NVIDIA A40": {
          "seq_len": 4096, "attn_tokens": 8192,             # attention measured on micro-batches of 2 sequences
          "attn_fwd_ms": 1.9, "attn_bwd_ms": 4.1,           # one layer's attention half (norms, attention, router)
          "head_ms": 3.0,                                   # final norm + LM head + loss, fwd+bwd, attn_tokens tokens
          "expert_tokens": [128, 1024, 8192],               # one expert FFN vs its token count
          "expert_fwd_ms": [...], "expert_bwd_ms": [...],
          "memory_bytes": 48e9,
          "act_bytes_per_token": 20480, "act_bytes_per_token_ckpt": 2048, "expert_act_bytes_per_token": 26624,
          "link_gbps": {"NVIDIA A40": 20.0},                # measured peer bandwidth, per direction
          "source": "measured", "emulated": false
        }
      }
    }

Times are milliseconds, memory bytes. Expert times are interpolated piecewise-linearly in token count and
extrapolated with the last segment's slope.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.files import write_json

from .model_dims import ModelDims

FORMAT = "hetermoe-profiles/1"


@dataclass
class DeviceProfile:
    """What one device kind costs for one model at one sequence length."""

    seq_len: int = field(metadata={"help": "Sequence length attention was measured at."})
    attn_tokens: int = field(metadata={"help": "Tokens per micro-batch attention was measured on."})
    attn_fwd_ms: float = field(metadata={"help": "One layer's attention half forward, ms per attn_tokens tokens."})
    attn_bwd_ms: float = field(metadata={"help": "Same, backward."})
    expert_tokens: list[int] = field(metadata={"help": "Token counts one expert FFN was timed at (ascending)."})
    expert_fwd_ms: list[float] = field(metadata={"help": "One expert forward, ms, per expert_tokens entry."})
    expert_bwd_ms: list[float] = field(metadata={"help": "One expert backward, ms, per expert_tokens entry."})
    memory_bytes: float = field(metadata={"help": "Usable device memory, bytes."})
    head_ms: float = field(default=0.0, metadata={"help": "Final norm + LM head + loss fwd+bwd, ms per attn_tokens."})
    act_bytes_per_token: float = field(default=0.0, metadata={"help": "Attention-half activations kept per token."})
    act_bytes_per_token_ckpt: float = field(default=0.0, metadata={"help": "Same with activation checkpointing."})
    expert_act_bytes_per_token: float = field(default=0.0, metadata={"help": "Expert activations per routed token."})
    link_gbps: dict[str, float] = field(default_factory=dict, metadata={"help": "Measured GB/s to peer kinds."})
    source: str = field(default="measured", metadata={"help": "'measured' or 'preset:<name>' (published ratios)."})
    emulated: bool = field(default=False, metadata={"help": "Measured on an emulated older GPU."})

    def __post_init__(self) -> None:
        for name in ("seq_len", "attn_tokens"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"DeviceProfile.{name}={getattr(self, name)!r} must be >= 1")
        for name in ("attn_fwd_ms", "attn_bwd_ms", "memory_bytes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"DeviceProfile.{name}={getattr(self, name)!r} must be > 0")
        n = len(self.expert_tokens)
        if n == 0 or len(self.expert_fwd_ms) != n or len(self.expert_bwd_ms) != n:
            raise ConfigError(
                f"DeviceProfile expert curve needs equal, non-empty lists: expert_tokens has {n}, expert_fwd_ms "
                f"{len(self.expert_fwd_ms)}, expert_bwd_ms {len(self.expert_bwd_ms)}"
            )
        if any(b <= a for a, b in zip(self.expert_tokens, self.expert_tokens[1:])):
            raise ConfigError(f"DeviceProfile.expert_tokens={self.expert_tokens} must be strictly ascending")

    # ---- costs ---------------------------------------------------------------------------------
    def attn_ms(self, tokens: float, backward: bool = False) -> float:
        """One layer's attention half on ``tokens`` tokens of full sequences (time is linear in sequences)."""
        return (self.attn_bwd_ms if backward else self.attn_fwd_ms) * tokens / self.attn_tokens

    def head_time_ms(self, tokens: float) -> float:
        return self.head_ms * tokens / self.attn_tokens

    def expert_ms(self, tokens: float, backward: bool = False) -> float:
        """One expert FFN on ``tokens`` routed tokens; 0 tokens cost nothing (the kernel is skipped)."""
        if tokens <= 0:
            return 0.0
        xs, ys = self.expert_tokens, self.expert_bwd_ms if backward else self.expert_fwd_ms
        if len(xs) == 1:
            return ys[0] * tokens / xs[0]
        i = min(max(bisect.bisect_left(xs, tokens), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        if tokens < x0:  # below the first point: scale the first point down, keeping a launch floor
            return max(y0 * tokens / x0, y0 * 0.25)
        return max(y0 + (y1 - y0) * (tokens - x0) / (x1 - x0), 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ProfileSet:
    """Profiles of every device kind, for one model."""

    devices: dict[str, DeviceProfile] = field(default_factory=dict, metadata={"help": "Device kind -> profile."})
    model: dict[str, Any] | None = field(default=None, metadata={"help": "ModelDims the profiles were taken for."})

    def __post_init__(self) -> None:
        self.devices = {
            k: v if isinstance(v, DeviceProfile) else DeviceProfile(**_checked(v, k)) for k, v in self.devices.items()
        }

    def __getitem__(self, kind: str) -> DeviceProfile:
        if kind not in self.devices:
            raise ConfigError(
                f"no profile for device kind {kind!r}; profiles exist for {sorted(self.devices)}. "
                f"Run `hetermoe profile` on a {kind!r} GPU and merge it into the profiles file"
            )
        return self.devices[kind]

    def check_against(self, kinds: list[str], dims: ModelDims | None, seq_len: int) -> None:
        """Raise unless there is a profile for every kind in ``kinds``, none for others, all at ``seq_len``."""
        extra = sorted(set(self.devices) - set(kinds))
        if extra:
            raise ConfigError(
                f"profiles file has device kind(s) {extra} that are not in the cluster (cluster kinds: {kinds}); "
                "fix the device names in cluster.yaml or drop those profiles"
            )
        for kind in kinds:
            prof = self[kind]
            if prof.seq_len != seq_len:
                raise ConfigError(
                    f"profile of {kind!r} was taken at seq_len={prof.seq_len} but the cluster file trains at "
                    f"seq_len={seq_len}; re-run `hetermoe profile --seq-len {seq_len}` or change training.seq_len"
                )
        if dims is not None and self.model is not None and ModelDims.from_dict(self.model) != dims:
            raise ConfigError("profiles were taken for a different model config; re-run `hetermoe profile`")

    def merge(self, other: ProfileSet) -> ProfileSet:
        """Union, ``other`` winning on a shared device kind."""
        return ProfileSet(devices={**self.devices, **other.devices}, model=other.model or self.model)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "model": self.model, "devices": {k: v.to_dict() for k, v in self.devices.items()}}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileSet:
        if data.get("format") != FORMAT:
            raise ConfigError(f"profiles format {data.get('format')!r} is not {FORMAT!r}")
        return cls(devices=data.get("devices", {}), model=data.get("model"))

    @classmethod
    def load(cls, path: str | Path) -> ProfileSet:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"profiles file {str(path)!r} not found; create it with `hetermoe profile`")
        return cls.from_dict(json.loads(path.read_text()))


def _checked(data: dict[str, Any], kind: str) -> dict[str, Any]:
    allowed = set(DeviceProfile.__dataclass_fields__)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"profile of {kind!r} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return data

"""``plan.json``: what the zebra runtime (issue 6) needs to run a step, plus what the planner expects of it.

    {
      "format": "hetermoe-plan/1",
      "world_size": 12, "micro_batches": 4, "sequences_per_attention_rank": 8, "seq_len": 4096,
      "model": {...ModelDims...},
      "ranks": [{"rank": 0, "node": "n0", "device": "NVIDIA A40", "role": "attention", "zp_group": 0,
                 "local_rank": 0}, ...],
      "zp_groups": [[0, 1, 2, 6, 7, 8], ...],        # global ranks; position = local rank in the schedule
      "process_groups": {"dispatch": [[...] per ZP group], "combine": [[...]], "attn_dp": [[...]],
                         "expert_dp": [[global ranks holding local rank i's experts] per local rank i]},
      "placement": [{"3": [0, 1, ...], ...} per layer],   # local rank -> expert ids; {} for a dense layer
      "schedule": {...Schedule.to_dict()...},        # per local rank: ordered actions (see planner/__init__)
      "expected": {...SimResult.summary() of the chosen layout...},
      "baselines": {"EP": {...}, "DistEP": {...}, "DP (speed-balanced)": {...}},
      "asym_ea": {"moved": [...], "n_max": {...}, "n_min": 0},
      "profiles": {"NVIDIA A40": "measured", ...}, "notes": [...]
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.files import write_json

from .schedule import Schedule, validate_schedule

FORMAT = "hetermoe-plan/1"


class PlanMismatchError(ConfigError):
    """A plan does not match the job it is used for (world size, rank roles, model)."""


@dataclass
class Plan:
    """A loaded ``plan.json``; see the module docstring for the fields."""

    world_size: int = field(metadata={"help": "Processes the plan is for."})
    micro_batches: int = field(metadata={"help": "R."})
    sequences_per_attention_rank: int = field(metadata={"help": "Whole sequences per attention rank per step."})
    seq_len: int = field(metadata={"help": "Tokens per sequence."})
    model: dict[str, Any] = field(metadata={"help": "ModelDims."})
    ranks: list[dict[str, Any]] = field(metadata={"help": "Per global rank: node, device, role, ZP group."})
    zp_groups: list[list[int]] = field(metadata={"help": "Global ranks of each ZP group."})
    process_groups: dict[str, list[list[int]]] = field(metadata={"help": "Rank lists per process group kind."})
    placement: list[dict[str, list[int]]] = field(metadata={"help": "Per layer: local rank -> expert ids."})
    schedule: dict[str, Any] = field(metadata={"help": "Schedule.to_dict() of one ZP group."})
    expected: dict[str, Any] = field(default_factory=dict, metadata={"help": "Simulated step of this plan."})
    baselines: dict[str, Any] = field(default_factory=dict, metadata={"help": "Simulated baselines."})
    asym_ea: dict[str, Any] = field(default_factory=dict, metadata={"help": "Algorithm 1 report."})
    profiles: dict[str, str] = field(default_factory=dict, metadata={"help": "Device kind -> profile source."})
    notes: list[str] = field(default_factory=list, metadata={"help": "Assumptions and warnings."})

    def __post_init__(self) -> None:
        if len(self.ranks) != self.world_size:
            raise ConfigError(f"plan lists {len(self.ranks)} ranks but world_size={self.world_size}")
        covered = sorted(r for g in self.zp_groups for r in g)
        if covered != list(range(self.world_size)):
            raise ConfigError(f"plan zp_groups cover ranks {covered}, not 0..{self.world_size - 1} once each")
        if self.micro_batches < 1 or self.sequences_per_attention_rank % self.micro_batches:
            raise ConfigError(
                f"plan micro_batches={self.micro_batches} must be >= 1 and divide sequences_per_attention_rank="
                f"{self.sequences_per_attention_rank}"
            )

    def get_schedule(self, validate: bool = True) -> Schedule:
        sched = Schedule.from_dict(self.schedule)
        if validate:
            validate_schedule(sched)
        return sched

    def role_of(self, rank: int) -> str:
        return self.ranks[rank]["role"]

    def check_world(self, world_size: int, device_names: list[str] | None = None) -> None:
        """Raise :class:`PlanMismatchError` unless the job has the plan's world size (and device kinds)."""
        if world_size != self.world_size:
            raise PlanMismatchError(
                f"plan.json was made for {self.world_size} GPUs but this job has {world_size} processes "
                f"({'more' if world_size > self.world_size else 'fewer'} by {abs(world_size - self.world_size)}); "
                f"launch {self.world_size} processes or re-run `hetermoe plan` with a cluster file for "
                f"{world_size} GPUs"
            )
        if device_names is not None:
            for rank, (want, got) in enumerate(zip((r["device"] for r in self.ranks), device_names)):
                if not want.startswith(got):
                    raise PlanMismatchError(
                        f"rank {rank} is a {got!r} but plan.json expects a {want!r}; reorder the hosts or GPUs "
                        "to match the cluster file, or re-plan"
                    )

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        if data.get("format") != FORMAT:
            raise ConfigError(f"plan format {data.get('format')!r} is not {FORMAT!r}; re-run `hetermoe plan`")
        body = {k: v for k, v in data.items() if k != "format"}
        unknown = sorted(set(body) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown plan key(s) {unknown}; allowed: {sorted(cls.__dataclass_fields__)}")
        return cls(**body)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"plan file {str(path)!r} not found; create it with `hetermoe plan`")
        return cls.from_dict(json.loads(path.read_text()))

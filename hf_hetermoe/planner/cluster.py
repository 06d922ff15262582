"""The cluster file (``cluster.yaml``): which GPUs exist, on which nodes, how they are linked, and the
training shape (sequence length, batch) the plan is for.

    nodes:
      - name: node0
        intra_node_gbps: 300          # GB/s between two GPUs of this node (NVLink) -- per direction
        gpus:
          - {device: "NVIDIA H100 80GB HBM3", count: 2}
          - {device: "NVIDIA H100 80GB HBM3", count: 2, emulate: v100-like}
    inter_node_gbps: 25               # GB/s between GPUs of different nodes, per direction
    training:
      seq_len: 4096
      global_batch_sequences: 16
      activation_checkpointing: false

GPUs get global ranks in file order (node by node, group by group). A GPU with ``emulate`` is profiled and
planned as its own device kind, named ``"<device> [emulated <preset>]"``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.files import write_text


def _check_keys(cls: type, data: dict[str, Any], where: str) -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


@dataclass
class GPUGroup:
    """``count`` identical GPUs of one node."""

    device: str = field(metadata={"help": "Device name as torch.cuda.get_device_name() reports it; profiles key."})
    count: int = field(default=1, metadata={"help": "How many such GPUs the node has."})
    memory_gib: float = field(default=0.0, metadata={"help": "Usable memory per GPU in GiB; 0 = from profile."})
    emulate: str | None = field(default=None, metadata={"help": "Emulation preset (hetermoe.emulate), or none."})

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device.strip():
            raise ConfigError(f"GPUGroup.device={self.device!r} must be a non-empty device name")
        if not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"GPUGroup.count={self.count!r} for {self.device!r} must be a positive integer")
        if self.memory_gib < 0:
            raise ConfigError(f"GPUGroup.memory_gib={self.memory_gib} for {self.device!r} must be >= 0")
        if self.emulate is not None:
            from hf_hetermoe.emulate import PRESETS  # local: emulate imports torch

            if self.emulate not in PRESETS:
                raise ConfigError(f"GPUGroup.emulate={self.emulate!r}: unknown preset; allowed: {sorted(PRESETS)}")

    @property
    def kind(self) -> str:
        """The device-kind key used in profiles: emulated GPUs are a kind of their own."""
        return self.device if self.emulate is None else f"{self.device} [emulated {self.emulate}]"


@dataclass
class Node:
    """One machine."""

    name: str = field(metadata={"help": "Host name, for messages and plan.json."})
    gpus: list[GPUGroup] = field(default_factory=list, metadata={"help": "GPU groups of this node."})
    intra_node_gbps: float = field(default=25.0, metadata={"help": "GB/s per direction between GPUs of the node."})

    def __post_init__(self) -> None:
        self.gpus = [g if isinstance(g, GPUGroup) else GPUGroup(**_checked(GPUGroup, g, f"node {self.name!r} gpus"))
                     for g in self.gpus]
        if not self.gpus:
            raise ConfigError(f"node {self.name!r} lists no GPUs; add a `gpus:` entry with device and count")
        if self.intra_node_gbps <= 0:
            raise ConfigError(f"node {self.name!r}: intra_node_gbps={self.intra_node_gbps} must be > 0")


@dataclass
class TrainingShape:
    """The step the plan is for."""

    seq_len: int = field(default=4096, metadata={"help": "Tokens per sequence."})
    global_batch_sequences: int = field(default=8, metadata={"help": "Sequences per optimizer step, all GPUs."})
    activation_checkpointing: bool = field(default=False, metadata={"help": "Recompute layer activations."})
    bytes_per_param: float = field(
        default=16.0, metadata={"help": "Training state bytes per parameter (bf16 weight+grad, fp32 Adam: 16)."}
    )
    dtype_bytes: int = field(default=2, metadata={"help": "Bytes per activation element (2 for bf16)."})
    max_micro_batches: int = field(default=16, metadata={"help": "Largest R the planner tries."})

    def __post_init__(self) -> None:
        for name in ("seq_len", "global_batch_sequences", "dtype_bytes", "max_micro_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"training.{name}={value!r} must be a positive integer")
        if self.bytes_per_param <= 0:
            raise ConfigError(f"training.bytes_per_param={self.bytes_per_param} must be > 0")


def _checked(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    _check_keys(cls, data, where)
    return data


@dataclass
class ClusterConfig:
    """A cluster file: nodes, inter-node bandwidth and training shape."""

    nodes: list[Node] = field(default_factory=list, metadata={"help": "Machines, in rank order."})
    inter_node_gbps: float = field(default=12.5, metadata={"help": "GB/s per direction between nodes."})
    training: TrainingShape = field(default_factory=TrainingShape, metadata={"help": "Step shape."})

    def __post_init__(self) -> None:
        self.nodes = [n if isinstance(n, Node) else Node(**_checked(Node, n, "nodes entry")) for n in self.nodes]
        if not self.nodes:
            raise ConfigError("cluster file lists no nodes; add `nodes:` with at least one GPU")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ConfigError(f"node names {names} repeat; give each node a unique name")
        if self.inter_node_gbps <= 0:
            raise ConfigError(f"inter_node_gbps={self.inter_node_gbps} must be > 0")
        if not isinstance(self.training, TrainingShape):
            self.training = TrainingShape(**_checked(TrainingShape, self.training or {}, "training"))

    # ---- derived views -------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return sum(g.count for n in self.nodes for g in n.gpus)

    def ranks(self) -> list[tuple[int, str, GPUGroup]]:
        """``(rank, node name, gpu group)`` for every GPU, in rank order."""
        out, rank = [], 0
        for node in self.nodes:
            for group in node.gpus:
                for _ in range(group.count):
                    out.append((rank, node.name, group))
                    rank += 1
        return out

    def kinds(self) -> list[str]:
        """Distinct device kinds, in first-appearance order."""
        seen: dict[str, None] = {}
        for _, _, g in self.ranks():
            seen.setdefault(g.kind, None)
        return list(seen)

    def link_gbps(self, a: int, b: int) -> float:
        """Bandwidth in GB/s per direction between ranks ``a`` and ``b`` (inf for a == b)."""
        if a == b:
            return float("inf")
        ranks = self.ranks()
        na, nb = ranks[a][1], ranks[b][1]
        if na != nb:
            return self.inter_node_gbps
        return next(n.intra_node_gbps for n in self.nodes if n.name == na)

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        _check_keys(cls, data, "cluster file")
        return cls(**data)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            write_text(path, text)
        return text

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            write_text(path, text + "\n")
        return text

    @classmethod
    def load(cls, path: str | Path) -> ClusterConfig:
        """Read a ``.yaml``/``.yml`` or ``.json`` cluster file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"cluster file {str(path)!r} not found; see examples/cluster.yaml for the format")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.from_dict(data or {})

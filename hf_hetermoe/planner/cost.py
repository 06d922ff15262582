"""Cost model: action durations and per-GPU memory of a ZP-group layout, from profiles and the cluster file.

Assumptions (stated in plan output): routing is balanced (each expert gets ``tokens * top_k / E`` tokens),
a token routed to k experts is sent k times, a rank's all-to-all traffic crosses its links one after the
other (time = sum of bytes / link bandwidth, max over send and receive), communication does not slow
compute, and attention ranks of a ZP group get equal numbers of whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hf_hetermoe.errors import ConfigError

from .cluster import ClusterConfig
from .model_dims import ModelDims
from .profiles import DeviceProfile, ProfileSet
from .schedule import Action

A2A_LATENCY_MS = 0.03
GiB = 2**30


def attention_side_ms(d: ModelDims, prof: DeviceProfile, tokens: float, layer: int, backward: bool) -> float:
    """What runs beside attention in one layer on ``tokens`` tokens: its attention blocks, and a dense layer's MLP or
    the dense MLPs an MoE layer has beside its experts (LongCat-Flash), each as the FLOPs of
    ``dense_intermediate_size / expert_intermediate_size`` experts on all the tokens."""
    t = d.attention_sublayers * prof.attn_ms(tokens, backward)
    mlps = d.dense_mlps_per_layer + (0 if d.is_moe_layer(layer) else 1)
    if mlps and d.dense_intermediate_size:
        t += mlps * d.dense_intermediate_size / d.expert_intermediate_size * prof.expert_ms(tokens, backward)
    return t


class MemoryError_(ConfigError):  # noqa: N801 -- avoid shadowing the builtin MemoryError
    """A GPU cannot hold its share of the model."""


@dataclass
class ZPLayout:
    """One zebra-parallel group (all groups of a plan are identical, data-parallel over ``num_groups``)."""

    groups: list[list[int]] = field(metadata={"help": "Global ranks of each ZP group; position = local rank."})
    attention: list[int] = field(metadata={"help": "Local ranks that run attention halves."})
    placement: list[dict[int, tuple[int, ...]]] = field(metadata={"help": "Per layer: local rank -> expert ids."})
    micro_batches: int = field(default=1, metadata={"help": "R, micro-batches per step."})
    sequences_per_attention_rank: int = field(default=1, metadata={"help": "Whole sequences per attention rank."})
    local_experts: str = field(default="layer", metadata={
        "help": "How far an attention rank delays its own expert work (schedule.LOCAL_EXPERT_ORDERS)."})

    def __post_init__(self) -> None:
        sizes = {len(g) for g in self.groups}
        if len(sizes) != 1:
            raise ConfigError(f"ZP groups must be the same size, got sizes {sorted(sizes)}")

    @property
    def ranks(self) -> list[int]:
        """Global ranks of the first ZP group (the one simulated; the others are identical)."""
        return self.groups[0]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def experts_on(self, local: int, layer: int) -> int:
        return len(self.placement[layer].get(local, ()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups, "attention": self.attention,
            "micro_batches": self.micro_batches, "sequences_per_attention_rank": self.sequences_per_attention_rank,
            "local_experts": self.local_experts,
            "placement": [{str(r): list(e) for r, e in p.items()} for p in self.placement],
        }


class CostModel:
    """Durations (ms) and memory (bytes) for layouts of one model on one cluster."""

    def __init__(self, dims: ModelDims, cluster: ClusterConfig, profiles: ProfileSet):
        self.dims, self.cluster, self.profiles = dims, cluster, profiles
        self.kind_of = {rank: group.kind for rank, _, group in cluster.ranks()}
        self.node_of = {rank: node for rank, node, _ in cluster.ranks()}
        self.memory_override = {rank: group.memory_gib * GiB for rank, _, group in cluster.ranks() if group.memory_gib}
        self.seq_len = cluster.training.seq_len
        self.dtype_bytes = cluster.training.dtype_bytes

    def profile(self, rank: int) -> DeviceProfile:
        return self.profiles[self.kind_of[rank]]

    def memory_capacity(self, rank: int) -> float:
        return self.memory_override.get(rank, self.profile(rank).memory_bytes)

    def link_gbps(self, a: int, b: int) -> float:
        bw = self.cluster.link_gbps(a, b)
        measured = self.profile(a).link_gbps.get(self.kind_of[b])
        if measured and self.node_of[a] == self.node_of[b]:
            bw = measured
        return bw

    # ---- compute -------------------------------------------------------------------------------
    def micro_batch_tokens(self, lay: ZPLayout) -> float:
        return lay.sequences_per_attention_rank * self.seq_len / lay.micro_batches

    def tokens_per_expert(self, lay: ZPLayout) -> float:
        """Routed tokens one expert receives per micro-batch, from all attention ranks of the group."""
        return len(lay.attention) * self.micro_batch_tokens(lay) * self.dims.routed_top_k / self.dims.num_experts

    def expert_ms(self, lay: ZPLayout, global_rank: int, layer: int, local: int, backward: bool) -> float:
        n = lay.experts_on(local, layer)
        return n * self.profile(global_rank).expert_ms(self.tokens_per_expert(lay), backward) if n else 0.0

    def attn_ms(self, lay: ZPLayout, global_rank: int, layer: int, backward: bool) -> float:
        return attention_side_ms(self.dims, self.profile(global_rank), self.micro_batch_tokens(lay), layer, backward)

    # ---- communication -------------------------------------------------------------------------
    def a2a_ms(self, lay: ZPLayout, layer: int) -> float:
        """One dispatch (or combine: same bytes, reversed) of one micro-batch of ``layer``."""
        tok_bytes = self.micro_batch_tokens(lay) * self.dims.routed_top_k * self.dims.hidden_size * self.dtype_bytes
        share = {h: lay.experts_on(h, layer) / self.dims.num_experts for h in range(len(lay.ranks))}
        send = dict.fromkeys(range(len(lay.ranks)), 0.0)
        recv = dict.fromkeys(range(len(lay.ranks)), 0.0)
        for a in lay.attention:
            for h, f in share.items():
                if f and h != a:
                    ms = tok_bytes * f / (self.link_gbps(lay.ranks[a], lay.ranks[h]) * 1e6)
                    send[a] += ms
                    recv[h] += ms
        worst = max(max(send.values()), max(recv.values()))
        return worst + A2A_LATENCY_MS if worst else A2A_LATENCY_MS

    def allreduce_ms(self, nbytes: float, ranks: list[int]) -> float:
        """Ring all-reduce of ``nbytes`` over global ``ranks`` (bandwidth of the slowest ring link)."""
        n = len(ranks)
        if n <= 1 or nbytes <= 0:
            return 0.0
        ring = sorted(ranks)
        bw = min(self.link_gbps(ring[i], ring[(i + 1) % n]) for i in range(n))
        return 2 * (n - 1) / n * nbytes / (bw * 1e6) + A2A_LATENCY_MS * n

    def grad_sync_ms(self, lay: ZPLayout, local: int, group: str) -> float:
        grad_bytes = 2.0  # bf16 gradients
        if group == "attn_dp":
            params = self.dims.num_layers * self.dims.attention_half_params + self.dims.embedding_params
            return self.allreduce_ms(params * grad_bytes, [grp[a] for grp in lay.groups for a in lay.attention])
        params = sum(lay.experts_on(local, li) for li in range(self.dims.num_layers)) * self.dims.expert_params
        # Replicas of this rank's experts live at the same local rank of the other ZP groups.
        return self.allreduce_ms(params * grad_bytes, [grp[local] for grp in lay.groups])

    # ---- the duration callback of the engine ---------------------------------------------------
    def durations(self, lay: ZPLayout):
        """``f(local_rank, action) -> ms`` for :func:`engine.run_schedule`."""
        a2a_cache: dict[int, float] = {}

        def f(local: int, act: Action) -> float:
            g = lay.ranks[local]
            if act.kind in ("attn_fwd", "attn_bwd"):
                return self.attn_ms(lay, g, act.layer, act.kind == "attn_bwd")
            if act.kind in ("expert_fwd", "expert_bwd"):
                return self.expert_ms(lay, g, act.layer, local, act.kind == "expert_bwd")
            if act.kind == "head":
                return self.profile(g).head_time_ms(self.micro_batch_tokens(lay))
            if act.kind == "grad_sync":
                return self.grad_sync_ms(lay, local, act.group)
            if act.layer not in a2a_cache:
                a2a_cache[act.layer] = self.a2a_ms(lay, act.layer)
            return a2a_cache[act.layer]

        return f

    # ---- memory --------------------------------------------------------------------------------
    def memory_bytes(self, lay: ZPLayout, local: int) -> dict[str, float]:
        """Memory of one local rank: ``{"states", "activations", "total"}`` in bytes."""
        d, tr, g = self.dims, self.cluster.training, lay.ranks[local]
        prof = self.profile(g)
        n_experts = sum(lay.experts_on(local, li) for li in range(d.num_layers))
        params = n_experts * d.expert_params
        acts = 0.0
        routed = self.tokens_per_expert(lay) * lay.micro_batches * n_experts  # all micro-batches stay alive
        acts += routed * (d.hidden_size * self.dtype_bytes if tr.activation_checkpointing
                          else prof.expert_act_bytes_per_token)
        if local in lay.attention:
            params += d.num_layers * d.attention_half_params + d.embedding_params
            tokens = lay.sequences_per_attention_rank * self.seq_len
            # Without checkpointing each attention block keeps its own activations (the profile's figure is one
            # block's); with it, a layer keeps its input whatever it holds.
            per_tok = (prof.act_bytes_per_token_ckpt if tr.activation_checkpointing
                       else prof.act_bytes_per_token * d.attention_sublayers)
            acts += tokens * d.num_layers * per_tok
            acts += self.micro_batch_tokens(lay) * d.vocab_size * 4 * 2  # fp32 logits and their gradient
        states = params * tr.bytes_per_param
        return {"states": states, "activations": acts, "total": states + acts}

    def check_memory(self, lay: ZPLayout) -> None:
        """Raise :class:`MemoryError_` naming the first rank over its capacity, by how much, and what to change."""
        for local, g in enumerate(lay.ranks):
            mem = self.memory_bytes(lay, local)
            cap = self.memory_capacity(g)
            if mem["total"] > cap:
                role = "attention" if local in lay.attention else "expert"
                raise MemoryError_(
                    f"rank {g} ({self.kind_of[g]}, {role}) needs {mem['total'] / GiB:.1f} GiB "
                    f"(states {mem['states'] / GiB:.1f} + activations {mem['activations'] / GiB:.1f}) but has "
                    f"{cap / GiB:.1f} GiB: over by {(mem['total'] - cap) / GiB:.1f} GiB. Enable "
                    "training.activation_checkpointing, lower global_batch_sequences or seq_len, or add GPUs"
                )

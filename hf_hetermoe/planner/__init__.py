"""HeterMoE planner: profiles, cost model, zebra schedule, Asym-EA, step simulator and ``plan.json``.

No torch.distributed here (DESIGN.md layer table): the planner only produces data that the runtime executes.

Modules
-------
``model_dims``  ModelDims from a transformers config / dict / config.json (Mixtral, Qwen3-MoE, OLMoE, DeepSeek).
``cluster``     ``cluster.yaml``: nodes, GPUs (optionally emulated), links, training shape.
``profiles``    per-device-kind measured costs (``profiles.json``); ``presets`` builds them from published ratios.
``cost``        action durations and memory of a :class:`ZPLayout` (one zebra-parallel group).
``schedule``    the zebra schedule as data, its validator and printer; ``engine`` executes it in simulated time.
``asym_ea``     speed-proportional base placement and Algorithm 1 (asymmetric expert assignment).
``simulator``   zebra / DistEP / EP / speed-balanced DP step simulation; ``trace`` Chrome JSON and PNG.
``planner``     chooses roles, ZP groups, R and placement; ``plan`` is the ``plan.json`` format.

Schedule format (for the runtime)
---------------------------------
A plan holds one schedule for ZP group 0; every ZP group runs the same lists with its own global ranks
(``plan.zp_groups[g][local_rank]``). ``schedule.actions[local_rank]`` is an ordered list of actions::

    {"kind": "attn_fwd", "layer": 3, "mb": 1}
    {"kind": "dispatch_fwd", "layer": 3, "mb": 1, "group": "dispatch", "send_to": [2, 3], "recv_from": []}

kinds: ``attn_fwd``/``attn_bwd`` (this rank's attention half -- norms, attention, residual, router, shared
experts -- of ``layer`` on micro-batch ``mb``); ``expert_fwd``/``expert_bwd`` (this rank's routed experts of
``layer``, ids in ``placement[layer][local_rank]``); ``head`` (final norm, LM head, loss: forward and
backward of ``mb``); ``dispatch_fwd`` (all-to-all of token states, attention ranks -> expert holders);
``combine_fwd`` (all-to-all of expert outputs, holders -> attention ranks); ``dispatch_bwd`` (gradients of the
expert outputs, attention -> holders); ``combine_bwd`` (gradients of the expert inputs, holders -> attention);
``grad_sync`` (all-reduce of the ``attn_dp`` or ``expert_dp`` gradients at the end of the step).

Collectives name their process group and stream: ``dispatch`` and ``combine`` are two process groups over
all ranks of the ZP group, each driven from its own CUDA stream, so both directions run at once; every rank
of the ZP group calls every all-to-all (``send_to``/``recv_from`` empty = zero-size splits). Execution rule
(``engine``): issue actions in list order without host blocking; an action starts after the previous action
of its stream and after its dependencies (``schedule.dependencies``: e.g. ``attn_fwd(l, m)`` waits for
``combine_fwd(l-1, m)``). :func:`validate_schedule` checks dependencies, identical collective order on every
rank, and freedom from deadlock. An attention rank that holds experts (Asym-EA) lists its ``expert_fwd(l, m)``
after ``attn_fwd(l, m+1)`` (and ``expert_bwd`` likewise), always between its own ``dispatch_*(l, m)`` and
``combine_*(l, m)``, whose all-to-alls include its self-send; all-to-all buffers are per (layer, micro-batch).
"""

from .asym_ea import AsymEAReport, asym_ea, base_placement
from .cluster import ClusterConfig, GPUGroup, Node, TrainingShape
from .cost import CostModel, MemoryError_, ZPLayout
from .model_dims import ModelDims, model_dims
from .plan import Plan, PlanMismatchError
from .planner import PlanResult, format_plan, make_plan
from .presets import preset_profile, preset_profiles
from .profiles import DeviceProfile, ProfileSet
from .schedule import Action, Schedule, ScheduleError, build_zebra_schedule, format_schedule, validate_schedule
from .simulator import SimResult, simulate_data_parallel, simulate_layout

__all__ = [
    "Action", "AsymEAReport", "ClusterConfig", "CostModel", "DeviceProfile", "GPUGroup", "MemoryError_",
    "ModelDims", "Node", "Plan", "PlanMismatchError", "PlanResult", "ProfileSet", "Schedule", "ScheduleError",
    "SimResult", "TrainingShape", "ZPLayout", "asym_ea", "base_placement", "build_zebra_schedule", "format_plan",
    "format_schedule", "make_plan", "model_dims", "preset_profile", "preset_profiles", "simulate_data_parallel",
    "simulate_layout", "validate_schedule",
]

"""Data and checkpoints of a :class:`~hf_hetermoe.runtime.engine.ZebraEngine`: per-rank data loading, gathering
the full model on rank 0 (``state_dict``, ``save_pretrained``, ``push_to_hub``) and exact resume (``save_state`` /
``load_state``). Every method here is collective: call it on every rank."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from hf_hetermoe.checkpoint import atomic_save_pretrained, swap_in
from hf_hetermoe.errors import ConfigError

STATE_FORMAT = "hetermoe-state/1"


class EngineIO:
    """Mixed into :class:`ZebraEngine` (which provides ``plan``, ``groups``, ``parts``, ``device``, ``optimizer``,
    ``lr_scheduler``, ``step`` and the parameter lookups these methods use)."""

    # ------------------------------------------------------------------ data
    def dataloader(self, dataset, collate_fn: Callable | None = None, shuffle: bool = True, seed: int = 0,
                   epoch: int = 0, **kwargs) -> Iterable:
        """Per-rank batches of this rank's planned size: attention ranks get disjoint slices of each global batch
        (sizes from the plan, so speed-balanced shares work); expert ranks get ``None`` for each step."""
        from torch.utils.data import DataLoader

        global_batch = self.total_sequences * self.accum
        steps = len(dataset) // global_batch
        if steps == 0:
            raise ConfigError(f"dataset has {len(dataset)} examples, fewer than one global batch of {global_batch} "
                              "sequences (plan sequences x attention ranks x gradient_accumulation_steps)")
        if not self.is_attention:
            return [None] * (steps * self.accum)
        offset = sum(r.get("sequences", self.plan.sequences_per_attention_rank) for r in self.plan.ranks
                     if r["role"] == "attention" and r["rank"] < self.groups.rank)
        sampler = _ShareSampler(len(dataset), self.total_sequences, offset, self.sequences, steps * self.accum,
                                shuffle, seed + epoch)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, **kwargs)

    # ------------------------------------------------------------------ checkpoints
    def _holders(self, li: int) -> list[tuple[int, tuple[int, ...]]]:
        """(global rank in ZP group 0, expert ids) of layer ``li``."""
        zp0 = self.plan.zp_groups[0]
        return [(zp0[r], tuple(ids)) for r, ids in sorted(self.schedule.placement[li].items())]

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full model state dict, gathered on global rank 0 (None elsewhere). Collective: call on every rank."""
        rank = self.groups.rank
        src_attn = self.attention_ranks_global[0]
        local = self._local_params()
        by_expert = {n: li for li, n in enumerate(self.parts.expert_names) if n}
        sd: dict[str, torch.Tensor] = {}
        for key in self._full_keys:
            shape, dtype = self._shapes[key]
            module_name, _, pname = key.rpartition(".")
            if module_name in by_expert:
                li = by_expert[module_name]
                full = torch.empty(shape, dtype=dtype) if rank == 0 else None
                for holder, ids in self._holders(li):
                    if rank == holder:
                        t = local[key].detach()
                        if rank == 0:
                            full[list(ids)] = t.cpu()
                        else:
                            dist.send(t.contiguous(), dst=0)
                    elif rank == 0:
                        buf = torch.empty((len(ids), *shape[1:]), dtype=dtype, device=self.device)
                        dist.recv(buf, src=holder)
                        full[list(ids)] = buf.cpu()
                if rank == 0:
                    sd[key] = full
                continue
            if rank == src_attn:
                t = self._attention_tensor(key)
                if rank == 0:
                    sd[key] = t.cpu().clone()
                else:
                    dist.send(t.contiguous(), dst=0)
            elif rank == 0:
                buf = torch.empty(shape, dtype=dtype, device=self.device)
                dist.recv(buf, src=src_attn)
                sd[key] = buf.cpu()
        return sd if rank == 0 else None

    def _attention_tensor(self, key: str) -> torch.Tensor:
        module_name, _, name = key.rpartition(".")
        module = self.parts.model.get_submodule(module_name) if module_name else self.parts.model
        return getattr(module, name).detach()

    def save_pretrained(self, save_directory: str | os.PathLike, max_shard_size: str | int = "5GB",
                        **kwargs) -> Path | None:
        """Gather every part into one standard transformers checkpoint on global rank 0, written atomically
        (temporary directory, then rename). Collective: call on every rank. Returns the path on rank 0."""
        sd = self.state_dict()
        path = None
        if sd is not None:
            model = self.full_model(sd)
            path = atomic_save_pretrained(model, save_directory, max_shard_size=max_shard_size, **kwargs)
        dist.barrier()
        return path

    def full_model(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        """A plain transformers model (CPU) holding ``state_dict``, built without initialising weights."""
        model = self.parts.model
        config = copy.deepcopy(model.config)
        with torch.device("meta"):
            fresh = type(model)(config)
        fresh.load_state_dict(state_dict, strict=True, assign=True)
        for name, buf in list(fresh.named_buffers()):
            if buf.is_meta:
                module_name, _, bname = name.rpartition(".")
                module = fresh.get_submodule(module_name) if module_name else fresh
                src = model.get_submodule(module_name) if module_name else model
                source = getattr(src, bname, None)
                module._buffers[bname] = source.detach().cpu().clone() if source is not None and not source.is_meta \
                    else torch.zeros(buf.shape, dtype=buf.dtype)
        if getattr(config, "tie_word_embeddings", False):
            fresh.tie_weights()
        return fresh

    def push_to_hub(self, repo_id: str, private: bool | None = None, commit_message: str = "hf-hetermoe fine-tune",
                    **kwargs) -> str | None:
        """Gather the model (as :meth:`save_pretrained`) and upload it with huggingface_hub from global rank 0.
        Collective. Returns the commit URL on rank 0."""
        sd = self.state_dict()
        url = None
        try:
            if sd is not None:
                url = str(self.full_model(sd).push_to_hub(repo_id, private=private, commit_message=commit_message,
                                                          **kwargs))
        finally:
            dist.barrier()
        return url

    def _fingerprint(self) -> str:
        body = json.dumps({"schedule": self.plan.schedule, "zp_groups": self.plan.zp_groups}, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def save_state(self, directory: str | os.PathLike) -> None:
        """Every rank's parameters, optimizer, scheduler, step counters and RNG states, so that
        :meth:`load_state` resumes exactly. Written atomically; the directory must be shared by all nodes."""
        target = Path(directory).resolve()
        names = [None]
        if self.groups.rank == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() and not target.is_dir():
                raise FileExistsError(f"{target} exists and is not a directory; choose another path")
            names[0] = tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent)
        dist.broadcast_object_list(names, src=0)
        staging = Path(names[0])
        state = {
            "format": STATE_FORMAT, "rank": self.groups.rank, "world": self.groups.world,
            "fingerprint": self._fingerprint(), "step": self.step, "micro": self._micro,
            "params": {n: q.detach().cpu() for n, q in self._local_params().items()},
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler else None,
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None},
        }
        torch.save(state, staging / f"rank{self.groups.rank:05d}.pt")
        dist.barrier()
        if self.groups.rank == 0:
            (staging / "hetermoe_state.json").write_text(json.dumps(
                {"format": STATE_FORMAT, "world": self.groups.world, "step": self.step,
                 "fingerprint": self._fingerprint()}) + "\n")
            swap_in(staging, target)
        dist.barrier()

    def load_state(self, directory: str | os.PathLike) -> None:
        """Restore what :meth:`save_state` wrote (same plan and world size)."""
        path = Path(directory) / f"rank{self.groups.rank:05d}.pt"
        if not path.is_file():
            raise ConfigError(f"{path} not found: {directory} is not a hetermoe state of this job "
                              f"(world {self.groups.world}); pass the directory engine.save_state wrote")
        state = torch.load(path, map_location=self.device, weights_only=False)
        if state.get("format") != STATE_FORMAT or state["world"] != self.groups.world:
            raise ConfigError(f"{path}: saved by a job of world {state.get('world')} ({state.get('format')}), this "
                              f"job has {self.groups.world}; resume with the same plan")
        if state["fingerprint"] != self._fingerprint():
            raise ConfigError(f"{path} was saved under a different plan (schedule/placement); resume with the "
                              "plan.json it was trained with")
        local = self._local_params()
        if set(state["params"]) != set(local):
            raise ConfigError(f"{path}: parameter names differ from this rank's part; same plan and model needed")
        with torch.no_grad():
            for n, q in local.items():
                q.copy_(state["params"][n])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["lr_scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step, self._micro = state["step"], state["micro"]
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and state["rng"]["cuda"] is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
        dist.barrier()


class _ShareSampler:
    """Batch sampler: step ``s`` of a shuffled order takes indices ``[s*G, (s+1)*G)``; this rank the slice
    ``[offset, offset + size)`` of it (``G`` = all attention ranks' sequences)."""

    def __init__(self, n: int, global_batch: int, offset: int, size: int, steps: int, shuffle: bool, seed: int):
        self.n, self.g, self.offset, self.size, self.steps = n, global_batch, offset, size, steps
        self.shuffle, self.seed = shuffle, seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed)
            order = torch.randperm(self.n, generator=gen).tolist()
        else:
            order = list(range(self.n))
        for s in range(self.steps):
            start = s * self.g + self.offset
            yield order[start:start + self.size]

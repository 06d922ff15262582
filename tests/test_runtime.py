"""The zebra runtime on CPU over gloo: multi-process jobs must train exactly like one process.

On CPU by design, also on a GPU machine: worker processes see no GPU (``CUDA_VISIBLE_DEVICES=``), in-process engines
get ``device="cpu"``, and the module's process group is torn down after it (later modules may want NCCL).

Each job starts its ranks as separate processes (RANK/WORLD_SIZE/MASTER_* as torchrun sets them) running
``tests/_zebra_worker.py``; the reference is the same worker in plain single-process mode. Tiny Mixtral, fp32,
router aux loss on, global-norm clipping on; 5 AdamW steps; losses and every parameter within 1e-5 relative.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from hf_hetermoe.errors import ConfigError
from hf_hetermoe.planner.plan import Plan, PlanMismatchError
from hf_hetermoe.runtime import dp_plan, ep_plan, plan_from_layout, zebra_plan

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_zebra_worker.py"
SEQ_LEN = 16
TOL = 1e-5


def tiny_config() -> MixtralConfig:
    return MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.02)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("zebra") / "init"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _own_process_group():
    """No process group inherited from an earlier module (it may be NCCL), and none left behind for the next."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _cpu_env(**extra: str) -> dict[str, str]:
    """The environment of a job's processes: no GPU visible, so every rank runs on the CPU over gloo."""
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    return _cpu_env(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")


def run_job(tmp: Path, model_dir: Path, cases: list[dict], world: int, timeout: float = 600, **extra):
    job = {"model": str(model_dir), "seq_len": SEQ_LEN, "seed": 1, "out": str(tmp), "cases": cases, **extra}
    path = tmp / "job.json"
    path.write_text(json.dumps(job))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(path)], env=_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs, codes = [], []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("zebra job hung past the test timeout") from None
        outs.append(out)
        codes.append(p.returncode)
    return codes, outs


def run_reference(tmp: Path, model_dir: Path, cases: list[dict]) -> None:
    job = {"model": str(model_dir), "seq_len": SEQ_LEN, "seed": 1, "out": str(tmp), "cases": cases}
    path = tmp / "job_ref.json"
    path.write_text(json.dumps(job))
    subprocess.run([sys.executable, str(WORKER), str(path), "--reference"], check=True, capture_output=True,
                   env=_cpu_env())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def assert_matches(tmp: Path, name: str) -> dict:
    out = tmp / name
    ref = json.loads((out / "reference.json").read_text())
    got = json.loads((out / "zebra.json").read_text())
    for i, (a, b) in enumerate(zip(got["losses"], ref["losses"], strict=True)):
        assert abs(a - b) <= TOL * abs(b), f"{name}: step {i} loss {a} vs single-process {b}"
    want = AutoModelForCausalLM.from_pretrained(out / "reference_model").state_dict()
    have = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()  # gathered by engine.save_pretrained
    assert set(want) == set(have)
    worst = max((_rel(have[k], want[k]), k) for k in want)
    assert worst[0] <= TOL, f"{name}: parameter {worst[1]} differs by {worst[0]:.2e} relative"
    return got


def _case(tmp: Path, name: str, plan: Plan, **kw) -> dict:
    path = tmp / f"{name}.plan.json"
    plan.save(path)
    return {"name": name, "plan": str(path), "steps": 5, "lr": 1e-3, "max_grad_norm": 1.0, **kw}


def _check_job(codes, outs):
    assert codes == [0] * len(codes), "\n".join(o[-3000:] for o in outs)


def test_plans_validate():
    cfg = tiny_config()
    p = zebra_plan(cfg, 1, 2, micro_batches=3, sequences_per_attention_rank=3, seq_len=SEQ_LEN, asym_ea={1: 1})
    assert p.world_size == 3 and p.placement[1]["0"] == [3] and p.placement[0].get("0") is None
    sched = p.get_schedule()  # validates: dependencies, collective order, no deadlock
    assert any(a.kind == "expert_fwd" for a in sched.actions[0])  # Asym-EA: the attention rank runs experts
    ep = ep_plan(cfg, 4, seq_len=SEQ_LEN)
    assert all(len(ids) == 1 for p_ in ep.placement for ids in p_.values())
    dp = dp_plan(cfg, [3, 1, 2, 2], seq_len=SEQ_LEN)
    assert [r["sequences"] for r in dp.ranks] == [3, 1, 2, 2] and len(dp.zp_groups) == 4
    with pytest.raises(ConfigError, match="asym_ea"):
        zebra_plan(cfg, 1, 2, asym_ea={0: 9})


def test_one_attention_two_expert_ranks(tmp_path, model_dir):
    """1 attention + 2 expert ranks, R = 1 and 3, Asym-EA off and on, padded batches; plus an exact resume from
    save_state."""
    cfg = tiny_config()
    cases = []
    for r in (1, 3):
        for asym in (False, True):
            plan = zebra_plan(cfg, 1, 2, micro_batches=r, sequences_per_attention_rank=3, seq_len=SEQ_LEN,
                              asym_ea={0: 1, 1: 2} if asym else None)
            extra = {"resume_at": 3} if (r, asym) == (3, True) else {}
            cases.append(_case(tmp_path, f"z1+2_R{r}_asym{int(asym)}", plan, **extra))
    # Local ranks in another order than global ranks (the planner does this): attention is global rank 2.
    permuted = plan_from_layout(cfg, [[2, 0, 1]], [0], [{1: (0, 1), 2: (2, 3)}, {1: (0,), 2: (1, 2), 0: (3,)}],
                                3, 3, SEQ_LEN)
    cases.append(_case(tmp_path, "z1+2_permuted", permuted))
    # Padded batches (attention_mask with zeros, labels -100 on padding): masks reach attention and the aux loss.
    # No clipping here: the engine's global norm is summed in fp64 and torch's clip_grad_norm_ in fp32; the ~1e-7
    # coefficient difference is amplified by AdamW on an embedding row whose first gradient arrives mid-run
    # (measured 8e-5 on this data; exact with an fp64 reference).
    padded = zebra_plan(cfg, 1, 2, micro_batches=3, sequences_per_attention_rank=3, seq_len=SEQ_LEN, asym_ea={0: 1})
    cases.append(_case(tmp_path, "z1+2_R3_padded", padded, pad=True, max_grad_norm=None))
    run_reference(tmp_path, model_dir, cases)
    _check_job(*run_job(tmp_path, model_dir, cases, world=3))
    for rank in (1, 2):  # expert ranks keep only their routed experts; the rest of the model is meta
        held = json.loads((tmp_path / "z1+2_R1_asym0" / f"held{rank}.json").read_text())
        assert held["role"] == "expert" and held["held"]
        assert all(".experts." in n for n in held["held"]), held["held"]
    attn = json.loads((tmp_path / "z1+2_R1_asym0" / "held0.json").read_text())["held"]
    assert "model.embed_tokens.weight" in attn and not any(".experts." in n for n in attn)
    for c in cases:
        got = assert_matches(tmp_path, c["name"])
        if "resumed_losses" in got:
            assert got["resumed_from"] == 3
            assert got["resumed_losses"] == got["losses"][3:], "resume from save_state changed the losses"


def test_two_attention_two_expert_ranks_and_baselines(tmp_path, model_dir):
    """2 attention + 2 expert ranks (one ZP group, and two ZP groups of 1+1), R = 1 and 3, Asym-EA off and on;
    EP and speed-balanced DP run on the same engine and match too."""
    cfg = tiny_config()
    cases = []
    for r in (1, 3):
        for asym in (False, True):
            plan = zebra_plan(cfg, 2, 2, micro_batches=r, sequences_per_attention_rank=3, seq_len=SEQ_LEN,
                              asym_ea={1: 2} if asym else None)
            cases.append(_case(tmp_path, f"z2+2_R{r}_asym{int(asym)}", plan))
    cases.append(_case(tmp_path, "zp2x(1+1)_R3", zebra_plan(cfg, 1, 1, micro_batches=3, sequences_per_attention_rank=3,
                                                             seq_len=SEQ_LEN, zp_groups=2)))
    cases.append(_case(tmp_path, "ep4", ep_plan(cfg, 4, sequences_per_rank=2, seq_len=SEQ_LEN)))
    cases.append(_case(tmp_path, "dp_balanced", dp_plan(cfg, [3, 1, 2, 2], seq_len=SEQ_LEN)))
    run_reference(tmp_path, model_dir, cases)
    _check_job(*run_job(tmp_path, model_dir, cases, world=4))
    for c in cases:
        assert_matches(tmp_path, c["name"])


def test_lost_rank_ends_every_rank(tmp_path, model_dir):
    """SIGKILL one expert rank mid-run: the others exit non-zero within the timeout naming it; the checkpoint
    written before stays loadable."""
    cfg = tiny_config()
    plan = zebra_plan(cfg, 1, 2, micro_batches=3, sequences_per_attention_rank=3, seq_len=SEQ_LEN)
    case = _case(tmp_path, "killed", plan, steps=4, save_pretrained_at=1, kill=[2, 2])
    t0 = time.monotonic()
    codes, outs = run_job(tmp_path, model_dir, [case], world=3, timeout=240, timeout_s=8)
    assert codes[2] == -9
    assert codes[0] != 0 and codes[1] != 0, outs
    assert time.monotonic() - t0 < 180
    for out in outs[:2]:
        assert "rank 2" in out or "rank(s) [2]" in out, out[-2000:]
    ckpt = tmp_path / "killed" / "checkpoint"
    AutoModelForCausalLM.from_pretrained(ckpt)  # intact
    assert not list((tmp_path / "killed").glob(".checkpoint.saving-*"))


def test_launch_cpu(tmp_path, model_dir):
    """`hetermoe launch --cluster ... --model ...` plans, runs accelerate's multi-process CPU mode, and the example
    fine-tunes, saves and reloads in plain transformers."""
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "nodes:\n  - name: n0\n    gpus:\n      - {device: \"NVIDIA H100 80GB HBM3\", count: 1}\n"
        "      - {device: \"NVIDIA H100 80GB HBM3\", count: 2, emulate: v100-like}\n"
        "training:\n  seq_len: 32\n  global_batch_sequences: 4\n  max_micro_batches: 2\n"
    )
    env = _cpu_env(PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--cluster", str(cluster), "--model", str(model_dir),
           "--plan-out", str(tmp_path / "plan" / "plan.json"), "--main_process_port", str(_free_port()),
           str(ROOT / "examples" / "finetune_hetero.py"), "--model", str(model_dir), "--output", str(tmp_path / "out"),
           "--steps", "2", "--timeout", "60"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = Plan.load(tmp_path / "plan" / "plan.json")
    assert plan.world_size == 3
    assert "reloaded in plain transformers" in proc.stdout
    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final")
    # Close the loop: the example saved its last step; plan again from profiles fitted to it.
    assert (tmp_path / "out" / "step.json").is_file()
    again = [x if x != str(tmp_path / "plan" / "plan.json") else str(tmp_path / "plan2" / "plan.json") for x in cmd]
    again[again.index("--main_process_port") + 1] = str(_free_port())
    again[again.index("--output") + 1] = str(tmp_path / "out2")
    again[again.index("--steps") + 1] = "1"
    again[4:4] = ["--feedback", str(tmp_path / "out" / "step.json")]  # after "launch"
    proc = subprocess.run(again, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "profiles fitted to" in proc.stdout
    assert Plan.load(tmp_path / "plan2" / "plan.json").world_size == 3


def test_launch_matches_single_process(tmp_path, model_dir):
    """The correctness check through `hetermoe launch --plan` (accelerate's MULTI_CPU processes)."""
    plan = zebra_plan(tiny_config(), 1, 2, micro_batches=3, sequences_per_attention_rank=3, seq_len=SEQ_LEN,
                      asym_ea={1: 1})
    case = _case(tmp_path, "launched", plan)
    run_reference(tmp_path, model_dir, [case])
    job = {"model": str(model_dir), "seq_len": SEQ_LEN, "seed": 1, "out": str(tmp_path), "cases": [case]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    cmd = [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--plan", case["plan"], "--main_process_port",
           str(_free_port()), str(WORKER), str(tmp_path / "job.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_cpu_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_matches(tmp_path, "launched")


def test_launch_rejects_mismatched_process_count(tmp_path):
    plan = zebra_plan(tiny_config(), 1, 2, seq_len=SEQ_LEN)
    plan.save(tmp_path / "plan.json")
    cmd = [sys.executable, "-m", "hf_hetermoe.cli", "launch", "--plan", str(tmp_path / "plan.json"),
           "--num_processes", "2", "train.py"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_cpu_env())
    assert proc.returncode != 0 and "plan is for 3 processes" in proc.stderr + proc.stdout


def test_distribute_rejects_wrong_world(model_dir):
    plan = zebra_plan(tiny_config(), 1, 2, seq_len=SEQ_LEN)
    with pytest.raises(PlanMismatchError, match="3 GPUs but this job has 1"):
        plan.check_world(1)


def _runtime_families():
    from hf_hetermoe.model_patches import MODEL_PATCHES

    return sorted(k for k, p in MODEL_PATCHES.items()
                  if p.anatomy is not None and p.anatomy.expert_fn is None and p.task != "seq2seq_lm")


@pytest.mark.parametrize("family", _runtime_families())
def test_families_in_one_process(family):
    """Every family the runtime accepts (decoder-only causal LMs, vision-language models on text): a world of one
    (the attention rank holds every expert, dispatch to itself), R = 2, one AdamW step, against plain training.
    Families whose config the planner cannot read fail with a ConfigError that names the missing field."""
    import copy
    import warnings

    import hf_hetermoe as hetermoe
    from hf_hetermoe.model_patches import get_model_patch
    from hf_hetermoe.model_patches.verify import build_tiny_model

    patch = get_model_patch(family)
    model = build_tiny_model(patch)
    ref = copy.deepcopy(model)
    try:
        plan = zebra_plan(model.config, 1, 0, micro_batches=2, sequences_per_attention_rank=2, seq_len=8)
    except ConfigError as err:
        assert "lacks" in str(err)
        pytest.skip(f"{family}: the planner cannot read its config ({err})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = hetermoe.distribute(model, plan, lambda ps: torch.optim.AdamW(ps, lr=1e-3), watchdog=False,
                                     device="cpu")
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = engine.train_step({"input_ids": ids}).loss
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    want = 0.0
    for i in range(2):
        out = ref(input_ids=ids[i:i + 1], labels=ids[i:i + 1])
        (out.loss / 2).backward()
        want += out.loss.item() / 2
    opt.step()
    noisy = family == "phimoe"  # PhiMoE jitters router inputs in training (random): compare loosely
    assert abs(loss - want) <= (1e-3 if noisy else 1e-5) * abs(want)
    got, ref_sd = engine.state_dict(), ref.state_dict()
    assert set(got) == set(ref_sd)
    worst = max((_rel(got[k], ref_sd[k]), k) for k in ref_sd)
    assert worst[0] <= (2e-2 if noisy else 1e-3), f"{family}: {worst[1]} differs by {worst[0]:.1e}"


def test_accumulation_checkpointing_scheduler_bf16(model_dir):
    """Gradient accumulation (2 calls = one step), activation checkpointing, an LR scheduler and global-norm
    clipping in a world of one match the plain loop; bf16 autocast trains with a loss close to fp32."""
    import warnings

    import hf_hetermoe as hetermoe

    ids = torch.randint(0, 64, (8, SEQ_LEN), generator=torch.Generator().manual_seed(3))

    def plain():
        model = hetermoe.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        losses = []
        for step in range(2):
            for a in range(2):
                for m in range(2):
                    chunk = ids[step * 4 + a * 2 + m:step * 4 + a * 2 + m + 1]
                    (model(input_ids=chunk, labels=chunk).loss / 4).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()
        with torch.no_grad():
            losses.append(float(model(input_ids=ids[:2], labels=ids[:2]).loss))
        return model.state_dict(), losses

    def zebra(**kw):
        model = hetermoe.prepare(AutoModelForCausalLM.from_pretrained(model_dir))
        plan = zebra_plan(model.config, 1, 0, micro_batches=2, sequences_per_attention_rank=2, seq_len=SEQ_LEN)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            halve = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s)  # noqa: E731
            engine = hetermoe.distribute(model, plan, lambda p: torch.optim.AdamW(p, lr=1e-3), watchdog=False,
                                         lr_scheduler=halve, device="cpu",
                                         gradient_accumulation_steps=2, max_grad_norm=0.5, **kw)
        stepped = [engine.train_step({"input_ids": ids[i * 2:(i + 1) * 2]}).optimizer_stepped for i in range(4)]
        assert stepped == [False, True, False, True] and engine.step == 2
        return engine.state_dict(), engine.eval_step({"input_ids": ids[:2]}).loss

    want, _ = plain()
    for kw in ({}, {"activation_checkpointing": True}):
        got, _ = zebra(**kw)
        worst = max((_rel(got[k], want[k]), k) for k in want)
        assert worst[0] <= 1e-5, f"{kw}: {worst}"
    _, loss32 = zebra()
    _, loss16 = zebra(mixed_precision="bf16")
    assert abs(loss16 - loss32) < 0.05 * loss32


def test_bad_input_errors(tmp_path, model_dir):
    """A plan for another model, a batch of the wrong size, a mask of the wrong shape, a state from another plan,
    no plan."""
    import warnings

    import hf_hetermoe as hetermoe

    cfg = tiny_config()
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    other = MixtralConfig(**{**cfg.to_dict(), "num_hidden_layers": 3})
    with pytest.raises(ConfigError, match="3 layers .* this model has 2"):
        hetermoe.distribute(model, zebra_plan(other, 1, 0, seq_len=SEQ_LEN), watchdog=False, device="cpu")
    monkey = os.environ.pop("HETERMOE_PLAN", None)
    try:
        with pytest.raises(ConfigError, match="hetermoe launch"):
            hetermoe.distribute(model, None, device="cpu")
    finally:
        if monkey is not None:
            os.environ["HETERMOE_PLAN"] = monkey
    plan = zebra_plan(cfg, 1, 0, micro_batches=2, sequences_per_attention_rank=2, seq_len=SEQ_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine = hetermoe.distribute(model, plan, lambda p: torch.optim.AdamW(p, lr=1e-3), watchdog=False,
                                     device="cpu")
    with pytest.raises(ConfigError, match=r"shows \d+ CUDA device\(s\): start at most"):
        hetermoe.distribute(model, plan, device=f"cuda:{torch.cuda.device_count()}")  # one GPU more than there are
    with pytest.raises(ConfigError, match="use a CUDA device or 'cpu'"):
        hetermoe.distribute(model, plan, device="meta")
    ids = torch.randint(0, 64, (3, SEQ_LEN))
    with pytest.raises(ConfigError, match="3 sequences but the plan gives this attention rank 2"):
        engine.train_step({"input_ids": ids})
    with pytest.raises(ConfigError, match="attention_mask has shape"):
        engine.train_step({"input_ids": ids[:2], "attention_mask": torch.ones(2, SEQ_LEN - 1, dtype=torch.long)})
    with pytest.raises(ConfigError, match="input_ids"):
        engine.train_step(None)
    assert engine._micro == 0 and engine.step == 0  # failed calls count for nothing
    engine.save_state(tmp_path / "state")
    model2 = AutoModelForCausalLM.from_pretrained(model_dir)
    plan2 = zebra_plan(cfg, 1, 0, micro_batches=1, sequences_per_attention_rank=2, seq_len=SEQ_LEN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        engine2 = hetermoe.distribute(model2, plan2, lambda p: torch.optim.AdamW(p, lr=1e-3), watchdog=False,
                                      device="cpu")
    with pytest.raises(ConfigError, match="different plan"):
        engine2.load_state(tmp_path / "state")
    with pytest.raises(ConfigError, match="not a hetermoe state"):
        engine2.load_state(tmp_path)


def test_bench_zebra_smoke(tmp_path):
    """benchmarks/bench_zebra.py runs end to end on 2 CPU ranks (gloo, tiny model): planned, EP, DP and a static
    zebra layout each write a CSV row; the planned step is saved and re-planned from (`replanned`)."""
    import csv

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "benchmarks" / "bench_zebra.py"), "--models", "tiny", "--seq-lens", "64", "--tokens", "512",
           "--steps", "1", "--warmup", "1", "--methods", "planned,replanned,EP,DP,zebra", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env=_cpu_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "zebra_cpu_w2.csv")))
    assert [r["method"] for r in rows] == ["planned", "replanned", "EP", "DP", "zebra"]
    assert all(float(r["tokens_per_s"]) > 0 for r in rows)
    step = json.loads((tmp_path / "zebra_step_cpu_w2_tiny_64.json").read_text())
    assert len(step["busy_ms"]) == 2 and step["step_ms"] > 0

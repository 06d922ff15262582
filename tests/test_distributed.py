"""A prepared model under data parallelism, as ``accelerate launch`` fine-tuning runs it: DDP through accelerate
(MULTI_CPU over gloo here; fp32, and bf16 mixed precision), and FSDP2's ``fully_shard`` (what accelerate's FSDP2
plugin applies on GPUs; accelerate runs no FSDP on CPU). Two ranks, each on its own batches, must train exactly as
one process that averages their losses: same per-rank losses at every step, same parameters after the AdamW steps
(experts on the kernels' autograd, fused loss, fused RMSNorm)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig

import hf_hetermoe as hetermoe

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_dist_worker.py"
sys.path.insert(0, str(WORKER.parent))
from _dist_worker import DEADLINE_MARK as WORKER_DEADLINE_MARK  # noqa: E402
from _dist_worker import LR, batches  # noqa: E402

WORLD = 2
TOL_BF16 = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "init"
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.02)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", **extra)


def _excerpt(output: str, n: int = 4000) -> str:
    """The end of a rank's output; where a deadline stopped it, the start of its stack report (innermost first)."""
    at = output.find(WORKER_DEADLINE_MARK)
    return output[-n:] if at < 0 else output[at:at + n]


def _run(launch: Callable[[], list[subprocess.Popen]], timeout: float = 300, attempts: int = 2) -> list[str]:
    """Start the ranks with ``launch`` and wait for them. A job that hangs (a worker's faulthandler deadline, or
    ``timeout`` here) is killed with its process group, its output shown, and started once more: the CI machines are
    shared, and a hung run there must say where it hung instead of only that it did. Returns each process's output."""
    for attempt in range(1, attempts + 1):
        procs, outs, hung = launch(), [], False
        for p in procs:
            try:
                outs.append(p.communicate(timeout=timeout)[0])
            except subprocess.TimeoutExpired:
                hung = True
                for q in procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(q.pid, signal.SIGKILL)
                outs.append(p.communicate()[0])
        hung = hung or any(p.returncode != 0 and WORKER_DEADLINE_MARK in o for p, o in zip(procs, outs))
        tail = "\n".join(_excerpt(o) for o in outs)
        if not hung:
            assert all(p.returncode == 0 for p in procs), tail
            return outs
        warnings.warn(f"the distributed job hung (attempt {attempt} of {attempts}); its output:\n{tail}", stacklevel=2)
    raise AssertionError(f"the distributed job hung {attempts} times; the last run's output:\n{tail}")


def _single_process(
    model_dir: Path, steps: int, bf16: bool = False, device: str = "cpu", world: int = WORLD
) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """The same training in one process: each step averages the ranks' losses (what DDP and FSDP average); with
    ``bf16``, the forwards under CPU autocast, as accelerate's ``--mixed_precision bf16`` runs them."""
    model = hetermoe.prepare(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    data = [batches(r, model.config.vocab_size, steps) for r in range(world)]
    losses = [[] for _ in range(world)]
    for step in range(steps):
        total = 0.0
        for r in range(world):
            ids = data[r][step].to(device)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss.float()
            losses[r].append(loss.item())
            total = total + loss / world
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses, {k: v.detach().cpu() for k, v in model.named_parameters()}


def _assert_same_training(out: Path, model_dir: Path, bf16: bool = False, device: str = "cpu") -> dict:
    result = json.loads((out / "result.json").read_text())
    assert result["fused_loss"] and result["fused_rms_norm"]
    params = torch.load(out / "params.pt")
    want_losses, want_params = _single_process(model_dir, len(result["losses"][0]), bf16, device, result["world"])
    # On CUDA the Triton kernels in fp32 (TF32 off) reduce in other orders than one process's do.
    tol = TOL_BF16 if bf16 else 1e-5 if device == "cpu" else 1e-4
    for rank, (got, want) in enumerate(zip(result["losses"], want_losses, strict=True)):
        for step, (a, b) in enumerate(zip(got, want, strict=True)):
            assert abs(a - b) <= tol * abs(b), f"rank {rank} step {step}: loss {a} vs one process {b}"
    assert set(params) == set(want_params)
    init = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    assert all(not torch.equal(params[k], init[k]) for k in params)  # every parameter was trained
    for name, want in want_params.items():
        err = float((params[name].double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
        assert err <= tol, f"{name} differs by {err:.2e} relative from one-process training"
    return result


def _accelerate_cli() -> str:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    return accelerate


@pytest.mark.parametrize("mixed", ["no", "bf16"])
def test_ddp_through_accelerate_launch(tmp_path, model_dir, mixed):
    accelerate = _accelerate_cli()
    def launch() -> list[subprocess.Popen]:
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(WORLD), "--num_machines", "1",
               "--mixed_precision", mixed, "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(_free_port()), str(WORKER), "ddp", str(model_dir), str(tmp_path)]
        # Without GPUs accelerate runs --multi_gpu processes as MULTI_CPU (gloo) when asked to use the CPU.
        return [subprocess.Popen(cmd, env=_cpu_env(ACCELERATE_USE_CPU="true"), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)]

    _run(launch)
    result = _assert_same_training(tmp_path, model_dir, bf16=mixed == "bf16")
    assert (result["kind"], result["world"]) == ("MULTI_CPU", WORLD)
    if mixed == "bf16":  # autocast really ran: the losses are bf16's, not fp32's
        fp32, _ = _single_process(model_dir, len(result["losses"][0]))
        assert max(abs(a - b) / abs(b) for got, want in zip(result["losses"], fp32)
                   for a, b in zip(got, want)) > 5e-6


def _ranks(cmd: list[str], world: int = WORLD, cuda: bool = False, **env: str) -> Callable[[], list[subprocess.Popen]]:
    """``cmd`` once per rank with the torch.distributed environment set (what torchrun sets); each on its own GPU
    with ``cuda``."""

    def launch() -> list[subprocess.Popen]:
        port = str(_free_port())
        base = dict(os.environ, PYTHONUNBUFFERED="1", HETERMOE_TEST_DEVICE="cuda") if cuda else _cpu_env()
        return [
            subprocess.Popen(
                cmd,
                env=dict(base, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port, **env),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )
            for r in range(world)
        ]

    return launch


def _torch_launch(
    mode: str, model_dir: Path, out: Path, world: int = WORLD, cuda: bool = False, **env: str
) -> Callable[[], list[subprocess.Popen]]:
    """The distributed worker in ``mode``, one process per rank."""
    return _ranks([sys.executable, str(WORKER), mode, str(model_dir), str(out)], world, cuda, **env)


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp2-checkpointing"])
def test_fsdp2_fully_sharded(tmp_path, model_dir, mode):
    _run(_torch_launch(mode, model_dir, tmp_path))
    result = _assert_same_training(tmp_path, model_dir)
    assert result["kind"] == "DTensor"  # the experts' weights were sharded, and gathered for each forward


@pytest.mark.parametrize("mode", ["zero2", "zero3", "zero3-checkpointing"])
def test_deepspeed_zero(tmp_path, model_dir, mode):
    """ZeRO-2 and ZeRO-3 (weights partitioned by ``zero.Init`` while loading, before ``prepare``): ``prepare``'s
    checks gather them, and the fused loss's gradient reaches the head's weights after ZeRO-3 gathers them again;
    with activation checkpointing, the recomputed forwards gather the layers' weights once more."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (bash dev.sh test installs it)")
    _run(_torch_launch(mode, model_dir, tmp_path, DS_ACCELERATOR="cpu"))
    result = _assert_same_training(tmp_path, model_dir)
    assert result["kind"] == f"ZeRO-{mode[4]}"



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["zero3", "zero3-checkpointing"])
def test_deepspeed_zero3_on_cuda(tmp_path, model_dir, mode):
    """ZeRO-3 on GPUs (one rank per GPU, up to two; one GPU still partitions and gathers every weight around each
    use), the experts on the Triton kernels and the fused loss's relay under CUDA: trains as one process on the same
    GPU."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed")
    world = min(WORLD, torch.cuda.device_count())
    _run(_torch_launch(mode, model_dir, tmp_path, world=world, cuda=True))
    result = _assert_same_training(tmp_path, model_dir, device="cuda")
    assert (result["kind"], result["world"]) == ("ZeRO-3", world)


FINETUNE = ROOT / "examples" / "finetune.py"
TINY = ["--batch-size", "4", "--seq-len", "32", "--hidden-size", "32", "--layers", "2", "--experts", "4"]


def _deepspeed_finetune(tmp_path: Path, stage: int, mixed: str, *args: str, save_16bit: bool = True) -> list[str]:
    """``accelerate launch --use_deepspeed --deepspeed_config_file ... examples/finetune.py ARGS`` on two CPU ranks.
    ZeRO-3 partitions every weight (persistence threshold 0: by default it keeps weights under 1e5 elements whole
    in every rank, which would be all of this tiny model's)."""
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": save_16bit}
    config = {"zero_optimization": zero, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
    path = tmp_path / f"zero{stage}-{mixed}-{save_16bit}.json"
    path.write_text(json.dumps(config))
    return [_accelerate_cli(), "launch", "--use_deepspeed", "--deepspeed_config_file", str(path),
            "--zero3_init_flag", "true", "--num_processes", str(WORLD), "--num_machines", "1",
            "--mixed_precision", mixed, "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
            str(FINETUNE), *args]


@pytest.mark.parametrize(("stage", "mixed", "accumulate"), [(2, "no", "2"), (3, "bf16", "1")])
def test_finetune_script_under_accelerate_deepspeed(tmp_path, stage, mixed, accumulate):
    """The fine-tuning script as users launch it with DeepSpeed: it trains, gathers the ranks' slices of every weight
    into a standard checkpoint (ZeRO-3 partitions them), and that checkpoint, reloaded in plain transformers, gives
    the trained model's logits. With ZeRO-3 it then fine-tunes on from that checkpoint, loaded partitioned
    (``zero.Init``) before ``prepare``. ZeRO-2 accumulates gradients over two batches (DeepSpeed's accumulation,
    set by accelerate). Each also resumes from its training state after step 2 (``--resume``) to the same weights.
    The learning-rate schedule ends at zero after --steps optimizer steps on two processes (accelerate steps the
    scheduler once per process)."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (bash dev.sh test installs it)")
    from safetensors.torch import load_file
    from transformers import AutoConfig

    def launch(*args: str) -> Callable[[], list[subprocess.Popen]]:
        return lambda: [subprocess.Popen(_deepspeed_finetune(tmp_path, stage, mixed, "--steps", "3",
                                                             "--gradient-accumulation-steps", accumulate, *args),
                                         env=_cpu_env(DS_ACCELERATOR="cpu"), stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True)]

    first, resumed, second = tmp_path / "first", tmp_path / "resumed", tmp_path / "second"
    runs = [(first, [*TINY, "--save-state-every", "2"]),  # its training state after step 2 in first-state
            (resumed, [*TINY, "--resume", "--state-dir", str(tmp_path / "first-state")]),
            (second, ["--model", str(first)])]
    for out, args in runs[: 2 + (stage == 3)]:
        (log,) = _run(launch(*args, "--output-dir", str(out)))
        assert f"mixed precision {mixed}" in log, log[-3000:]  # accelerate launch's choice, not the script's own
        assert "-> OK" in log and "learning rate at the end 0.0e+00" in log, log[-3000:]
        config = AutoConfig.from_pretrained(out)
        weights = load_file(out / "model.safetensors")
        assert weights["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
        expert_elements = sum(w.numel() for name, w in weights.items() if ".experts." in name)
        want = config.num_hidden_layers * config.num_local_experts * 3 * config.hidden_size * config.intermediate_size
        assert expert_elements == want  # whatever layout the checkpoint format uses, every expert weight whole
    # Resumed from the first run's state after step 2 (DeepSpeed's checkpoint of every rank's partitions, the
    # scheduler, the data position): the same final weights, bit for bit.
    want, got = load_file(first / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    if stage == 3:  # the second run trained on: its weights moved away from the first's
        after = load_file(second / "model.safetensors")
        assert not torch.equal(want["lm_head.weight"], after["lm_head.weight"])


def test_finetune_script_refuses_zero3_that_cannot_save(tmp_path):
    """ZeRO-3 without gathering 16-bit weights for saving would train and then fail to write the checkpoint: the
    script refuses before training, and says which setting to change."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (bash dev.sh test installs it)")
    out = tmp_path / "out"
    proc = subprocess.run(_deepspeed_finetune(tmp_path, 3, "no", "--steps", "3", *TINY, "--output-dir", str(out),
                                              save_16bit=False),
                          env=_cpu_env(DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "zero3_save_16bit_model: true" in proc.stdout + proc.stderr
    assert "fine-tuning" not in proc.stderr and not out.exists()


TRAINER_WORKER = ROOT / "tests" / "_trainer_worker.py"


def test_trainer_with_deepspeed_zero3(tmp_path):
    """transformers' ``Trainer`` with ``deepspeed=`` ZeRO-3 on two ranks, the model partitioned as it is built and
    prepared after: trains as the unprepared model does under the same Trainer (logged losses within 1e-5, every
    saved weight within 1e-5 relative), with the fused loss on every micro-batch, and ``save_model`` gathers a whole
    checkpoint."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (bash dev.sh test installs it)")
    from safetensors.torch import load_file

    results, weights = {}, {}
    for prepared in (False, True):
        out = tmp_path / ("prepared" if prepared else "plain")
        _run(_ranks([sys.executable, str(TRAINER_WORKER), str(out), str(int(prepared))], DS_ACCELERATOR="cpu"))
        results[prepared] = json.loads((out / "result.json").read_text())
        weights[prepared] = load_file(out / "final" / "model.safetensors")
    plain, prep = results[False], results[True]
    assert plain["world"] == prep["world"] == WORLD and len(prep["losses"]) == 3
    assert prep["fused"] == [True] * 6 and not any(plain["fused"])  # 3 steps x 2 micro-batches
    for a, b in zip(prep["losses"], plain["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (prep["losses"], plain["losses"])
    assert weights[True].keys() == weights[False].keys()
    assert weights[True]["model.embed_tokens.weight"].shape == (96, 32)  # gathered, not ZeRO-3's [0] slices
    for name, want in weights[False].items():
        err = float((weights[True][name].double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
        assert err <= 1e-5, f"{name} differs by {err:.2e} relative from the unprepared model's"

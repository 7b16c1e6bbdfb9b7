"""GPU check: the paths that only a GPU exercises, in one run of at most ~8 minutes on one GPU.

    python benchmarks/gpu_check.py [--only bf16,fsdp,...] [--dry-run]

Checks (each in its own try, so one failure does not hide the others):
  bf16, fp16   tiny-config training under `accelerate launch --mixed_precision …`: finite, falling loss; a run killed
               after its first checkpoint and resumed ends with the same weights as the straight run
  fsdp         the same under configs/accelerate/fsdp.yaml (FSDP v2, sharded state dict) with EMA: EMA moves between
               checkpoints, resume gives the same export
  deepspeed    the same under configs/accelerate/deepspeed_zero2.yaml, when deepspeed is installed
  sampling     LdmPipeline vs diffusers' StableDiffusionPipeline on identical components on CUDA (fp16), images/s
  vae_fp16     an SD-sized AutoencoderKL (512 px, 4 blocks) encode → decode in fp16: finite, close to fp32
  compile      torch.compile of LdmUNet: same output as eager, speed-up per call

Prints a Markdown table (with the card's name) for docs/. Without CUDA it stops with one line; `--dry-run` prints the
plan and the commands without running anything (what the test suite checks on CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
STEPS, CHECKPOINT = 40, 20  # the resumed run restarts from the checkpoint at step 20
LAUNCHES = {  # check → `accelerate launch` arguments
    "bf16": ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no"],
    "fp16": ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "fp16", "--dynamo_backend", "no"],
    "fsdp": ["--config_file", "configs/accelerate/fsdp.yaml", "--num_processes", "1"],
    "deepspeed": ["--config_file", "configs/accelerate/deepspeed_zero2.yaml", "--num_processes", "1"],
}
EXPECTED_TYPE = {"bf16": "NO", "fp16": "NO", "fsdp": "FSDP", "deepspeed": "DEEPSPEED"}


@dataclass
class Row:
    check: str
    ok: bool | None  # None: skipped
    result: str
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------
# Training checks (subprocesses: each launch is its own accelerate setup)


def train_command(check: str, inputs: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *LAUNCHES[check], "training/train_ldm.py",
            "--config", str(TINY), f"data.path={inputs / 'data'}", f"model.vae={inputs / 'model'}",
            f"model.text_encoder={inputs / 'model'}", f"train.output_dir={out}", f"train.max_steps={STEPS}",
            f"train.checkpoint_every={CHECKPOINT}", "train.keep_checkpoints=0", "train.log_every=1",
            "train.validation_every=0", f"train.distributed_type={EXPECTED_TYPE[check]}"]


def run_training(command: list[str]) -> None:
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        raise RuntimeError((errors or lines or ["exit status %d" % proc.returncode])[-1][:300])


def losses(out: Path) -> list[float]:
    """The per-step training loss the trainer logged to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((out / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "loss" in acc.Tags()["scalars"]:
            values += [(e.step, e.value) for e in acc.Scalars("loss")]
    return [v for _, v in sorted(values)]


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        return math.inf
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def training_check(check: str, work: Path, inputs: Path) -> str:
    """Straight run; a copy cut back to its step-20 checkpoint and resumed; their exports compared."""
    if check == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ModuleNotFoundError("deepspeed is not installed (pip install deepspeed)")
    straight, resumed = work / f"{check}-straight", work / f"{check}-resumed"
    run_training(train_command(check, inputs, straight))
    loss = losses(straight)
    if len(loss) < STEPS or not all(math.isfinite(v) for v in loss):
        raise RuntimeError(f"{len(loss)} losses logged, finite: {all(map(math.isfinite, loss))}")
    first, last = statistics.mean(loss[:5]), statistics.mean(loss[-10:])
    if not last < first:
        raise RuntimeError(f"loss did not fall: {first:.4f} → {last:.4f}")
    # the resumed copy: everything the straight run had at step 20
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns("pipeline", f"checkpoint-{STEPS}", "logs"))
    run_training(train_command(check, inputs, resumed))
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    diff = max_difference(straight / unet, resumed / unet)
    ema = "checkpoints/checkpoint-{}/ema.safetensors"
    ema_moved = max_difference(straight / ema.format(CHECKPOINT), straight / ema.format(STEPS))
    if not ema_moved > 0:
        raise RuntimeError("the EMA weights did not move between checkpoints (EMA tracks stale parameters)")
    if not diff < 1e-3:
        raise RuntimeError(f"resumed export differs from the straight one by {diff:.2e}")
    resume = "exact" if diff == 0 else f"max diff {diff:.1e}"
    return f"loss {first:.3f} → {last:.3f}; resume {resume}; EMA moved {ema_moved:.1e}"


# ----------------------------------------------------------------------------------------------------------
# In-process checks


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds per call after one warm-up, synchronising CUDA around each call."""
    import torch

    fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sampling_check() -> str:
    """LdmPipeline vs StableDiffusionPipeline on the same fp16 components, 25 DDIM steps with CFG, batch 8."""
    import torch
    from diffusers import StableDiffusionPipeline

    from ldm_app import LdmPipeline

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from sampling_speed import components

    c = {k: (v.to("cuda", torch.float16) if isinstance(v, torch.nn.Module) else v)
         for k, v in components("ldm").items()}
    ours = LdmPipeline(**c)
    theirs = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    kw = dict(num_inference_steps=25, guidance_scale=5.0, height=64, width=64, output_type="np")
    rates = {}
    for name, pipe in (("LdmPipeline", ours), ("diffusers", theirs)):
        pipe.set_progress_bar_config(disable=True)
        seconds = timed(lambda: pipe(["a cat"] * 8, generator=torch.Generator("cuda").manual_seed(0), **kw), 5)
        rates[name] = 8 / seconds
    return (f"LdmPipeline {rates['LdmPipeline']:.1f} img/s, StableDiffusionPipeline {rates['diffusers']:.1f} img/s "
            f"(×{rates['LdmPipeline'] / rates['diffusers']:.2f})")


def vae_fp16_check() -> str:
    """An SD-sized VAE (random weights, fixed seed) on a 512 px image: fp16 must stay finite and near fp32."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        sample_size=512).to("cuda").eval()
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0)).cuda() * 2 - 1
    with torch.no_grad():
        reference = vae.decode(vae.encode(image).latent_dist.mode()).sample
        half = vae.half()
        seconds = timed(lambda: half.decode(half.encode(image.half()).latent_dist.mode()).sample, 3)
        out = half.decode(half.encode(image.half()).latent_dist.mode()).sample.float()
    if not torch.isfinite(out).all():
        raise RuntimeError(f"{(~torch.isfinite(out)).sum().item()} non-finite values in the fp16 decode")
    return f"finite; max |fp16 − fp32| {(out - reference).abs().max().item():.1e}; {seconds * 1000:.0f} ms encode+decode"


def compile_check() -> str:
    """torch.compile(LdmUNet) against eager: the same prediction, and the time per call."""
    import torch

    from ldm_app import LdmUNet

    torch.manual_seed(0)
    unet = LdmUNet.from_preset("small", cross_attention_dim=768).to("cuda", torch.float16).eval()
    x = torch.randn(8, 4, 32, 32, device="cuda", dtype=torch.float16)
    t = torch.full((8,), 500, device="cuda")
    context = torch.randn(8, 77, 768, device="cuda", dtype=torch.float16)
    compiled = torch.compile(unet)
    with torch.no_grad():
        start = time.perf_counter()
        fast = compiled(x, t, context).sample
        compile_seconds = time.perf_counter() - start
        eager = unet(x, t, context).sample
        eager_s = timed(lambda: unet(x, t, context), 10)
        compiled_s = timed(lambda: compiled(x, t, context), 10)
    diff = (fast.float() - eager.float()).abs().max().item()
    if not diff < 5e-2:
        raise RuntimeError(f"compiled output differs from eager by {diff:.2e}")
    return (f"max diff {diff:.1e}; {eager_s * 1000:.1f} → {compiled_s * 1000:.1f} ms/call "
            f"(×{eager_s / compiled_s:.2f}); compiled in {compile_seconds:.0f} s")


# ----------------------------------------------------------------------------------------------------------


CHECKS = ["bf16", "fp16", "fsdp", "deepspeed", "sampling", "vae_fp16", "compile"]


def run_check(check: str, work: Path, inputs: Path | None) -> Row:
    start = time.perf_counter()
    try:
        if check in LAUNCHES:
            result = training_check(check, work, inputs)
        else:
            result = {"sampling": sampling_check, "vae_fp16": vae_fp16_check, "compile": compile_check}[check]()
        ok = True
    except ModuleNotFoundError as err:
        ok, result = None, f"skipped: {err}"
    except Exception as err:  # reported in the table; the other checks still run
        ok, result = False, f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return Row(check, ok, result, time.perf_counter() - start)


def table(rows: list[Row], card: str) -> str:
    mark = {True: "pass", False: "FAIL", None: "skip"}
    lines = [f"GPU check on {card}", "", "| check | | result | s |", "|---|---|---|---|"]
    lines += [f"| {r.check} | {mark[r.ok]} | {r.result} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks (default: all): "
                                                                  f"{', '.join(CHECKS)}")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands, run nothing")
    args = parser.parse_args()
    checks = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = sorted(set(checks) - set(CHECKS))
    if unknown:
        print(f"error: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}.", file=sys.stderr)
        return 2
    if args.dry_run:
        for check in checks:
            plan = " ".join(train_command(check, Path("INPUTS"), Path("RUN"))) if check in LAUNCHES else "in process"
            print(f"{check}: {plan}")
        return 0

    import torch

    if not torch.cuda.is_available():
        print("error: the GPU check needs a CUDA GPU, and torch sees none (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or with --dry-run to see the plan.", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work, inputs = Path(tmp), None
        if any(c in LAUNCHES for c in checks):
            from ldm_app.testing import write_tiny_run_inputs

            inputs = write_tiny_run_inputs(work / "inputs")
        rows = []
        for check in checks:
            rows.append(run_check(check, work, inputs))
            r = rows[-1]
            print(f"{check}: {'pass' if r.ok else 'skip' if r.ok is None else 'FAIL'} ({r.seconds:.0f} s) {r.result}",
                  flush=True)
    print()
    print(table(rows, card))
    return 1 if any(r.ok is False for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

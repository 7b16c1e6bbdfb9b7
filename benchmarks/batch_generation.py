"""Batch generation throughput: `ldm-app generate --prompts` on 1 process, on 2 processes (torchrun) and on Ray
(2 actors), side by side. Prints a table of medians and the ratios to 1 process.

    python benchmarks/batch_generation.py [--images 24] [--steps 10] [--batch 4] [--repeats 3] [--model default]

Every process (and every Ray actor) runs 1 CPU thread, so 2 of them can use 2 cores. The rate is the steady one:
images written after the first batch, over the time from the first batch's end to the last image (model loading and
Ray's start-up are left out; they are printed apart as the end-to-end time). The runs are interleaved so that a
change in the machine's load hits every engine alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {  # name → (launcher arguments, ldm-app arguments, extra environment)
    "1 process": ((), (), {}),
    "2 processes (torchrun)": (("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"), (),
                               {"ACCELERATE_USE_CPU": "true"}),
    "Ray, 2 actors": ((), ("--engine", "ray"), {}),
}


def run(engine: str, prompts: Path, out: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(steady images/s, end-to-end seconds) of one run."""
    launcher, extra, env = ENGINES[engine]
    command = [sys.executable, *launcher, "-m", "ldm_app", "generate", "--prompts", str(prompts), "-o", str(out),
               "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch), "--threads", "1",
               "--quiet", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    env.pop("RAY_ADDRESS", None)  # a local Ray
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{engine} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    done = sorted(p.stat().st_mtime for p in (out / ".records").glob("[0-9]*.json"))
    first = done[args.batch - 1]  # the end of the first batch
    return (len(done) - args.batch) / max(done[-1] - first, 1e-9), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=24, help="images per run")
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps per image")
    parser.add_argument("--batch", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--repeats", type=int, default=3, help="runs per engine (medians are reported)")
    parser.add_argument("--model", default="default", help="model to sample (default: the embedded one)")
    args = parser.parse_args()

    rates: dict[str, list[float]] = {name: [] for name in ENGINES}
    walls: dict[str, list[float]] = {name: [] for name in ENGINES}
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("".join(f"an emoji, number {i}\n" for i in range(args.images)))
        for repeat in range(args.repeats):  # interleaved
            for name in ENGINES:
                rate, wall = run(name, prompts, Path(tmp) / f"{name}-{repeat}".replace(" ", "_"), args)
                rates[name].append(rate)
                walls[name].append(wall)
                print(f"  {name}: {rate:.2f} images/s steady, {wall:.0f} s end to end", file=sys.stderr, flush=True)

    base = statistics.median(rates["1 process"])
    print(f"{args.images} images of model {args.model!r}, {args.steps} DDIM steps, batch {args.batch}, 1 thread per "
          f"process; median of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"{'engine':<26}{'images/s':>10}{'× 1 proc':>10}{'end to end s':>14}")
    for name in ENGINES:
        rate = statistics.median(rates[name])
        print(f"{name:<26}{rate:>10.2f}{rate / base:>10.2f}{statistics.median(walls[name]):>14.0f}")
    ray, two = statistics.median(rates["Ray, 2 actors"]), statistics.median(rates["2 processes (torchrun)"])
    print(f"Ray / torchrun: {ray / two:.2f}")


if __name__ == "__main__":
    main()

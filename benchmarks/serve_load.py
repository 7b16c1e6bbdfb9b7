"""Load test of `ldm-app serve` on the default model, beside the library in the same run.

Starts the server (a child process on 127.0.0.1, stopped by its PID), then for 1, 4 and 16 concurrent clients
posts A1111 txt2img requests (one image each, distinct prompts and seeds) for a fixed time, and prints images/s,
p50/p95 latency and errors. The baseline is the same requests made by one `LdmPipeline` in this process, one call
per image in sequence; ratio = serving throughput / library throughput. Server and library get the same number
of threads and never run at the same time.

    python benchmarks/serve_load.py [--seconds 20] [--clients 1,4,16] [--sampler ddim|lcm] [--threads 1]

With `--sampler lcm` both sides draw with the default model's distilled UNet: 4 steps, guidance 1 (its defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.error
import urllib.request

A1111_NAMES = {"ddim": "DDIM", "lcm": "LCM"}
PROMPTS = ["a cat", "red heart", "pizza", "rocket", "sun", "dog face", "star", "fire", "grinning face", "tree"]


def load_library(args: argparse.Namespace):  # noqa: ANN201
    """The default model loaded as the server loads it, warmed up (first calls allocate; the server gets the same)."""
    import torch

    from ldm_app.generation import use_sampler
    from ldm_app.serve.engine import Engine

    torch.set_num_threads(args.threads)
    pipe = Engine.load("default", [], None, "cpu", "fp32").pipe
    use_sampler(pipe, args.sampler)  # lcm: the distilled UNet and LCMScheduler, as the server swaps them in
    for _ in range(2):
        pipe(PROMPTS[0], num_inference_steps=args.steps, guidance_scale=args.guidance)
    return pipe


def library_throughput(pipe, args: argparse.Namespace) -> float:  # noqa: ANN001
    """Images/s of sequential one-image `LdmPipeline` calls with the requests' prompts and seeds."""
    import torch

    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < args.seconds:
        pipe(PROMPTS[count % len(PROMPTS)], num_inference_steps=args.steps, guidance_scale=args.guidance,
             generator=torch.Generator().manual_seed(count))
        count += 1
    return count / (time.perf_counter() - started)


def client(url: str, index: int, stop_at: float, latencies: list[float], errors: list[str]) -> None:
    i = 0
    while time.perf_counter() < stop_at:
        body = json.dumps({"prompt": PROMPTS[(index + i) % len(PROMPTS)], "seed": 1000 * index + i, "steps": ARGS.steps,
                           "cfg_scale": ARGS.guidance, "sampler_name": A1111_NAMES[ARGS.sampler]}).encode()
        request = urllib.request.Request(url + "/sdapi/v1/txt2img", body, {"Content-Type": "application/json"})
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=600) as r:
                json.loads(r.read())
            latencies.append(time.perf_counter() - started)
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as err:
            errors.append(str(err))
        i += 1


def serve_load(url: str, clients: int, seconds: float) -> dict:
    """Every client loops for `seconds`; requests still running at the end count when they finish."""
    latencies: list[float] = []
    errors: list[str] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(url, i, started + seconds, latencies, errors))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] if ordered else float("nan")
    return {"images_per_s": len(latencies) / elapsed, "p50": statistics.median(ordered) if ordered else float("nan"),
            "p95": p95, "errors": len(errors), "images": len(latencies)}


def main() -> None:
    from ldm_app.serve.process import start_server, stop_server

    os.environ["OMP_NUM_THREADS"] = str(ARGS.threads)  # the server child gets the library's thread count
    pipe = load_library(ARGS)
    before = library_throughput(pipe, ARGS)
    proc, url = start_server(["--device", "cpu", "--no-ui", "--max-batch", str(ARGS.max_batch),
                              "--max-queue", "64", "--threads", str(ARGS.threads)])
    try:
        serve_load(url, 1, min(5.0, ARGS.seconds))  # warm-up: first calls allocate
        rows = [(n, serve_load(url, n, ARGS.seconds)) for n in ARGS.clients]
    finally:
        stop_server(proc)
    after = library_throughput(pipe, ARGS)  # again: on a shared machine the load changes over the run
    library = (before + after) / 2
    print(f"\ndefault model, 64x64, {ARGS.steps} {ARGS.sampler} steps, CFG {ARGS.guidance:g}, {ARGS.threads} threads, "
          f"{ARGS.seconds:.0f} s per row, --max-batch {ARGS.max_batch}")
    print(f"library (one LdmPipeline call per image, in sequence): {library:.2f} images/s "
          f"(mean of {before:.2f} before and {after:.2f} after the server rows)\n")
    print("| clients | images/s | p50 latency (s) | p95 latency (s) | errors | ratio to library |")
    print("|---|---|---|---|---|---|")
    for n, r in rows:
        print(f"| {n} | {r['images_per_s']:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['errors']} | "
              f"{r['images_per_s'] / library:.2f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="Duration of each load level.")
    parser.add_argument("--clients", type=lambda s: [int(v) for v in s.split(",")], default=[1, 4, 16])
    parser.add_argument("--sampler", choices=sorted(A1111_NAMES), default="ddim")
    parser.add_argument("--steps", type=int, help="default: the sampler's (25; lcm 4)")
    parser.add_argument("--guidance", type=float, help="default: the sampler's (5; lcm 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the library and the server (more "
                        "than the idle cores makes OpenMP spin: 30x slower on a busy machine)")
    parser.add_argument("--max-batch", type=int, default=16)
    ARGS = parser.parse_args()
    from ldm_app.samplers import sampler_defaults

    ARGS.steps, ARGS.guidance = sampler_defaults(ARGS.sampler, ARGS.steps, ARGS.guidance)
    main()

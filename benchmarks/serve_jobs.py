"""Generation latency while a LoRA fine-tune runs on the same server (issue 25's fairness check).

One server app in this process (FastAPI's TestClient; the HTTP layer is the same, only no socket), on the default
model. Sequential A1111 txt2img requests (one image, 25 steps) are timed three ways: with no job running; while a
fine-tune job trains with the server's policy (the training thread yields to generation at each step boundary);
and while it trains without yielding (both threads compete for the cores). Prints median / p90 latency and the
training steps done meanwhile.

    OMP_NUM_THREADS=1 python benchmarks/serve_jobs.py [--requests 12] [--steps 25] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--requests", type=int, default=12, help="generation requests per condition")
    p.add_argument("--steps", type=int, default=25, help="denoising steps per request")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one pool shared by both threads)")
    p.add_argument("--batch-size", type=int, default=4, help="fine-tune batch size")
    args = p.parse_args()

    import torch
    from fastapi.testclient import TestClient

    from ldm_app.serve import Settings, create_app
    from ldm_app.serve.engine import Engine
    from ldm_app.testing import write_toy_dataset

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="ldm-app-bench-jobs-"))
    photos = write_toy_dataset(tmp / "photos", n=8, size=64, layout="sidecar")
    files = [("photos", (f.name, f.read_bytes(), "image/png")) for f in sorted(photos.iterdir())]
    engine = Engine.load(args.model, [], None, "cpu", "fp32")
    app = create_app(engine, Settings(ui=False, data_dir=str(tmp / "data")))
    jobs = app.state.jobs
    body = {"prompt": "a red heart", "steps": args.steps, "seed": 0}

    def latencies(client: TestClient) -> list[float]:
        out = []
        for i in range(args.requests):
            start = time.perf_counter()
            r = client.post("/sdapi/v1/txt2img", json={**body, "seed": i})
            assert r.status_code == 200, r.text
            out.append(time.perf_counter() - start)
            time.sleep(0.2)  # a person reading the picture: training gets the gaps
        return out

    def during_training(client: TestClient, name: str) -> tuple[list[float], int]:
        job = client.post("/ldm/v1/jobs/finetune-lora", files=files,
                          data={"name": name, "steps": "100000", "batch_size": str(args.batch_size),
                                "sample_every": "0", "checkpoint_every": "100000"}).json()["id"]
        while client.get(f"/ldm/v1/jobs/{job}").json()["progress"]["step"] < 3:  # past loading and caching
            time.sleep(0.2)
        first = client.get(f"/ldm/v1/jobs/{job}").json()["progress"]["step"]
        measured = latencies(client)
        trained = client.get(f"/ldm/v1/jobs/{job}").json()["progress"]["step"] - first
        client.delete(f"/ldm/v1/jobs/{job}")
        while client.get(f"/ldm/v1/jobs/{job}").json()["state"] != "cancelled":
            time.sleep(0.2)
        return measured, trained

    rows = []
    with TestClient(app) as client:
        latencies(client)[:2]  # warm-up
        rows.append(("no training job", latencies(client), 0))
        jobs.yield_to_generation = True
        rows.append(("training, yields at step boundaries (server default)", *during_training(client, "a")))
        jobs.yield_to_generation = False
        rows.append(("training, no yielding", *during_training(client, "b")))

    print(f"\n{args.requests} sequential txt2img requests ({args.steps} steps, 1 image, {args.model}), "
          f"torch threads {args.threads}, fine-tune batch {args.batch_size}\n")
    print("| condition | median latency (s) | p90 (s) | vs. idle | training steps meanwhile |")
    print("|---|---|---|---|---|")
    idle = statistics.median(rows[0][1])
    for name, values, trained in rows:
        p90 = sorted(values)[int(0.9 * (len(values) - 1))]
        print(f"| {name} | {statistics.median(values):.2f} | {p90:.2f} | {statistics.median(values) / idle:.2f}× "
              f"| {trained if trained else '–'} |")


if __name__ == "__main__":
    main()

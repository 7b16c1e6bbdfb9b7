"""The distilled LCM student against its teacher (the embedded default model), side by side in one run:
R-precision@1 (the evaluator CLIP of eval_default_model.py, 1 true caption + 99 random), Fréchet distance in the
evaluator's feature space (N generations vs all training images) and seconds per image, for

  teacher: DDIM 25 (the default), DPM++ 10 and 6, and DPM++ at the student's step counts (2, 4, 8), CFG --guidance
  student: LCM 2, 4, 8 steps at guidance 1 (the teacher's CFG is distilled in)

    python benchmarks/lcm_quality.py [--student ldm_app/default_model/unet_lcm] [--captions 1000] [--json out.json]

The same captions and seeds for every row; images are made in batches of 50 with one generator per image.
1000 captions by default: R-precision's standard error is about 0.014 there (0.03 at 200), and the gap between
student and teacher that this benchmark decides on is a few hundredths.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from eval_default_model import generate, image_features, load_split, r_precision_setup, text_features
from safetensors.torch import load_file

from ldm_app import LdmPipeline
from ldm_app.atomic import atomic_write
from ldm_app.consistency import LCM_STUDENT
from ldm_app.default_clip import load_clip
from ldm_app.evaluation import frechet_distance, r_precision
from ldm_app.pipeline import DEFAULT_MODEL_DIR
from ldm_app.samplers import make_scheduler
from ldm_app.unet import LdmUNet

HERE = Path(__file__).resolve().parent
TEACHER_ROWS = [("ddim", 25), ("dpm++", 10), ("dpm++", 6), ("dpm++", 8), ("dpm++", 4), ("dpm++", 2)]
STUDENT_STEPS = [8, 4, 2]


def load_student(path: Path, like: LdmUNet) -> LdmUNet:
    """A UNet folder (config.json + weights), or a training checkpoint's model.safetensors (the online weights)."""
    if path.is_dir():
        return LdmUNet.from_pretrained(path).eval()
    student = LdmUNet.from_config(like.config)
    student.load_state_dict(load_file(path))
    return student.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", type=Path, default=DEFAULT_MODEL_DIR / LCM_STUDENT)
    parser.add_argument("--data", type=Path, default=Path("~/ldm-runs/data/emoji64"))
    parser.add_argument("--evaluator", type=Path, default=HERE / "evaluator")
    parser.add_argument("--guidance", type=float, default=5.0, help="the teacher's CFG scale")
    parser.add_argument("--captions", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_flush_denormal(True)

    pipe = LdmPipeline.from_default()
    pipe.set_progress_bar_config(disable=True)
    teacher = pipe.unet.to(memory_format=torch.channels_last)
    student = load_student(args.student, teacher).to(memory_format=torch.channels_last)
    evaluator, eval_tokenizer = load_clip(args.evaluator)
    train_images, train_rows = load_split(args.data.expanduser(), "train")

    # The R-precision setup of eval_default_model.py: N training captions, each against 99 random other labels
    picks, captions, vocab, own, others = r_precision_setup(random.Random(0), train_rows, args.captions)
    text = text_features(evaluator, eval_tokenizer, vocab)
    reference = image_features(evaluator, train_images)
    real = image_features(evaluator, train_images[picks])
    results = {"captions": args.captions, "teacher_guidance": args.guidance, "student": str(args.student),
               "threads": torch.get_num_threads(),
               "real_images": {"r_precision": r_precision(real, text, own, others),
                               "fd": frechet_distance(real, reference)}, "rows": {}}
    print(f"real images: R-precision {results['real_images']['r_precision']:.3f}, "
          f"FD {results['real_images']['fd']:.4f}", flush=True)

    ddim_config = dict(pipe.scheduler.config)
    rows = ([("teacher", sampler, steps, args.guidance) for sampler, steps in TEACHER_ROWS]
            + [("LCM student", "lcm", steps, 1.0) for steps in STUDENT_STEPS])
    seeds = list(range(len(captions)))
    for model, sampler, steps, guidance in rows:
        pipe.unet = teacher if model == "teacher" else student
        pipe.scheduler = make_scheduler(sampler, ddim_config)
        start = time.perf_counter()
        images = generate(pipe, captions, seeds, steps, guidance)
        seconds = (time.perf_counter() - start) / len(captions)
        features = image_features(evaluator, images)
        row = {"model": model, "sampler": sampler, "steps": steps, "guidance": guidance,
               "r_precision": r_precision(features, text, own, others), "fd": frechet_distance(features, reference),
               "seconds_per_image": seconds}
        results["rows"][f"{model} {sampler} {steps}"] = row
        print(f"{model:<12} {sampler:<6} {steps:>3} steps, CFG {guidance:g}: R-precision {row['r_precision']:.3f}, "
              f"FD {row['fd']:.4f}, {seconds * 1000:.1f} ms/image", flush=True)
        if args.json:
            with atomic_write(args.json) as tmp:
                tmp.write_text(json.dumps(results, indent=2))

    base = results["rows"]["teacher ddim 25"]
    print("\n| model | sampler | steps | CFG | R-precision (× DDIM 25) | FD | s/image | images/s × DDIM 25 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in results["rows"].values():
        print(f"| {row['model']} | {row['sampler']} | {row['steps']} | {row['guidance']:g} | {row['r_precision']:.3f} "
              f"({row['r_precision'] / max(base['r_precision'], 1e-9):.2f}) | {row['fd']:.4f} | "
              f"{row['seconds_per_image']:.4f} | {base['seconds_per_image'] / row['seconds_per_image']:.1f} |")
    print(f"real images: R-precision {results['real_images']['r_precision']:.3f}, FD "
          f"{results['real_images']['fd']:.4f}; {args.captions} captions, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()

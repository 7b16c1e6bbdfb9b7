"""Ship the distilled LCM student beside the default model: `<out>/unet_lcm/` in fp16 safetensors, which
`LdmPipeline.from_default(lcm=True)` and `ldm-app generate --sampler lcm` swap in for the UNet.

    python training/default_model/ship_lcm.py [--pipeline ~/ldm-runs/lcm-default/pipeline] [--out ldm_app/default_model]

The student must have been distilled from the UNet shipped in `<out>/unet` (same architecture); it is written into
a temp folder and renamed, so a crash never leaves half a student.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from assemble import drop_machine_paths

from ldm_app.atomic import atomic_folder
from ldm_app.consistency import LCM_STUDENT
from ldm_app.unet import LdmUNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", type=Path, default=Path("~/ldm-runs/lcm-default/pipeline"))
    parser.add_argument("--out", type=Path, default=Path("ldm_app/default_model"))
    args = parser.parse_args()
    student = LdmUNet.from_pretrained(args.pipeline.expanduser() / "unet")
    teacher = LdmUNet.load_config(args.out / "unet")
    differs = {k for k, v in teacher.items() if not k.startswith("_") and student.config.get(k) != v}
    if differs:
        raise SystemExit(f"error: the student's {', '.join(sorted(differs))} differ from {args.out / 'unet'}; distil "
                         "the shipped UNet (configs/emoji64-lcm.yaml) first.")
    with atomic_folder(args.out / LCM_STUDENT) as tmp:
        student.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
        drop_machine_paths(tmp / "config.json")
    print(f"LCM student written to {args.out / LCM_STUDENT}")


if __name__ == "__main__":
    main()

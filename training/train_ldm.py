"""Train a latent diffusion UNet: `accelerate launch training/train_ldm.py --config configs/emoji64.yaml [k=v ...]`.

Re-running the same command resumes from the run folder's last checkpoint.
"""

import argparse
import sys

import yaml

from ldm_app.config import load_config
from ldm_app.trainer import TrainingError, train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.batch_size=64")
    args = parser.parse_args()
    try:
        pipeline = train(load_config(args.config, args.overrides))
    except (ValueError, OSError, yaml.YAMLError, TrainingError) as err:  # input errors (a typo, a missing file,
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # an unreachable hub id) exit 2
        return 1 if isinstance(err, TrainingError) else 2
    print(f"Pipeline written to {pipeline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

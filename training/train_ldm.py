"""Train a latent diffusion UNet: `accelerate launch training/train_ldm.py --config configs/emoji64.yaml [k=v ...]`.

Re-running the same command resumes from the run folder's last checkpoint.
"""

import argparse
import sys

import yaml

from ldm_app.config import load_config
from ldm_app.extras import require_extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file overriding the defaults (see configs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.batch_size=64")
    args = parser.parse_args()
    try:
        require_extra("train")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from ldm_app.trainer import TrainingError, train

    try:
        pipeline = train(load_config(args.config, args.overrides))
    except (ValueError, OSError, yaml.YAMLError, TrainingError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)
        # The user's input (a typo, broken YAML, a missing file or model id) exits 2; a failed run (a diverged
        # loss, a full disk) exits 1.
        user_input = isinstance(err, (ValueError, yaml.YAMLError, FileNotFoundError, NotADirectoryError)) or (
            isinstance(err, OSError) and err.errno is None)  # what from_pretrained raises for an unknown model
        return 2 if user_input else 1
    print(f"Pipeline written to {pipeline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

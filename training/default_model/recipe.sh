#!/usr/bin/env bash
# The embedded default model end to end: data → VAE → CLIP text encoder → UNet → assemble → evaluate.
# Every stage resumes where it stopped (re-run the same command), so it can run across sessions:
#   nohup bash training/default_model/recipe.sh > ~/ldm-runs/recipe.log 2>&1 &
# UNET_MINUTES bounds this invocation's UNet training (default 90); it continues on the next run.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=~/ldm-runs
HERE=training/default_model

python $HERE/build_emoji_dataset.py --output $RUNS/data/emoji64                       # npm pack, pinned versions
[ -d $RUNS/vae/final ] || python $HERE/train_vae.py --run $RUNS/vae --minutes 45      # f=4 AutoencoderKL
[ -d $RUNS/clip/text_encoder ] || python $HERE/train_clip.py --minutes 12             # tokenizer + text tower
[ -f $RUNS/evaluator/clip.safetensors ] || python $HERE/train_clip.py --evaluator --minutes 11
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    training/train_ldm.py --config configs/emoji64.yaml train.max_minutes="${UNET_MINUTES:-90}"
python $HERE/assemble.py --pipeline $RUNS/unet/pipeline --out ldm_app/default_model
python benchmarks/eval_default_model.py --data $RUNS/data/emoji64 --json $RUNS/eval.json

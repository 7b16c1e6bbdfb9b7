#!/usr/bin/env bash
# The embedded default model end to end: data → VAE → CLIP text encoder → UNet → assemble → evaluate.
# Every stage resumes where it stopped (re-run the same command), so it can run across sessions:
#   mkdir -p ~/ldm-runs && nohup bash training/default_model/recipe.sh > ~/ldm-runs/recipe.log 2>&1 &
# UNET_MINUTES bounds this invocation's UNet training (default 90); it continues on the next run, and assemble.py
# refuses the UNet (so the script stops there) until it has reached its config's max_steps.
# A stage is skipped once its metrics.json exists; each script makes it appear only after all the stage's outputs.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=~/ldm-runs
HERE=training/default_model

python $HERE/build_emoji_dataset.py --output $RUNS/data/emoji64                       # npm pack, pinned versions
[ -f $RUNS/vae/final/metrics.json ] || python $HERE/train_vae.py --run $RUNS/vae --width 32 --steps 6000  # f=4 KL-VAE
[ -f $RUNS/clip/metrics.json ] || python $HERE/train_clip.py --minutes 12             # tokenizer + text tower
[ -f $RUNS/evaluator/metrics.json ] || python $HERE/train_clip.py --evaluator --minutes 11
# accelerate launch gives a process one CPU thread unless told otherwise (1.5x slower here); a GPU is used if present
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    --num_cpu_threads_per_process "$(nproc)" \
    training/train_ldm.py --config configs/emoji64.yaml train.max_minutes="${UNET_MINUTES:-90}"
python $HERE/assemble.py --pipeline $RUNS/unet/pipeline --out ldm_app/default_model
python benchmarks/eval_default_model.py --data $RUNS/data/emoji64 --json $RUNS/eval.json
# LCM student of the shipped model (4-step sampling, `--sampler lcm`), in phases of one run: 3000 steps of batch 16
# at lr 1e-4 with the teacher's CFG drawn from [4, 6], then quieter ones (a resume takes the learning rate and batch
# size it is given), the last three with the CFG fixed at 5. LCM_MINUTES bounds each invocation; a phase cut short
# continues on the next run of this script, and the student ships after the last.
lcm_step() { python -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" \
    $RUNS/lcm-default/pipeline/training_step.json 2>/dev/null || echo 0; }
lcm_phase() {  # train the student to step $1 with the overrides that follow
    local until=$1; shift
    [ "$(lcm_step)" -ge "$until" ] && return
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
        --num_cpu_threads_per_process "$(nproc)" training/train_ldm.py --config configs/emoji64-lcm.yaml \
        train.max_steps="$until" train.max_minutes="${LCM_MINUTES:-90}" "$@"
    [ "$(lcm_step)" -ge "$until" ] || { echo "LCM distillation stopped at step $(lcm_step); re-run to continue"; exit 0; }
}
[ -f ldm_app/default_model/unet_lcm/config.json ] || {
    lcm_phase 3000
    lcm_phase 4200 train.batch_size=32 train.learning_rate=3e-5
    lcm_phase 5400 train.batch_size=64 train.learning_rate=1.5e-5
    lcm_phase 5924 train.batch_size=128 train.learning_rate=7.5e-6
    cfg5=(distill.guidance_min=5 distill.guidance_max=5)
    lcm_phase 6524 "${cfg5[@]}" train.batch_size=32 train.learning_rate=3e-5
    lcm_phase 7124 "${cfg5[@]}" train.batch_size=64 train.learning_rate=1.5e-5
    lcm_phase 8819 "${cfg5[@]}" train.batch_size=128 train.learning_rate=7.5e-6
    python $HERE/ship_lcm.py --pipeline $RUNS/lcm-default/pipeline --out ldm_app/default_model
    python benchmarks/lcm_quality.py --data $RUNS/data/emoji64 --json $RUNS/lcm-quality.json
}

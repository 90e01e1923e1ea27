#!/usr/bin/env bash
# Train the toy world v2 (what ships), resumably: rerun the same command after any stop and it continues.
#   bash benchmarks/toyworld/train_v2.sh WORK_DIR [THREADS]
# Order: toy-clip v2 (v1 + human quality words, text tower locked) and tiny-sd v2's VAE, then the UNet on toy-clip's
# frozen text tower, the export of the pipeline, and toy-clip's quality prompts. Models are written under
# WORK_DIR/models/ (copy them to benchmarks/toyworld/models/ after benchmarks/toyworld_models.py has measured them).
# Long: about 1 h (toy-clip) + 1 h (VAE) + 15 h (UNet, 20000 steps) on one CPU thread; run it niced in the
# background (nohup nice -n 19 bash benchmarks/toyworld/train_v2.sh runs/v2 &).
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK="${1:?usage: train_v2.sh WORK_DIR [THREADS]}"
THREADS="${2:-1}"
mkdir -p "$WORK/models"
V1_CLIP="$WORK/toy-clip-v1.safetensors"
if [ ! -f "$V1_CLIP" ]; then  # v1 as committed before v2 replaced it
  git show 5511073:benchmarks/toyworld/models/toy-clip.safetensors > "$V1_CLIP.tmp" && mv "$V1_CLIP.tmp" "$V1_CLIP"
fi
cp benchmarks/toyworld/models/toy-clip.json "$WORK/models/toy-clip.json"
python benchmarks/toyworld/train_clip.py --init-from "$V1_CLIP" --lock-text --steps 3000 --learning-rate 5e-4 \
  --warmup 100 --defect-rate 0.5 --seed 1 --threads "$THREADS" --output "$WORK/models" --work-dir "$WORK/work"
SD="python -m comfyui_refinery.benchmarks.toyworld.train_tiny_sd --work-dir $WORK/sd --threads $THREADS"
$SD --stage vae
$SD --stage unet --text-encoder-from "$WORK/models/toy-clip.safetensors"
$SD --stage export --text-encoder-from "$WORK/models/toy-clip.safetensors" --output "$WORK/models/tiny-sd"
python -m comfyui_refinery.benchmarks.toyworld.train_prompts --checkpoint "$WORK/models/toy-clip.safetensors" \
  --threads "$THREADS" --output "$WORK/models/toy-quality-prompts.safetensors"

#!/usr/bin/env bash
# Train the clip-art text-to-image model from nothing: the OpenClipart + emoji caption folder, a
# VQ-VAE image tokenizer, the DALL-E transformer and a CLIP reranker, each on the same 95% of the
# files (5% held out by path hash for the figures of docs/results.md), then one fp16 bundle.
# About 25 minutes of a 2-core machine (one thread per run); needs Debian's openclipart-png,
# openclipart-svg, fonts-noto-color-emoji and librsvg2-bin, and `pip install -e '.[data]'`.
#
#   bash scripts/build_clipart_bundle.sh                 # runs in runs/clipart/, bundle in runs/clipart/bundle
#   cvformers generate "a red apple" --model runs/clipart/bundle --out apple.png
set -euo pipefail
cd "$(dirname "$0")/.."
cvf=${CVFORMERS:-cvformers}
runs=${RUNS:-runs/clipart}
out=${OUT:-$runs/bundle}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

[ -d data/openclipart ] || "$cvf" data openclipart --out data/openclipart
"$cvf" train vqvae --config configs/openclipart_vqvae.toml --out "$runs/vqvae"
"$cvf" train clip --config configs/openclipart_clip.toml --out "$runs/clip" & clip=$!   # on the other core
"$cvf" train dalle --vae "$runs/vqvae" --config configs/openclipart_dalle.toml --out "$runs/dalle"
wait "$clip"   # its exit status: a failed CLIP stops the script
"$cvf" bundle "$runs/dalle" --clip "$runs/clip" --out "$out"

#!/usr/bin/env bash
# Rebuild the shipped DALL-E 2 (unCLIP) model, src/cvformers/assets/unclip, around the CLIP it ships
# (unclip/clip, an earlier build of the DALL-E bundle's CLIP; the prior and the decoder must share one):
# a diffusion prior (caption -> CLIP image embedding) and a CLIP-conditioned diffusion decoder (in
# the 8x8 code grid of the DALL-E bundle's VQ-VAE, decoded to 32 px), trained side by side on the
# built-in shapes data, then bundled as fp16 safetensors. One thread per run (on a shared 2-core
# machine more threads oversubscribe the cores); about 90 minutes, the decoder's 12,000 steps, with the
# prior trained beside it. The shipped bundle has no upsampler; UPSAMPLER=1 also trains one (32 -> 64 px) and bundles it.
#
#   bash scripts/build_unclip_bundle.sh            # runs go to runs/unclip/, bundle to assets
set -euo pipefail
cd "$(dirname "$0")/.."
cvf=${CVFORMERS:-cvformers}
runs=${RUNS:-runs/unclip}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# The prior's schedule is laid out for 2,000 steps; the shipped prior is its step-1,500 checkpoint
# (its held-out cosine had levelled off at 0.945 by step 1,000), which saves time.
"$cvf" train unclip-decoder --config configs/unclip_latent_decoder.toml --vae default/vae --clip unclip/clip \
    --out "$runs/decoder" &
decoder=$!
"$cvf" train unclip-prior --config configs/unclip_prior.toml --clip unclip/clip --out "$runs/prior" --until 1500
wait "$decoder"
if [ "${UPSAMPLER:-0}" = 1 ]; then
    "$cvf" train unclip-upsampler --config configs/unclip_upsampler.toml --out "$runs/upsampler"
fi
"$cvf" bundle --unclip "$runs" --out src/cvformers/assets/unclip

#!/usr/bin/env bash
# Train toy-world v2 base candidates on a lent GPU in one command (issue 14), from the repo root:
#   carry .whl (diffusers, open_clip_torch, ftfy, wcwidth wheels; see benchmarks/README.md)
#   bash benchmarks/toyworld_gpu_train.sh            # OUT=<folder for results>, MINUTES=<phase-2 length>
# Phase 1 trains one VAE; phase 2 trains the variants below in parallel processes on the same GPU (each
# step is host-bound, so they barely slow each other), every one from that VAE for MINUTES minutes, and
# scores each on 200 held-out captions (DDIM 25, guidance 4: the evaluate-base protocol).
set -o pipefail
OUT=${OUT:-/tmp/toyworld_out}; MINUTES=${MINUTES:-6}; W=${WORK:-/tmp/toyworld_runs}
mkdir -p "$OUT" "$W"
PY=${PY:-python3}
if ! $PY -c "import diffusers, open_clip" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi -L 2>/dev/null | tee "$W/gpu.txt"
# personalize toyworld train-base, run by $PY (the console script may not be installed there)
tb() { $PY -c "from personalize.cli import main; main()" toyworld train-base --device auto --threads 2 "$@"; }
tb --out "$W/vae" --workers 8 --vae-steps ${VAE_STEPS:-3000} --vae-batch ${VAE_BATCH:-128} --steps 0 --log-every 250 \
    --ckpt-every 100000 2>&1 | tail -n 20 || exit 1
COMMON="--vae-from $W/vae --workers 4 --batch ${BATCH:-256} --warmup 500 --minutes $MINUTES --eval-n ${EVAL_N:-200} \
        --eval-every ${EVAL_EVERY:-6000} --log-every 500 --ckpt-every 100000"
tb --out "$W/A" $COMMON --unet-attn 1,1,1 > "$W/A.log" 2>&1 &
tb --out "$W/B" $COMMON --unet-attn 0,1,1 > "$W/B.log" 2>&1 &
tb --out "$W/C" $COMMON --unet-attn 1,1,1 --min-snr 5 > "$W/C.log" 2>&1 &
wait
for v in A B C; do
  grep -E "\[eval\]|s/step:|exported|Error|error" "$W/$v.log" | sed "s/^/$v /"
  # UNet + text encoder only (the VAE is phase 1's, the rest is rebuilt offline): 3 variants fit 64 MiB
  [ -d "$W/$v/pipeline" ] && tar cf - -C "$W/$v/pipeline" unet text_encoder TRAINING.json \
      | split -b 15m - "$OUT/$v.pipeline.tar.part_"
done
tar czf "$OUT/logs.tar.gz" -C "$W" gpu.txt vae/train.log vae/pipeline/vae vae/pipeline/model_index.json vae/pipeline/scheduler vae/vae_concepts_recon.png A.log B.log C.log \
    $(cd "$W" && ls */evals.jsonl 2>/dev/null)
ls -la "$OUT"

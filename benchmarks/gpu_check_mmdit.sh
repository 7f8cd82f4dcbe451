#!/usr/bin/env bash
# SD 3.5 and FLUX.1 on one GPU (docs/small-gpus.md, "SD 3.5 and FLUX.1 on 24 GB"): the part of the
# GPU check for the transformer families, in three parts that each fit one device call (< 10 min):
#   bash benchmarks/gpu_check_mmdit.sh smoke   # ~2 min: the 24 GB configs on tiny-flux, nf4 and group offload for real
#   bash benchmarks/gpu_check_mmdit.sh sd35    # ~4 min: SD 3.5 Medium sizes (random weights), 1024 px
#   bash benchmarks/gpu_check_mmdit.sh flux    # ~8 min: FLUX.1-dev's full sizes (12 G, random weights), 1024 px, 24 GB cap
# Needs the project's venv with the quant extra (bitsandbytes for nf4): before the call, here,
#   .venv/bin/pip install -c constraints.txt -e '.[quant]'   (the device machine reaches no registry)
# Without bitsandbytes the nf4 lines say so ("refused: ... needs the bitsandbytes package").
# The random models are written once as diffusers folders under /tmp (not under $OUT: 24 GB) and
# loaded as a downloaded model loads, quantized as it loads. Writes its logs under ${OUT:-outputs/gpu_check}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
PY=.venv/bin/python
PART=${1:-smoke}
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu_mmdit.txt"
quiet() { grep -v -i -E "warn|Loading (pipeline components|weights)|deprecat" || true; }

case "$PART" in
smoke)
  # fit as configs/flux/style_24gb.yaml trains on 24 GB (nf4 base, bf16-mixed, gradient checkpointing), on tiny-flux
  .venv/bin/diffstyler fit --config configs/flux/style_24gb.yaml --model.model.name tiny-flux --data.resolution 64 \
    --trainer.max_steps 4 --model.output_dir "$OUT/flux_lora" --trainer.logger.init_args.save_dir "$OUT/logs" \
    --trainer.callbacks "[]" 2>&1 | tail -3 | tee "$OUT/flux_fit_nf4.txt"
  # predict as configs/flux/stylize_24gb.yaml runs (nf4, offload model, bf16), then int8 with group offload (CUDA stream)
  for variant in "nf4 model" "int8 group" "none group_leaf"; do
    set -- $variant
    .venv/bin/diffstyler predict --config configs/flux/stylize_24gb.yaml --model.model.name tiny-flux --data.resolution 64 \
      --model.model.quantization "$1" --model.offload "$2" --data.styles "[{lora: $OUT/flux_lora}]" \
      --model.output.folder "$OUT/flux_stylized_$1_$2" --model.inversion_cache "$OUT/cache" \
      --trainer.logger false 2>&1 | tail -2 | tee "$OUT/flux_predict_$1_$2.txt"
  done
  ;;
sd35)
  # SD 3.5 Medium's sizes (2.2 G transformer, bf16): one stylization call at 1024 px, 8 steps, inversion at the steps
  $PY benchmarks/save_random_model.py --model sd35-medium-random --dtype bfloat16 --folder /tmp/sd35-medium-random \
    2>&1 | quiet | tee "$OUT/sd35_build.txt"
  $PY benchmarks/bench_stylize.py --memory --model /tmp/sd35-medium-random --device cuda --dtype bfloat16 --resolution 1024 \
    --steps 8 --inversion-substeps 1 --options "none,offload model,offload group,int8,nf4" 2>&1 | quiet | tee "$OUT/sd35_memory.txt"
  ;;
flux)
  # FLUX.1-dev's full sizes (19 + 38 blocks, 12 G parameters: 24 GB in bf16), made to fit a 24 GB GPU:
  # the process may use at most 24 GB of the card (an option that does not fit says "out of CUDA memory")
  $PY benchmarks/save_random_model.py --model flux-full-random --dtype bfloat16 --folder /tmp/flux-full-random \
    2>&1 | quiet | tee "$OUT/flux_build.txt"
  $PY benchmarks/bench_stylize.py --memory --model /tmp/flux-full-random --device cuda --dtype bfloat16 --resolution 1024 \
    --steps 8 --inversion-substeps 1 --memory-cap-gb 24 \
    --options "nf4 + offload model,offload group,int8 + offload group,offload model" 2>&1 | quiet | tee "$OUT/flux_memory.txt"
  ;;
*)
  echo "usage: bash benchmarks/gpu_check_mmdit.sh smoke|sd35|flux" >&2
  exit 2
  ;;
esac

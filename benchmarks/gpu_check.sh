#!/usr/bin/env bash
# One short GPU check for a session that is lent a device machine (see docs/benchmarks.md).
# Needs the project's venv there (scripts/setup.sh; the device machine reaches no registry, so the
# wheels must travel with the call). Writes everything under ${OUT:-outputs/gpu_check}.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 YOLO_OFFLINE=1 PYTHONUNBUFFERED=1
PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

# 1. fit with 16-mixed on the GPU: trainable LoRA stays fp32, export loads back
.venv/bin/diffstyler fit --config configs/smoke/style.yaml --trainer.accelerator gpu --trainer.precision 16-mixed \
  --model.output_dir "$OUT/lora" --trainer.logger.init_args.save_dir "$OUT/logs" 2>&1 | tail -3 | tee "$OUT/fit.txt"

# 2. predict, global and localized, on the GPU with half-precision weights
.venv/bin/diffstyler predict --config configs/smoke/stylize.yaml --trainer.accelerator gpu --trainer.precision 16-mixed \
  --model.model.dtype float16 --data.styles "[{lora: $OUT/lora}]" --model.output.folder "$OUT/stylized" \
  --model.inversion_cache "$OUT/cache" --trainer.logger.init_args.save_dir "$OUT/logs" 2>&1 | tail -3 | tee "$OUT/predict.txt"
ls "$OUT/stylized"
# the authors'-code preset: one reference row per style through its LoRA, 1000-step inversion
.venv/bin/diffstyler predict --config configs/smoke/stylize.yaml --config configs/smoke/presets/paper_code.yaml \
  --trainer.accelerator gpu --model.model.dtype float16 --data.styles "[{lora: $OUT/lora}]" \
  --model.output.folder "$OUT/paper_code" --model.inversion_cache "$OUT/cache" --trainer.logger.init_args.save_dir "$OUT/logs" \
  2>&1 | tail -3 | tee "$OUT/paper_code.txt"

# 3. real SD 2.1-base sizes (random weights): speed ratios and peak CUDA memory for 1/2/4 styles
$PY benchmarks/bench_stylize.py --model sd21-random --device cuda --dtype float16 --resolution 512 --steps 50 \
  2>&1 | grep -v -i warn | tee "$OUT/bench.txt"

# 4. dataset throughput on the GPU: images/min for batch_size 1, 2, 4 at SD 2.1-base sizes (random
#    weights), start-up of a 10,000-row manifest, and peak CUDA memory with 1, 3 and 10 LoRAs loaded
$PY benchmarks/bench_throughput.py --model sd21-random --device cuda --dtype float16 --resolution 512 --steps 50 \
  --contents 8 2>&1 | grep -v -i warn | tee "$OUT/throughput.txt"
# and the smoke dataset run end to end on the GPU (product pairing, 4 jobs per UNet call)
.venv/bin/diffstyler predict --config configs/smoke/batch.yaml --trainer.accelerator gpu --model.model.dtype float16 \
  --data.styles "[{lora: $OUT/lora, name: full}, {lora: $OUT/lora, name: half, scale: 0.5}]" \
  --model.output.folder "$OUT/batch" --model.inversion_cache "$OUT/cache" --trainer.logger.init_args.save_dir "$OUT/logs" \
  2>&1 | tail -2 | tee "$OUT/batch.txt"
# 5. the smoke protocol's fit over a folder (one LoRA per style image) in 16-mixed on the GPU
.venv/bin/diffstyler fit --config configs/smoke/protocols/styleid.yaml --trainer.accelerator gpu --trainer.precision 16-mixed \
  --model.output_dir "$OUT/loras" --trainer.logger.init_args.save_dir "$OUT/logs" 2>&1 | grep "diffstyler fit" | tee "$OUT/fit_folder.txt"
ls "$OUT/loras"

# 6. SDXL (tiny-sdxl smoke configs): fit in 16-mixed, predict with float16 weights (the VAE decodes in
#    float32: no black image), then real SDXL sizes with random weights at 1024 px: speed ratios,
#    one style's LoRA bytes and peak CUDA memory for 1/2/4 styles, and dataset throughput
.venv/bin/diffstyler fit --config configs/smoke/sdxl/style.yaml --trainer.accelerator gpu --trainer.precision 16-mixed \
  --model.output_dir "$OUT/sdxl_lora" --trainer.logger.init_args.save_dir "$OUT/logs" 2>&1 | tail -3 | tee "$OUT/sdxl_fit.txt"
.venv/bin/diffstyler predict --config configs/smoke/sdxl/stylize.yaml --trainer.accelerator gpu --trainer.precision 16-mixed \
  --model.model.dtype float16 --data.styles "[{lora: $OUT/sdxl_lora}]" --model.output.folder "$OUT/sdxl_stylized" \
  --model.inversion_cache "$OUT/cache" --trainer.logger.init_args.save_dir "$OUT/logs" 2>&1 | tail -3 | tee "$OUT/sdxl_predict.txt"
$PY benchmarks/bench_stylize.py --model sdxl-random --device cuda --dtype float16 --resolution 1024 --steps 20 \
  2>&1 | grep -v -i warn | tee "$OUT/bench_sdxl.txt"
$PY benchmarks/bench_throughput.py --model sdxl-random --device cuda --dtype float16 --resolution 1024 --steps 20 \
  --contents 4 2>&1 | grep -v -i warn | tee "$OUT/throughput_sdxl.txt"

# 7. low VRAM: one pipeline call at SD 2.1-base sizes (random weights) with nothing, VAE slicing,
#    VAE tiling (1024 px: larger than the VAE's 512 px tiles), offload model and offload sequential:
#    seconds and peak CUDA memory; then the smoke predict with offload through Lightning
$PY benchmarks/bench_stylize.py --memory --model sd21-random --device cuda --dtype float16 --resolution 1024 --steps 20 \
  2>&1 | grep -v -i warn | tee "$OUT/memory.txt"
.venv/bin/diffstyler predict --config configs/smoke/stylize.yaml --trainer.accelerator gpu --model.offload sequential \
  --model.vae_tiling true --model.vae_slicing true --data.styles "[{lora: $OUT/lora}]" --model.output.folder "$OUT/offload" \
  --model.inversion_cache "$OUT/cache" --trainer.logger.init_args.save_dir "$OUT/logs" 2>&1 | tail -3 | tee "$OUT/offload.txt"

# 8. SD 3.5 and FLUX.1 (docs/small-gpus.md): the 24 GB FLUX configs on tiny-flux with nf4 and group
#    offload for real, then one stylization call at 1024 px at SD 3.5 Medium's and FLUX.1-dev's full
#    sizes (random weights) with none / offload model / offload group / int8 / nf4: seconds and peak
#    CUDA memory, FLUX under a 24 GB cap. Three parts, one device call each (see the script).
for part in smoke sd35 flux; do
  bash benchmarks/gpu_check_mmdit.sh "$part"
done

#!/usr/bin/env bash
# Set up, then run the whole method end to end on the tiny offline model (no weights needed):
# learn a style LoRA, stylize a photo with it, stylize two masked regions in one run, then a folder, and score it;
# then the smoke twin of the StyleID protocol (one LoRA per style image, every content x style, the scores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 YOLO_OFFLINE=1
.venv/bin/diffstyler fit --config configs/smoke/style.yaml
.venv/bin/diffstyler predict --config configs/smoke/stylize.yaml
.venv/bin/diffstyler predict --config configs/smoke/localized.yaml
.venv/bin/diffstyler predict --config configs/smoke/batch.yaml
.venv/bin/diffstyler test --config configs/smoke/evaluate.yaml  # random metric networks: numbers mean nothing
for stage in fit predict test; do
  .venv/bin/diffstyler $stage --config configs/smoke/protocols/styleid.yaml
done
echo "Results: outputs/smoke/lora, outputs/smoke/stylized, outputs/smoke/localized, outputs/smoke/batch, outputs/smoke/evaluation, outputs/smoke/styleid"

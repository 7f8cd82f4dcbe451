"""Evaluation of stylization quality: `diffstyler test`.

- `data`: the (content, style image, result) triples to score, and the size each metric sees them at;
- `metrics`: LPIPS, FID, ArtFID, CFSD and CSD of a run on torchmetrics (`cfsd`, `csd`: those metrics
  themselves, `pair_metric`: what they share);
- `networks`: the metrics' feature networks, from local weights only; `random_networks`: small random
  ones for the smoke config and tests;
- `evaluator`: the LightningModule of Lightning's test loop; `report`: metrics.json, the CSVs, the plot
  and the per-image scores in TensorBoard.
"""

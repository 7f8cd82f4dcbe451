"""Evaluation of stylization quality (the future `diffstyler test`).

`diffstyler.evaluation.metrics`: LPIPS, FID, ArtFID and CFSD on torchmetrics, from local weights only.
"""

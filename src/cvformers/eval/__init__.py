"""Metrics: caption fidelity on shapes, reconstruction PSNR, CLIP score, accuracy."""

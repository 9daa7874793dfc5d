"""Inference flows: text_to_image (sample + decode + rerank), zero_shot, attention maps."""

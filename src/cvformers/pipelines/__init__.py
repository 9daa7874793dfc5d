"""Inference flows: text_to_image (sample + decode + rerank), unclip, zero_shot, attention maps;
bundle export; diffusers' face of the generators (pretrained) and open_clip's factory (clip_factory)."""

"""cvformers: transformers from NLP to CV.

An image becomes a sequence of tokens and a transformer models sequences: DALL-E (dVAE
image tokenizer + sparse-attention transformer + CLIP reranking), CLIP,
the vision backbones ViT, MLP-Mixer, ConvMixer and Swin, and denoising diffusion (DDPM, DDIM).

The names other libraries taught users are here too: ``create_model`` / ``list_models`` (timm),
``create_model_and_transforms`` / ``get_tokenizer`` (open_clip), and the generator pipelines
``TextToImage`` / ``UnCLIP`` with ``from_pretrained`` and ``save_pretrained`` (diffusers).
"""

__version__ = "0.1.0"

# name -> module that defines it; imported on first use, so that `import cvformers` stays cheap
_EXPORTS = {
    "create_model": "cvformers.loading",
    "list_models": "cvformers.models.vision",
    "create_model_and_transforms": "cvformers.pipelines.clip_factory",
    "get_tokenizer": "cvformers.pipelines.clip_factory",
    "TextToImage": "cvformers.pipelines.text_to_image",
    "UnCLIP": "cvformers.pipelines.unclip",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cvformers' has no attribute {name!r}")

"""cvformers: transformers from NLP to CV.

An image becomes a sequence of tokens and a transformer models sequences: DALL-E (dVAE
image tokenizer + sparse-attention transformer + CLIP reranking), CLIP,
the vision backbones ViT, MLP-Mixer, ConvMixer and Swin, and denoising diffusion (DDPM, DDIM).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy exports: `import cvformers` stays cheap; torch and the models load on first use.
    if name == "create_model":
        from cvformers.models.vision import create_model

        return create_model
    raise AttributeError(f"module 'cvformers' has no attribute {name!r}")

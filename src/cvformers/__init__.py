"""cvformers: transformers from NLP to CV.

An image becomes a sequence of tokens and a transformer models sequences: DALL-E (dVAE
image tokenizer + sparse-attention transformer + CLIP reranking), CLIP, ViT and friends,
and the diffusion path of DALL-E 2.
"""

__version__ = "0.1.0"

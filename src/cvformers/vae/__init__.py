"""Image tokenizers behind one face: encode(images)->ids[B,h,w], decode(ids)->images, num_tokens, grid_size.

- ``DiscreteVAE`` (dvae.py): DALL-E's dVAE, kind "dvae"; ``load_openai_dvae`` reads OpenAI's release.
- ``VQVAE`` (vqvae.py): nearest-codebook VQ-VAE with EMA codebook, kind "vqvae".
- Trained runs load with ``cvformers.loading.load_vae(run_dir)``.
"""

from cvformers.vae.dvae import DiscreteVAE, DVAEConfig
from cvformers.vae.openai_compat import load_openai_dvae
from cvformers.vae.vqvae import VQVAE, VQVAEConfig

__all__ = ["DVAEConfig", "DiscreteVAE", "VQVAE", "VQVAEConfig", "load_openai_dvae"]

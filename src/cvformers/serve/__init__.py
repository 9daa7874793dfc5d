"""``cvformers serve``: a Gradio page to try the models by typing (``pip install -e '.[ui]'``).

    from cvformers.serve import ServeConfig, build_app
    build_app(ServeConfig(models=("default", "runs/dalle"))).launch()

Tabs: text to image (DALL-E with CLIP reranking), image prompt (DALL-E §3.3), CLIP zero-shot
classification, ViT attention maps. The page only parses its form and calls the library
(``handlers.py``); every limit it holds requests to is a field of ``ServeConfig``.
"""

from cvformers.serve.app import build_app, serve
from cvformers.serve.config import ServeConfig

__all__ = ["ServeConfig", "build_app", "serve"]

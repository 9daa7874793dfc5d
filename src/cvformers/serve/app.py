"""The Gradio page: four tabs whose events parse the form and call ``cvformers.serve.handlers``.

Every event shares one queue slot (``concurrency_id``), so requests from all tabs and all users
take turns on the machine's cores instead of splitting them; a refused input becomes a message on
the page (``gr.Error``), never a traceback, and the server goes on serving.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from cvformers.config import ConfigError
from cvformers.errors import UserError
from cvformers.models.dalle_sampling import SamplingConfig
from cvformers.serve import handlers
from cvformers.serve.config import ServeConfig

log = logging.getLogger("cvformers.serve")

# Gradio reports usage and looks for new versions over the network unless told not to; the
# page must work, and stay quiet, on a machine without internet.
OFFLINE_ENVIRONMENT = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
}
QUEUE = "cpu"  # the one concurrency group of every event: the cores are shared by all tabs

CSS = """
#t2i-gallery .caption-label, #ip-gallery .caption-label { font-family: monospace; }
"""


def _gradio():
    """The gradio module, or the one-line error that names the extra to install."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        import gradio
    except ImportError:
        raise UserError("the web page needs Gradio: pip install -e '.[ui]' (or pip install 'cvformers[ui]')") from None
    return gradio


def _on_page(handler):
    """Run a handler for the page: a refused input is shown as the library's sentence, a warning
    (an unknown word, fewer distinct images) as a notice, anything else as a short message while
    the details go to the server's log."""
    gr = _gradio()

    @functools.wraps(handler)
    def run(*args, **kwargs):
        try:
            # catch_warnings is process-wide: with concurrency above 1 a notice may reach the
            # other request's page, which is harmless (the images are unaffected)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = handler(*args, **kwargs)
        except (UserError, ConfigError) as e:
            raise gr.Error(str(e), print_exception=False) from None
        except gr.Error:
            raise
        except Exception as e:  # a bug or a broken model: keep serving, log the traceback
            log.exception("request failed")
            raise gr.Error(f"the server could not do that ({type(e).__name__}); its log has the details",
                           print_exception=False) from None
        for w in caught:
            if issubclass(w.category, UserWarning):
                gr.Warning(str(w.message))
        return result

    return run


def _progress_bar(progress) -> handlers.Progress:
    def report(done: int, total: int) -> None:
        progress((done, total), desc="sampling", unit="steps")

    return report


def build_app(cfg: ServeConfig | None = None, output_dir: str | Path | None = None):
    """The page as a ``gr.Blocks`` (queue set up; call ``.launch()`` or ``serve``).

    ``output_dir``: where downloadable grids are written (default: a new temporary folder).
    """
    gr = _gradio()
    cfg = cfg or ServeConfig()
    models = handlers.Models(cfg)
    if output_dir is None:
        output_dir = tempfile.mkdtemp(prefix="cvformers-serve-")
        atexit.register(shutil.rmtree, output_dir, ignore_errors=True)
    outputs = handlers.Outputs(output_dir, cfg)
    first = models.generator(cfg.models[0])  # loaded now: the first request does not wait for it,
    sampling = getattr(first, "sampling", None) or SamplingConfig()  # and its defaults fill the form
    grid_side = handlers.image_rows(first)
    models.clip()  # a bad --clip or --classifier fails now, in one line, not on the first click
    for run in cfg.classifiers:
        models.classifier(run)
    model_choices = [(f"{m} ({models.kinds[m].__name__})", m) for m in cfg.models]
    cpu = {"concurrency_id": QUEUE, "concurrency_limit": cfg.concurrency}

    @_on_page
    def generate(prompt, model, num_images, candidates, seed, temperature, top_k, top_p, guidance,
                 progress=gr.Progress()):
        drawn = handlers.text_to_image(models, outputs, prompt, model, num_images, candidates, seed,
                                       temperature, top_k, top_p, guidance, _progress_bar(progress))
        return list(zip(drawn.images, drawn.captions)), str(drawn.grid)

    @_on_page
    def complete(image, prompt, model, rows, num_images, seed, progress=gr.Progress()):
        drawn = handlers.image_prompt(models, outputs, image, prompt, model, rows, num_images, seed,
                                      _progress_bar(progress))
        return list(zip(drawn.images, drawn.captions)), str(drawn.grid)

    @_on_page
    def classify(files, labels, templates):
        import pandas as pd

        rows = handlers.zero_shot(models, files, labels, templates)
        table = pd.DataFrame(rows)
        table["bar"] = table["image"] + " · " + table["label"]
        return gr.BarPlot(table, sort=list(table["bar"]))

    @_on_page
    def show_upload(path):  # checked as soon as it arrives: a bad file is a message before any click
        return str(handlers.check_upload(path, cfg))

    @_on_page
    def attend(image, classifier):
        return handlers.attention(models, image, classifier)

    with gr.Blocks(title="cvformers", analytics_enabled=False, delete_cache=(600, 3600)) as app:
        gr.Markdown("## cvformers\nDALL-E text to image, image prompts, CLIP zero-shot classification and "
                    "ViT attention, computed on this machine. Requests take turns on its CPU cores.")
        with gr.Tab("Text to image", id="text-to-image"):
            with gr.Row():
                with gr.Column(scale=2):
                    prompt = gr.Textbox(label="Prompt", value=cfg.examples[0], max_length=cfg.max_prompt_chars,
                                        placeholder="a small red circle above a large blue square",
                                        elem_id="t2i-prompt")
                    model = gr.Dropdown(model_choices, value=cfg.models[0], label="Model",
                                        info="the shipped DALL-E, or a run folder given to `cvformers serve --model`")
                    with gr.Row():
                        num_images = gr.Slider(1, cfg.max_images, value=min(8, cfg.max_images), step=1,
                                               label="Images", elem_id="t2i-num")
                        candidates = gr.Slider(0, cfg.max_candidates, value=min(32, cfg.max_candidates), step=1,
                                               label="CLIP reranking: candidates", elem_id="t2i-candidates",
                                               info="sample this many, show the best; 0 = as many as images")
                    with gr.Accordion("Sampling", open=False):
                        with gr.Row():
                            seed = gr.Number(0, precision=0, minimum=0, label="Seed",
                                             info="same seed, same images; empty = random")
                            temperature = gr.Slider(0, 2, value=sampling.temperature, step=0.05,
                                                    label="Temperature", info="0 = greedy")
                        with gr.Row():
                            top_k = gr.Slider(0, 512, value=sampling.top_k, step=1, label="Top-k", info="0 = all")
                            top_p = gr.Slider(0.05, 1, value=sampling.top_p, step=0.05, label="Top-p",
                                              info="1 = all")
                            guidance = gr.Slider(0, 5, value=sampling.guidance, step=0.05,
                                                 label="Guidance", info="classifier-free; 1 = off")
                    go = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                    gr.Examples([[p] for p in cfg.examples], inputs=[prompt], label="Examples (the last three "
                                "pair a colour with a shape the model never saw together)")
                with gr.Column(scale=3):
                    gallery = gr.Gallery(label="Images, best first, with CLIP's score", columns=4, format="png",
                                         object_fit="contain", elem_id="t2i-gallery", interactive=False)
                    grid = gr.File(label="Grid PNG (prompt and settings in its metadata)", elem_id="t2i-grid",
                                   interactive=False)
            gr.on([go.click, prompt.submit], generate,  # the button, or Enter in the prompt
                  [prompt, model, num_images, candidates, seed, temperature, top_k, top_p, guidance],
                  [gallery, grid], api_name="generate", **cpu)

        with gr.Tab("Image prompt", id="image-prompt"):
            with gr.Row():
                with gr.Column(scale=2):
                    with gr.Row():
                        ip_image = gr.File(file_types=list(handlers.UPLOAD_SUFFIXES), type="filepath",
                                           label="Image whose top rows are kept", elem_id="ip-image")
                        ip_preview = gr.Image(label="Upload", interactive=False, height=160, elem_id="ip-preview")
                    ip_prompt = gr.Textbox(label="Prompt", value=cfg.examples[0], max_length=cfg.max_prompt_chars,
                                           elem_id="ip-prompt")
                    ip_model = gr.Dropdown(model_choices, value=cfg.models[0], label="Model")
                    with gr.Row():
                        ip_rows = gr.Slider(0, grid_side, value=grid_side // 2, step=1, elem_id="ip-rows",
                                            label="Rows of image ids kept",
                                            info=f"of {grid_side}; the rest are sampled (DALL-E §3.3)")
                        ip_num = gr.Slider(1, cfg.max_images, value=min(8, cfg.max_images), step=1, label="Images")
                        ip_seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                    ip_go = gr.Button("Complete", variant="primary", elem_id="ip-generate")
                with gr.Column(scale=3):
                    ip_gallery = gr.Gallery(label="Completions", columns=4, format="png", object_fit="contain",
                                            elem_id="ip-gallery", interactive=False)
                    ip_grid = gr.File(label="Grid PNG", elem_id="ip-grid", interactive=False)
            ip_image.upload(show_upload, ip_image, ip_preview, queue=False, api_visibility="private")
            ip_go.click(complete, [ip_image, ip_prompt, ip_model, ip_rows, ip_num, ip_seed], [ip_gallery, ip_grid],
                        api_name="image_prompt", **cpu)

        with gr.Tab("Zero-shot", id="zero-shot"):
            with gr.Row():
                with gr.Column(scale=2):
                    zs_files = gr.File(file_count="multiple", file_types=list(handlers.UPLOAD_SUFFIXES),
                                       label=f"Images (up to {cfg.max_uploads})", elem_id="zs-files")
                    zs_labels = gr.Textbox(label="Labels, comma-separated", value="circle, square, triangle, plus",
                                           elem_id="zs-labels")
                    zs_templates = gr.Textbox(label="Template ({} is the label; one a line averages them)",
                                              value="a picture of a {}", lines=2, elem_id="zs-templates")
                    zs_go = gr.Button("Classify", variant="primary", elem_id="zs-classify")
                with gr.Column(scale=3):
                    zs_chart = gr.BarPlot(x="bar", y="probability", color="image", y_lim=[0, 1],
                                          x_title="image · label", y_title="CLIP probability", x_label_angle=-45,
                                          label="CLIP's probabilities", elem_id="zs-chart", height=360)
            zs_go.click(classify, [zs_files, zs_labels, zs_templates], [zs_chart], api_name="zero_shot", **cpu)

        with gr.Tab("Attention", id="attention"):
            with gr.Row():
                with gr.Column(scale=1):
                    at_image = gr.File(file_types=list(handlers.UPLOAD_SUFFIXES), type="filepath", label="Image",
                                       elem_id="at-image")
                    at_preview = gr.Image(label="Upload", interactive=False, height=160, elem_id="at-preview")
                    at_model = gr.Dropdown(list(cfg.classifiers), value=cfg.classifiers[0], label="Classifier run",
                                           info="a preset name has random weights; give runs to "
                                                "`cvformers serve --classifier`")
                    at_go = gr.Button("Show attention", variant="primary", elem_id="at-show")
                with gr.Column(scale=3):
                    at_picture = gr.Image(label="Per-head maps of the class token and the centre patch, "
                                                "patch-to-patch matrices, attention rollout",
                                          type="pil", format="png", interactive=False, elem_id="at-picture")
            at_image.upload(show_upload, at_image, at_preview, queue=False, api_visibility="private")
            at_go.click(attend, [at_image, at_model], [at_picture], api_name="attention", **cpu)

    app.queue(max_size=cfg.queue_size, default_concurrency_limit=cfg.concurrency)
    return app


def _check_port(host: str, port: int) -> None:
    """Refuse, in the CLI's words, an address this machine cannot listen on before loading anything."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise UserError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host") from None


def serve(cfg: ServeConfig | None = None, **launch) -> None:
    """``cvformers serve``: build the page and serve it until interrupted."""
    cfg = cfg or ServeConfig()
    _check_port(cfg.host, cfg.port)
    app = build_app(cfg)
    print(f"cvformers: serving on http://{cfg.host}:{cfg.port}", flush=True)
    app.launch(server_name=cfg.host, server_port=cfg.port, max_file_size=cfg.max_upload_bytes, css=CSS,
               quiet=True, **launch)

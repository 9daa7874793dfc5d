"""The ``cvformers`` command. Thin: it parses, loads a config, and calls the library.

Every subcommand is a ``_cmd_*`` function that does nothing a user could not do from
Python. Expected failures (bad config, bad prompt, missing file) raise ``UserError`` or
``ConfigError`` somewhere below; ``main`` prints them as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cvformers.config import ConfigError
from cvformers.errors import UserError


# --- argument types: a bad value is refused by argparse (one line, exit status 2) -----------


def _device(name: str) -> str:
    """cpu, cuda or cuda:N, available on this machine."""
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", name):
        raise argparse.ArgumentTypeError(f"{name!r} is not a device; use cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{name}: this torch build sees no CUDA device; use cpu")
    return name


# --- subcommands ------------------------------------------------------------------------
# Each helper below adds one subparser; keep the work inside the library.


def _add_train(sub) -> None:
    from cvformers.tasks import task_help, tasks  # the registry: every module of cvformers/tasks

    names = list(tasks())
    p = sub.add_parser("train", help=f"train a model ({', '.join(names)})")
    p.add_argument("task", help="what to train: " + "; ".join(f"{n} = {task_help(n)}" for n in names))
    p.add_argument("--data", default=None, help="shapes | mnist | fashion-mnist | folder:PATH")
    p.add_argument("--out", required=True, help="run folder to write (or resume)")
    p.add_argument("--config", default=None, help="TOML experiment config ([model], [train], [data])")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
    p.add_argument("--lr", type=float, default=None, help="override train.lr")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--until", type=int, default=None,
                   help="stop (and checkpoint) after this step; --resume continues on the same schedule")
    p.add_argument("--vae", default=None, help="(dalle) run folder of the trained image tokenizer; (unclip-decoder) a VQ-VAE run: draw its latent grid")
    p.add_argument("--clip", default=None, help="(unclip-prior, unclip-decoder) CLIP run folder (default: default/clip)")
    p.add_argument("--model", default=None, help="(classifier, clip, dino) model preset name")
    p.add_argument("--device", default=None, type=_device, help="cpu | cuda (default: cuda when available)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from cvformers.tasks import run_task

    run_task(args)
    return 0


def _add_tokenizer(sub) -> None:
    p = sub.add_parser("tokenizer", help="train or try the caption BPE tokenizer")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="learn a BPE vocabulary from a dataset's captions")
    t.add_argument("--data", default="shapes", help="shapes | mnist | fashion-mnist | folder:PATH")
    t.add_argument("--vocab-size", type=int, default=1024, help="at most this many BPE tokens")
    t.add_argument("--text-len", type=int, default=32, help="fixed caption length in tokens")
    t.add_argument("--samples", type=int, default=None, help="use only the first N captions")
    t.add_argument("--out", required=True, help="tokenizer.json to write")
    t.set_defaults(func=_cmd_tokenizer_train)
    e = tsub.add_parser("encode", help="print the ids of a caption")
    e.add_argument("text", help="caption")
    e.add_argument("--tokenizer", required=True, help="tokenizer.json (or a folder holding one)")
    e.set_defaults(func=_cmd_tokenizer_encode)


def _cmd_tokenizer_train(args) -> int:
    from cvformers.data import build_dataset
    from cvformers.text import train_tokenizer

    tok = train_tokenizer(build_dataset(args.data, split="train"), args.out, vocab_size=args.vocab_size, text_len=args.text_len,
                          samples=args.samples)
    print(f"wrote {args.out}: vocab_size {tok.vocab_size}, text_len {tok.text_len}, "
          f"num_text_tokens {tok.num_text_tokens}")
    return 0


def _cmd_tokenizer_encode(args) -> int:
    from cvformers.text import BPETokenizer

    tok = BPETokenizer.load(args.tokenizer)
    ids = tok.encode(args.text)[0]
    print(" ".join(str(int(i)) for i in ids))
    print(repr(tok.decode(ids)))
    return 0


def _add_zero_shot(sub) -> None:
    p = sub.add_parser("zero-shot", help="classify images with a CLIP and label prompts")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--clip", required=True, help="CLIP run folder, or an OpenAI / open_clip weight file")
    p.add_argument("--labels", required=True, help='comma-separated class names, e.g. "circle,square"')
    p.add_argument("--template", action="append", default=None,
                   help='prompt with {} for the label (repeat for an ensemble); default: the CLIP run\'s own '
                        'training wording (the shipped CLIP: "a {size} {colour} {}"), "a photo of a {}." for weight files')
    p.add_argument("--vocab", default=None, help="CLIP BPE merges file (default: the installed open_clip's)")
    p.add_argument("--no-quick-gelu", action="store_true", help="(weight files) the checkpoint used exact GELU")
    p.set_defaults(func=_cmd_zero_shot)


def _cmd_zero_shot(args) -> int:
    from cvformers.pipelines.zero_shot import zero_shot_classify

    labels, probs = zero_shot_classify(args.clip, args.labels, args.images, args.template,
                                       vocab=args.vocab, quick_gelu=not args.no_quick_gelu)
    for path, row in zip(args.images, probs.tolist()):
        best = max(range(len(labels)), key=row.__getitem__)
        ranked = ", ".join(f"{labels[i]} {row[i]:.3f}" for i in sorted(range(len(labels)), key=lambda i: -row[i]))
        print(f"{path}\t{labels[best]}\t{ranked}")
    return 0


def _add_eval_retrieval(esub) -> None:
    p = esub.add_parser("retrieval", help="CLIP image<->text Recall@1/5/10")
    p.add_argument("--clip", required=True, help="CLIP run folder, or an OpenAI / open_clip weight file")
    p.add_argument("--data", default=None, help="dataset spec (default: the run's own data)")
    p.add_argument("--split", default="test", help="split to evaluate (shapes: test | heldout)")
    p.add_argument("--limit", type=int, default=1000, help="number of (image, caption) pairs")
    p.add_argument("--by-index", action="store_true", help="only the pair's own caption counts (not equal strings)")
    p.add_argument("--vocab", default=None, help="CLIP BPE merges file (default: the installed open_clip's)")
    p.set_defaults(func=_cmd_eval_retrieval)


def _cmd_eval_retrieval(args) -> int:
    import json

    from cvformers.eval.retrieval import evaluate_retrieval

    result = evaluate_retrieval(args.clip, args.data, split=args.split, limit=args.limit,
                                match_equal_captions=not args.by_index, vocab=args.vocab)
    print(json.dumps(result))
    return 0


def _add_eval_classifier(esub) -> None:
    p = esub.add_parser("classifier", help="test accuracy of a trained image classifier run")
    p.add_argument("run", help="classifier run folder")
    p.add_argument("--data", default=None, help="dataset spec (default: the run's own data)")
    p.add_argument("--split", default=None, help="split to evaluate (default: the run's eval split, test)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--confusion", default=None, metavar="PNG",
                   help="also draw the confusion matrix, named classes and counts (pip install 'cvformers[plot]')")
    p.set_defaults(func=_cmd_eval_classifier)


def _cmd_eval_classifier(args) -> int:
    import json

    from cvformers.eval.classification import evaluate_classifier

    if args.confusion is not None:
        from cvformers.eval.plots import check_plot_target

        check_plot_target(args.confusion)  # before the evaluation: a bad path or no matplotlib fails at once
    r = evaluate_classifier(args.run, args.data, split=args.split, limit=args.limit)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['data']} {r['split']}: accuracy {100 * r['accuracy']:.2f}% ({r['n']} images), loss {r['loss']:.4f}")
        print("per class: " + ", ".join(f"{name} {100 * acc:.1f}%" for name, acc in r["per_class"].items()))
    if args.confusion is not None:
        from cvformers.eval.plots import confusion_figure

        confusion_figure(r["confusion"], r["classes"], args.confusion, title=f"{Path(args.run).name}: {r['data']} {r['split']}")
        print(f"wrote {args.confusion}")
    return 0


def _add_eval_knn(esub) -> None:
    p = esub.add_parser("knn", help="weighted k-NN and linear-probe accuracy of frozen features (DINO §4.1)")
    p.add_argument("run", help="dino run (its teacher), classifier run (its backbone), or a preset name (random init)")
    p.add_argument("--data", default="fashion-mnist", help="labelled data: fashion-mnist | mnist | shapes | folder:PATH")
    p.add_argument("--k", type=int, default=20, help="neighbours that vote (paper: 20)")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the exp(similarity / T) vote weights")
    p.add_argument("--train-limit", type=int, default=None, help="memory bank: the first N train images (default all)")
    p.add_argument("--test-limit", type=int, default=None, help="queries: the first N test images (default all)")
    p.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    p.add_argument("--student", action="store_true", help="(dino runs) the student's weights instead of the teacher's")
    p.set_defaults(func=_cmd_eval_knn)


def _cmd_eval_knn(args) -> int:
    import json

    from cvformers.eval.knn import evaluate_features

    import math

    if args.k < 1 or not (math.isfinite(args.temperature) and args.temperature > 0):
        raise UserError(f"--k must be >= 1 and --temperature a number > 0, got {args.k} and {args.temperature}")
    for name in ("train_limit", "test_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    print(json.dumps(evaluate_features(args.run, args.data, k=args.k, temperature=args.temperature,
                                       train_limit=args.train_limit, test_limit=args.test_limit,
                                       probe=not args.no_probe, student=args.student)))
    return 0


def _add_eval_generation(esub) -> None:
    p = esub.add_parser("generation", help="generated images against held-out caption-folder pairs: FD on CLIP "
                                           "features and CLIP R-precision")
    p.add_argument("--model", required=True, help="dalle or unclip run folder or bundle trained on a caption folder")
    p.add_argument("--clip", default=None, help="CLIP run that judges (default: the CLIP the model carries)")
    p.add_argument("--data", default=None, help="folder:PATH (default: the model's own training data)")
    p.add_argument("--holdout", type=float, default=None, help="held-out share of --data (default: the model's)")
    p.add_argument("--split", default="test", help="the held-out split")
    p.add_argument("--limit", type=int, default=0, help="use the first N held-out pairs (0: all)")
    p.add_argument("--candidates", type=int, default=1, help="images drawn per caption; > 1: CLIP keeps the best")
    p.add_argument("--distractors", type=int, default=99, help="other captions each image is ranked against")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first caption; caption i uses seed + i")
    p.add_argument("--splits", type=int, default=10, help="random halvings the FDs are averaged over")
    p.add_argument("--device", default="cpu", type=_device, help="cpu | cuda")
    p.set_defaults(func=_cmd_eval_generation)


def _cmd_eval_generation(args) -> int:
    import json

    from cvformers.eval.heldout_generation import HeldoutGenerationConfig, heldout_generation, heldout_pairs, run_data
    from cvformers.pipelines.rerank import ClipReranker
    from cvformers.pipelines.text_to_image import TextToImage
    from cvformers.pipelines.unclip import UnCLIP, is_unclip

    if args.holdout is not None and not 0 < args.holdout < 1:
        raise UserError(f"--holdout must be between 0 and 1, got {args.holdout}")
    config = HeldoutGenerationConfig(split=args.split, limit=args.limit, candidates=args.candidates,
                                     distractors=args.distractors, seed=args.seed, splits=args.splits)
    data, holdout = args.data, args.holdout
    if data is None or holdout is None:
        own_data, own_holdout = run_data(args.model)
        data, holdout = data or own_data, own_holdout if holdout is None else holdout
    if is_unclip(args.model):  # an unCLIP model carries the CLIP it was trained on, and reranks with it
        pipe = UnCLIP.load(args.model, device=args.device)
        carried = ClipReranker(pipe.clip, pipe.tokenizer)
    else:
        pipe = TextToImage.load(args.model, device=args.device)
        carried = pipe.reranker
    judge = ClipReranker.load(args.clip, device=args.device) if args.clip is not None else carried
    if judge is None:
        raise UserError(f"{args.model} carries no CLIP: give --clip RUN to score with")
    if isinstance(pipe, TextToImage) and pipe.reranker is None and config.candidates > 1:
        pipe.reranker = judge  # a DALL-E without its own CLIP reranks with the judge
    channels = getattr(getattr(pipe, "vae", None), "channels", 3)
    real, captions = heldout_pairs(data, holdout, pipe.image_size, channels, config.split, config.limit)
    result = heldout_generation(pipe, judge, real, captions, config)
    print(json.dumps({"model": args.model, "data": data, "split": config.split,
                      "judge": args.clip or "the model's CLIP", **result}))
    return 0


# `cvformers eval WHAT`: each evaluation adds itself here
def _add_eval_fidelity(esub) -> None:
    p = esub.add_parser("fidelity", help="caption fidelity of generated shapes (and the CLIP reranking gain)")
    p.add_argument("--model", default="default", help="dalle run folder or bundle, 'default', 'unclip', or an unclip folder")
    p.add_argument("--clip", default=None, help="CLIP run used to rerank (default: the model's own CLIP)")
    p.add_argument("--split", default="test", help="test (training distribution) or heldout (unseen pairs)")
    p.add_argument("--captions", type=int, default=100, help="captions (scenes) to draw")
    p.add_argument("--per-caption", type=int, default=8, help="images drawn per caption")
    p.add_argument("--rerank", type=int, default=None,
                   help="instead: draw this many candidates a caption, CLIP top-1 vs a random candidate")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and of sampling")
    p.add_argument("--wording", choices=("template", "paraphrase"), default="template",
                   help="the data's caption wording, or the same scenes said as people type them")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely ids")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--steps", type=int, default=None, help="(unclip) decoder DDIM steps")
    p.add_argument("--prior-guidance", type=float, default=None, help="(unclip) the prior's classifier-free guidance")
    p.add_argument("--prior", choices=("diffusion", "text"), default=None,
                   help="(unclip) the decoder reads the prior's sample, or the caption's CLIP text embedding (no prior)")
    p.add_argument("--candidates", type=int, default=None,
                   help="draw this many a caption and score the --per-caption best by the reranker")
    p.add_argument("--no-upsampler", action="store_true", help="(unclip) score the decoder's images, before the upsampler")
    p.add_argument("--show-misses", default=None, metavar="DIR",
                   help="write the images the checker failed, each with its caption and verdict, as DIR/misses_*.png "
                        "sheets and DIR/misses.jsonl")
    p.add_argument("--device", default="cpu", type=_device, help="cpu | cuda")
    p.set_defaults(func=_cmd_eval_fidelity)


def _cmd_eval_fidelity(args) -> int:
    import json

    from cvformers.eval.generation import caption_fidelity, rerank_gain
    from cvformers.pipelines.text_to_image import TextToImage
    from cvformers.pipelines.unclip import UnCLIP, is_unclip

    if args.rerank and args.show_misses is not None:
        raise UserError("--show-misses draws the misses of the fidelity measurement; leave out --rerank")
    if args.rerank and args.candidates is not None:
        raise UserError("--rerank N draws its own N candidates a caption; leave out --candidates")
    if is_unclip(args.model):
        given = [flag for flag, value in {"--temperature": args.temperature, "--top-k": args.top_k,
                                          "--top-p": args.top_p}.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: DALL-E settings; {args.model} is an unCLIP model")
        pipe = UnCLIP.load(args.model, device=args.device, reranker=_reranker(args))
        if args.no_upsampler:
            pipe.upsampler = None
        sampling = {"guidance": args.guidance, "steps": args.steps, "prior_guidance": args.prior_guidance,
                    "prior": args.prior, "candidates": args.candidates}
    else:
        if args.steps is not None or args.no_upsampler or args.prior_guidance is not None or args.prior is not None:
            raise UserError("--steps, --prior-guidance, --prior and --no-upsampler are unCLIP settings")
        pipe = TextToImage.load(args.model, device=args.device, reranker=_reranker(args))
        sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
                    "guidance": args.guidance, "candidates": args.candidates}
    sampling = {name: value for name, value in sampling.items() if value is not None}
    if args.rerank:
        result = rerank_gain(pipe, args.split, args.captions, args.rerank, seed=args.seed,
                             wording=args.wording, **sampling)
    else:
        result = caption_fidelity(pipe, args.split, args.captions, args.per_caption, seed=args.seed,
                                  wording=args.wording, show_misses=args.show_misses, **sampling)
    print(json.dumps(result))
    return 0


_EVAL_COMMANDS = [_add_eval_fidelity, _add_eval_generation, _add_eval_retrieval, _add_eval_classifier, _add_eval_knn]


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a trained model")
    esub = p.add_subparsers(dest="eval_command", required=True)
    for add in _EVAL_COMMANDS:
        add(esub)


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the vision model presets with parameter counts")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args) -> int:
    from cvformers.models.vision import format_models_table, list_models

    print(format_models_table(list_models()))
    return 0


def _add_attention(sub) -> None:
    p = sub.add_parser("attention", help="ViT attention maps + rollout, DINO [CLS] attention + masks, or Mixer token-mixing weights, as a PNG")
    p.add_argument("image", nargs="?", default=None, help="image file (needed for a ViT)")
    p.add_argument("--model", required=True, help="classifier, dino, clip or dalle run folder ('default/clip', 'default': the shipped ones), "
                                                "or a preset name (random weights)")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--query", default=None, help="ROW,COL of the query patch (default: the centre patch)")
    p.add_argument("--units", type=int, default=16, help="(mixer) hidden units shown per block")
    p.add_argument("--keep", type=float, default=0.6,
                   help="(dino runs) share of each head's attention mass its mask keeps (DINO Fig. 3: 0.6)")
    p.add_argument("--prompt", default=None,
                   help="(dalle runs, 'default') draw a sample of this caption and show which words its image positions read")
    p.add_argument("--seed", type=int, default=0, help="(with --prompt) seed of the sample")
    p.set_defaults(func=_cmd_attention)


def _cmd_attention(args) -> int:
    from cvformers.pipelines.attention import attention_figure

    query = None
    if args.query:
        try:
            row, col = (int(v) for v in args.query.split(","))
        except ValueError:
            raise UserError(f"--query takes ROW,COL (two integers), got {args.query!r}") from None
        query = (row, col)
    print(attention_figure(args.model, args.image, args.out, query=query, units=args.units, keep=args.keep,
                           prompt=args.prompt, seed=args.seed))
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="curves of runs from their metrics.jsonl: one panel per metric, runs overlaid "
                                    "(pip install 'cvformers[plot]')")
    p.add_argument("runs", nargs="+", help="run folders (each with a metrics.jsonl)")
    p.add_argument("--out", default="curves.png", help="PNG to write")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metrics to draw, e.g. loss,eval_loss (default: loss, lr and every eval_ metric)")
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args) -> int:
    from cvformers.eval.plots import plot_runs

    metrics = args.metrics.split(",") if args.metrics is not None else None
    drawn = plot_runs(args.runs, args.out, metrics)
    print(f"wrote {args.out} ({', '.join(drawn)})")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="build datasets from files installed on this machine")
    dsub = p.add_subparsers(dest="data_command", required=True)
    o = dsub.add_parser("openclipart", help="image-caption folder from OpenClipart (apt openclipart-png "
                        "openclipart-svg) and Noto colour emoji (apt fonts-noto-color-emoji)")
    o.add_argument("--out", required=True, help="folder to write NAME.png + NAME.txt pairs into")
    o.add_argument("--image-size", type=int, default=64, help="side of the square images written")
    o.add_argument("--no-emoji", action="store_true", help="leave the emoji out")
    o.add_argument("--limit", type=int, default=None, help="stop after this many pictures (quick tries)")
    o.set_defaults(func=_cmd_data_openclipart)
    w = dsub.add_parser("shards", help="write a dataset spec (shapes, folder:PATH, fashion-mnist …) as WebDataset "
                        "tar shards + index.json, for --data wds:DIR")
    w.add_argument("source", help="dataset spec: shapes | mnist | fashion-mnist | folder:PATH | …")
    w.add_argument("--out", required=True, help="empty folder for shard-000000.tar … and index.json")
    w.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    w.add_argument("--limit", type=int, default=None, help="stop after this many samples")
    w.add_argument("--image-size", type=int, default=64, help="side of the square PNGs written")
    w.add_argument("--split", default="train", help="split of the source to write (train, test, heldout)")
    w.set_defaults(func=_cmd_data_shards)


def _cmd_data_openclipart(args) -> int:
    from cvformers.data.openclipart import EMOJI_FONT, build_openclipart

    stats = build_openclipart(args.out, image_size=args.image_size, limit=args.limit,
                              emoji_font=None if args.no_emoji else EMOJI_FONT)
    print(f"wrote {stats.written} image-caption pairs to {stats.out} ({stats.clipart} clip art, "
          f"{stats.emoji} emoji); dropped {stats.duplicate_image} duplicate images, "
          f"{stats.duplicate_caption} duplicate captions, {stats.no_caption} without a title; "
          f"{stats.svg_rendered} drawn from the SVG (of {stats.unreadable} unreadable or blank PNGs, "
          f"{stats.too_large} too large, the rest smaller than {args.image_size} px); "
          f"{stats.collection_titles} collection names as titles replaced by the file name, "
          f"{stats.foreign_titles} Italian or French titles replaced by the keywords")
    for note in stats.notes:
        print(note)
    return 0


def _cmd_data_shards(args) -> int:
    from cvformers.data import build_dataset
    from cvformers.data.shards import ShardWriteConfig, write_shards

    cfg = ShardWriteConfig(shard_size=args.shard_size, limit=args.limit, image_size=args.image_size, split=args.split)
    if args.source.partition(":")[0] == "wds":
        raise UserError("data shards: the source is already shards; give an indexed dataset (shapes, folder:PATH, …)")
    source = build_dataset(args.source, split=args.split, image_size=args.image_size)
    index = write_shards(source, args.out, cfg, progress=sys.stderr.isatty(), describe=args.source)
    print(f"wrote {index['total']} samples in {len(index['shards'])} shard(s) to {args.out} "
          f"(index.json; train on it with --data wds:{args.out})")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write RUN/model.safetensors from the run's latest sharded (fsdp) checkpoint")
    p.add_argument("run", help="run folder trained with [train] parallel = \"fsdp\"")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from cvformers.train.sharded_checkpoint import export_weights

    print(f"wrote {export_weights(args.run)}")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text to images with DALL-E or DALL-E 2 (unCLIP) as a PNG grid",
                       epilog="Sampling flags left out take the model's own settings; the shipped models' are "
                              f"{_shipped_sampling()}.")
    p.add_argument("prompt", nargs="*", help="the caption(s) to draw")
    p.add_argument("--prompt-file", default=None, help="a text file of captions, one a line (added to the prompts)")
    p.add_argument("--model", default="default", help="'default' (the shipped DALL-E), 'unclip' (the shipped "
                                                      "DALL-E 2), a dalle run, an unclip bundle or folder of runs")
    p.add_argument("--num", type=int, default=8, help="images per prompt")
    p.add_argument("--out", default=None, help="grid picture to write, .png/.jpg/.webp (default grid.png; with several "
                                                "prompts one grid each, named OUT-<prompt>.png)")
    p.add_argument("--out-dir", default=None, help="write each image as its own file: DIR/<prompt>/<i>.png")
    p.add_argument("--tile-size", type=int, default=128,
                   help="enlarge each image by whole pixels to at least this side (0: as sampled)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p.add_argument("--temperature", type=float, default=None, help="softmax temperature (0 = greedy)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely ids")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--steps", type=int, default=None, help="(unclip) decoder DDIM steps")
    p.add_argument("--prior-guidance", type=float, default=None, help="(unclip) the prior's classifier-free guidance")
    p.add_argument("--prior", choices=("diffusion", "text"), default=None,
                   help="(unclip) the decoder reads the prior's sample, or the caption's CLIP text embedding (no prior)")
    p.add_argument("--candidates", type=int, default=None,
                   help="sample this many and keep the --num best by CLIP (a DALL-E run without clip/ needs --clip)")
    p.add_argument("--clip", default=None, help="CLIP run folder or weight file used to rerank the candidates")
    p.add_argument("--image-prompt", default=None, help="image whose top rows the samples keep (DALL-E §3.3)")
    p.add_argument("--prompt-rows", type=int, default=None, help="rows of image ids kept from --image-prompt")
    p.add_argument("--device", default="cpu", type=_device, help="cpu | cuda")
    p.set_defaults(func=_cmd_generate)


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        try:
            text = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e}") from e
        prompts += [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UserError("give a prompt to draw (or --prompt-file with one a line)")
    return prompts


def _reranker(args):
    """The CLIP of --clip as a reranker, or None (the model's own)."""
    if args.clip is None:
        return None
    from cvformers.pipelines.rerank import ClipReranker

    return ClipReranker.load(args.clip, device=args.device)


def _generator_pipeline(args):
    """(pipeline, its sampling with the flags on top, extra generate keywords) for --model."""
    from cvformers.pipelines.unclip import UnCLIP, is_unclip

    if is_unclip(args.model):
        dalle_only = {"--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p,
                      "--image-prompt": args.image_prompt, "--prompt-rows": args.prompt_rows}
        given = [flag for flag, value in dalle_only.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)}: DALL-E settings; {args.model} is an unCLIP model "
                            "(it takes --guidance, --prior-guidance, --prior, --steps, --candidates, --clip, --seed)")
        pipe = UnCLIP.load(args.model, device=args.device, reranker=_reranker(args))
        return pipe, pipe.sampling.override(guidance=args.guidance, prior_guidance=args.prior_guidance,
                                            prior=args.prior, steps=args.steps, candidates=args.candidates,
                                            seed=args.seed), {}
    from cvformers.pipelines.text_to_image import TextToImage

    if args.steps is not None or args.prior_guidance is not None or args.prior is not None:
        raise UserError("--steps, --prior-guidance and --prior are diffusion settings; DALL-E draws one image id per step")
    pipe = TextToImage.load(args.model, device=args.device, reranker=_reranker(args))
    # the model's [sampling] defaults, with the flags given on the command line on top: one object, checked once
    sampling = pipe.sampling.override(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                      guidance=args.guidance, candidates=args.candidates, seed=args.seed)
    return pipe, sampling, {"image_prompt": args.image_prompt, "prompt_rows": args.prompt_rows}


def _cmd_generate(args) -> int:
    from cvformers.pipelines.text_to_image import prompt_slug

    prompts = _prompts(args)
    if args.out is not None and args.out_dir is not None:
        raise UserError("give --out (grids) or --out-dir (one file per image), not both")
    if args.tile_size < 0:
        raise UserError(f"--tile-size must be >= 0, got {args.tile_size}")
    pipe, sampling, extra = _generator_pipeline(args)
    out = Path(args.out or "grid.png")
    slugs = [prompt_slug(p) for p in prompts]
    slugs = [s if slugs.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(slugs)]  # two prompts, one slug
    for prompt, slug in zip(prompts, slugs):
        result = pipe.generate(prompt, args.num, sampling, **extra)
        if args.out_dir is not None:
            written = result.save_images(Path(args.out_dir) / slug, min_tile=args.tile_size)
            print(f"wrote {len(written)} images to {Path(args.out_dir) / slug}")
        else:
            path = out if len(prompts) == 1 else out.with_name(f"{out.stem}-{slug}{out.suffix}")
            result.save_grid(path, min_tile=args.tile_size)
            print(f"wrote {path} ({len(result.images)} images)")
    return 0


def _add_bundle(sub) -> None:
    p = sub.add_parser("bundle", help="export a dalle run (+ its vae, + a CLIP), or unCLIP stage runs, as one model "
                                      "folder for generate")
    p.add_argument("dalle", nargs="?", default=None, help="dalle run folder (with vae/ and tokenizer.json)")
    p.add_argument("--unclip", default=None, help="instead: a folder of unCLIP runs prior/, decoder/ [, upsampler/]")
    p.add_argument("--clip", default=None, help="CLIP run folder to include as the reranker")
    p.add_argument("--out", required=True, help="folder to write: new, empty, or a bundle written before (replaced whole)")
    p.add_argument("--fp32", action="store_true", help="keep fp32 weights (default: fp16, half the size)")
    p.set_defaults(func=_cmd_bundle)


def _cmd_bundle(args) -> int:
    from cvformers.pipelines.bundle import bundle_size, export_bundle, export_unclip_bundle

    if (args.dalle is None) == (args.unclip is None):
        raise UserError("give a dalle run folder or --unclip RUNS (one of them)")
    if args.unclip is not None:
        if args.clip is not None:
            raise UserError("--clip: an unCLIP bundle takes the CLIP its decoder was trained with (decoder/clip/)")
        out = export_unclip_bundle(args.unclip, args.out, half=not args.fp32)
    else:
        out = export_bundle(args.dalle, args.out, clip_run=args.clip, half=not args.fp32)
    print(f"wrote {out} ({bundle_size(out) / 1e6:.2f} MB)")
    return 0


def _add_model_info(sub) -> None:
    p = sub.add_parser("model-info", help="parameters, FLOPs per token and activation memory of a DALL-E config")
    p.add_argument("config", help="dalle preset (tiny, small, paper), TOML file with [model], or a run folder")
    p.add_argument("--batch-size", type=int, default=1, help="also show activation memory for this batch")
    p.set_defaults(func=_cmd_model_info)


def _cmd_model_info(args) -> int:
    from cvformers.models.dalle_info import describe

    print(describe(args.config, batch_size=args.batch_size))
    return 0


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="image tokenizer (dvae, vqvae): held-out PSNR, codebook perplexity, PNG grid")
    p.add_argument("--vae", required=True, help="run folder of a trained dvae or vqvae")
    p.add_argument("--data", default=None, help="dataset spec (default: the run's own data)")
    p.add_argument("--split", default=None, help="split to measure (default: the run's eval split, e.g. test)")
    p.add_argument("--out", default="recon.png", help="PNG to write: originals above reconstructions")
    p.add_argument("--num", type=int, default=16, help="images in the PNG grid")
    p.add_argument("--eval-images", type=int, default=1000, help="images the metrics average over (0: the whole split)")
    p.add_argument("--device", default="cpu", type=_device, help="cpu | cuda")
    p.set_defaults(func=_cmd_reconstruct)


def _cmd_reconstruct(args) -> int:
    from cvformers.eval.reconstruction import reconstruct_run

    m = reconstruct_run(args.vae, args.out, data=args.data, split=args.split, num=args.num,
                        eval_images=args.eval_images, device=args.device)
    print(f"PSNR {m['psnr']:.2f} dB  perplexity {m['perplexity']:.1f}  codebook usage {100 * m['usage']:.1f}%  "
          f"({int(m['images'])} images); wrote {args.out}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw images from a trained diffusion model")
    ssub = p.add_subparsers(dest="sample_command", required=True)
    d = ssub.add_parser("ddpm", help="images from a `cvformers train ddpm` run (DDPM or DDIM sampling)")
    d.add_argument("--model", required=True, help="ddpm run folder")
    d.add_argument("--sampler", default="ddim", help="ddim (a subset of the steps) | ddpm (all T steps)")
    d.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    d.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 = DDPM's variance")
    d.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = off; class-conditional runs)")
    d.add_argument("--label", default=None, help="class id for every image, or comma-separated ids, one per image")
    d.add_argument("--prompt", default=None, help="caption of every image (runs trained with [ddpm] conditional = \"caption\")")
    d.add_argument("--compile", action="store_true", help="torch.compile the U-Net first (tens of seconds; pays off on long runs)")
    d.add_argument("--num", type=int, default=16, help="images to draw")
    d.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    d.add_argument("--no-ema", action="store_true", help="sample from the raw weights instead of their moving average")
    d.add_argument("--out", default="samples.png", help="picture to write (.png, .jpg, .webp)")
    d.add_argument("--tile-size", type=int, default=128, help="enlarge each image to at least this side (0: as sampled)")
    d.add_argument("--device", default="cpu", type=_device, help="cpu | cuda")
    d.set_defaults(func=_cmd_sample_ddpm)


def _cmd_sample_ddpm(args) -> int:
    import torch

    from cvformers.diffusion.samplers import DiffusionSamplingConfig
    from cvformers.images import picture, save_image
    from cvformers.pipelines.diffusion import DiffusionPipeline

    sampling = DiffusionSamplingConfig(sampler=args.sampler, steps=args.steps, eta=args.eta,
                                       guidance=args.guidance, seed=args.seed)
    labels = None
    if args.label is not None:
        try:
            labels = torch.tensor([int(x) for x in args.label.split(",")])
        except ValueError:
            raise UserError(f"--label takes class ids such as 3 or 0,1,2, got {args.label!r}") from None
    if args.tile_size < 0:
        raise UserError(f"--tile-size must be >= 0, got {args.tile_size}")
    pipe = DiffusionPipeline.load(args.model, device=args.device, use_ema=not args.no_ema, compile=args.compile)
    images = pipe.generate(args.num, sampling, labels=labels, prompt=args.prompt, progress=True)
    save_image(picture(images, args.tile_size, nrow=min(len(images), 8)), args.out, metadata={"model": str(args.model), "sampling": repr(sampling),
                                            "labels": "" if labels is None else args.label,
                                            "prompt": args.prompt or ""})
    print(f"wrote {args.out} ({len(images)} images)")
    return 0


def _add_unclip_sampling(p, steps_flag: str = "--steps") -> None:
    p.add_argument("--model", default="unclip", help="'unclip' (the shipped DALL-E 2), an unclip bundle or folder of runs")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same images)")
    p.add_argument("--guidance", type=float, default=None, help="decoder classifier-free guidance (1 = off)")
    p.add_argument(steps_flag, dest="decoder_steps", type=int, default=None, help="decoder DDIM steps")
    p.add_argument("--tile-size", type=int, default=128, help="enlarge each image to at least this side (0: as sampled)")
    p.add_argument("--device", default="cpu", type=_device, help="cpu | cuda")


def _unclip(args):
    from cvformers.pipelines.unclip import UnCLIP

    if args.tile_size < 0:
        raise UserError(f"--tile-size must be >= 0, got {args.tile_size}")
    pipe = UnCLIP.load(args.model, device=args.device)
    return pipe, pipe.sampling.override(guidance=args.guidance, steps=args.decoder_steps, seed=args.seed)


def _save_strip(images, args, meta: dict) -> None:
    from cvformers.images import picture, save_image

    save_image(picture(images, args.tile_size, nrow=min(len(images), 8)), args.out, metadata=meta)
    print(f"wrote {args.out} ({len(images)} images)")


def _add_vary(sub) -> None:
    p = sub.add_parser("vary", help="variations of an image with DALL-E 2 (its CLIP embedding, decoded anew)")
    p.add_argument("image", help="image file")
    p.add_argument("--num", type=int, default=8, help="variations to draw")
    p.add_argument("--out", default="variations.png", help="picture to write (.png, .jpg, .webp)")
    _add_unclip_sampling(p)
    p.set_defaults(func=_cmd_vary)


def _cmd_vary(args) -> int:
    pipe, sampling = _unclip(args)
    result = pipe.vary(args.image, args.num, sampling)
    _save_strip(result.images, args, {"source": str(args.image), "clip_similarity": repr([round(float(v), 4) for v in result.scores])})
    return 0


def _add_interpolate(sub) -> None:
    p = sub.add_parser("interpolate", help="DALL-E 2: images along the path between two images' CLIP embeddings")
    p.add_argument("images", nargs=2, help="the two image files")
    p.add_argument("--steps", dest="frames", type=int, default=8, help="images along the path, ends included")
    p.add_argument("--out", default="interpolation.png", help="picture to write (.png, .jpg, .webp)")
    _add_unclip_sampling(p, steps_flag="--decoder-steps")
    p.set_defaults(func=_cmd_interpolate)


def _cmd_interpolate(args) -> int:
    pipe, sampling = _unclip(args)
    images = pipe.interpolate(args.images[0], args.images[1], args.frames, sampling)
    _save_strip(images, args, {"from": str(args.images[0]), "to": str(args.images[1])})
    return 0


def _add_text_diff(sub) -> None:
    p = sub.add_parser("text-diff", help="DALL-E 2: move an image's CLIP embedding from one caption toward another")
    p.add_argument("image", help="image file")
    p.add_argument("--caption", required=True, help="what the image shows now, e.g. 'a red circle'")
    p.add_argument("--to", required=True, help="what it should become, e.g. 'a blue circle'")
    p.add_argument("--amounts", default="0,0.25,0.5,0.75", help="comma-separated rotations in [0, 1] toward the change")
    p.add_argument("--out", default="text-diff.png", help="picture to write (.png, .jpg, .webp)")
    _add_unclip_sampling(p)
    p.set_defaults(func=_cmd_text_diff)


def _cmd_text_diff(args) -> int:
    try:
        amounts = [float(a) for a in args.amounts.split(",")]
    except ValueError:
        raise UserError(f"--amounts takes numbers such as 0,0.25,0.5, got {args.amounts!r}") from None
    pipe, sampling = _unclip(args)
    images = pipe.text_diff(args.image, args.caption, args.to, amounts, sampling)
    _save_strip(images, args, {"source": str(args.image), "caption": args.caption, "to": args.to, "amounts": args.amounts})
    return 0


def _port(text: str) -> int:
    """A TCP port, 1..65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port}")
    return port


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="a web page (Gradio) to try the models: text to image, image prompt, "
                                     "zero-shot, attention (pip install -e '.[ui]')")
    p.add_argument("--model", action="append", default=None,
                   help="text-to-image generator: 'default' (the shipped DALL-E) or a run folder; repeat for a menu")
    p.add_argument("--clip", default="default/clip", help="CLIP run or weight file of the zero-shot tab")
    p.add_argument("--classifier", action="append", default=None,
                   help="classifier run of the attention tab; repeat for a menu (default: an untrained ViT preset)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=7860, help="TCP port")
    p.add_argument("--concurrency", type=int, default=1,
                   help="requests computed at once over all tabs (each uses every core)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from cvformers.serve.config import ServeConfig

    defaults = ServeConfig()
    cfg = ServeConfig(models=tuple(args.model or defaults.models), clip=args.clip,
                      classifiers=tuple(args.classifier or defaults.classifiers), host=args.host, port=args.port,
                      concurrency=args.concurrency)
    from cvformers.serve import serve  # after the settings are checked: a bad flag needs no Gradio

    serve(cfg)
    return 0


_COMMANDS = [
    _add_generate, _add_vary, _add_interpolate, _add_text_diff, _add_sample, _add_train, _add_export, _add_bundle,
    _add_reconstruct, _add_tokenizer, _add_data, _add_zero_shot, _add_eval, _add_plot, _add_models, _add_attention,
    _add_model_info, _add_serve,
]


class _DefaultsHelp(argparse.HelpFormatter):
    """Help that states each option's default, as argparse's ArgumentDefaultsHelpFormatter does,
    but not for switches and options whose default is "unset" (those say in their help where the
    value comes from, e.g. the model's own sampling settings)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or action.default is None or action.default is argparse.SUPPRESS
                or not action.option_strings or isinstance(action.default, bool)):
            return text
        return text + " (default: %(default)s)"


def _shipped_sampling() -> str:
    """The sampling defaults of the shipped models, for the help of the flags they fill in."""
    from cvformers.config import load_toml
    from cvformers.loading import SHIPPED, default_bundle

    parts = []
    for name in SHIPPED:
        try:
            table = load_toml(default_bundle(name) / "config.toml").get("sampling", {})
        except (OSError, ValueError):
            continue
        shown = ", ".join(f"{k} {v}" for k, v in table.items() if k in ("temperature", "top_k", "guidance", "steps"))
        parts.append(f"'{name}': {shown}")
    return "; ".join(parts)


def _help_everywhere(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = _DefaultsHelp
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _help_everywhere(child)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvformers", description="Text to image (DALL-E: dVAE + sparse transformer + CLIP reranking), CLIP, "
        "and vision transformers (ViT, MLP-Mixer, ConvMixer, Swin).")
    from cvformers import __version__

    parser.add_argument("--version", action="version", version=f"cvformers {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    _help_everywhere(parser)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"cvformers: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.formatwarning = _one_line_warning  # what a user should read, not where it was raised
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, FileNotFoundError) as e:  # the library's "what to change" errors
        print(f"cvformers: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cvformers models | head` closed the pipe: not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush does not complain
        return 0
    except OSError as e:  # the system refused (permissions, disk full): say which file and why
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"cvformers: error:{where} {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvformers: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

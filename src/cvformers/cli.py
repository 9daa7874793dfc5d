"""The ``cvformers`` command. Thin: it parses, loads a config, and calls the library.

Every subcommand is a ``_cmd_*`` function that does nothing a user could not do from
Python. Expected failures (bad config, bad prompt, missing file) raise ``UserError`` or
``ConfigError`` somewhere below; ``main`` prints them as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from cvformers.config import ConfigError
from cvformers.errors import UserError


# --- subcommands ------------------------------------------------------------------------
# Each helper below adds one subparser; keep the work inside the library.


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (dvae, vqvae, dalle, clip, classifier)")
    p.add_argument("task", help="what to train: dvae, vqvae, dalle, clip, classifier")
    p.add_argument("--data", default=None, help="shapes | mnist | fashion-mnist | folder:PATH")
    p.add_argument("--out", required=True, help="run folder to write (or resume)")
    p.add_argument("--config", default=None, help="TOML experiment config ([model], [train], [data])")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
    p.add_argument("--lr", type=float, default=None, help="override train.lr")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--vae", default=None, help="(dalle) run folder of the trained image tokenizer")
    p.add_argument("--model", default=None, help="(classifier, clip) model preset name")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    from cvformers.train.tasks import run_task

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
    from cvformers.text import train_tokenizer

    tok = train_tokenizer(args.data, args.out, vocab_size=args.vocab_size, text_len=args.text_len,
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


_COMMANDS = [_add_train, _add_tokenizer]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cvformers", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, ConfigError, FileNotFoundError) as e:
        print(f"cvformers: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cvformers: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

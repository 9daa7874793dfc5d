"""Caption fidelity of an unCLIP model across its guidance scales and sampling steps.

Each setting is scored by ``cvformers eval fidelity``'s protocol (``cvformers.eval.generation``:
the same scenes of a split, ``--per-caption`` images drawn per caption, no reranking, the checker
of every object's colour, shape, size and position). A setting is ``decoder guidance / prior
guidance / decoder DDIM steps``, optionally followed by ``/ decoder DDIM η / prior draws per image``
(the bundle's 0 and 2: the prior draws two embeddings and keeps the one closest to the text, unCLIP
§2.2).

    python benchmarks/unclip_guidance_sweep.py --model unclip --split heldout --captions 50 \\
        --per-caption 2 --settings 3/1/25 5/1/25 3/3/25 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def setting(text: str) -> dict:
    fields = text.split("/")
    try:
        if len(fields) not in (3, 5):
            raise ValueError(text)
        out = {"guidance": float(fields[0]), "prior_guidance": float(fields[1]), "steps": int(fields[2])}
        if len(fields) == 5:
            out.update(eta=float(fields[3]), prior_candidates=int(fields[4]))
        return out
    except ValueError as e:
        raise argparse.ArgumentTypeError("a setting is GUIDANCE/PRIOR_GUIDANCE/STEPS[/ETA/PRIOR_DRAWS], "
                                         f"e.g. 3/1/25 or 3/1/25/0/2: got {text!r}") from e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="unclip", help="unclip bundle or folder of runs")
    ap.add_argument("--split", default="heldout", help="test (training distribution) or heldout (unseen pairs)")
    ap.add_argument("--captions", type=int, default=50)
    ap.add_argument("--per-caption", type=int, default=2)
    ap.add_argument("--settings", type=setting, nargs="+", default=[setting("3/1/25")],
                    help="decoder guidance / prior guidance / decoder steps [/ η / prior draws], one or more")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from cvformers.eval.generation import caption_fidelity
    from cvformers.pipelines.unclip import UnCLIP

    pipe = UnCLIP.load(args.model)
    print(f"{args.model}: {args.split} split, {args.captions} captions x {args.per_caption}, seed {args.seed}")
    for s in args.settings:
        start = time.perf_counter()
        result = caption_fidelity(pipe, args.split, args.captions, args.per_caption, seed=args.seed, **s)
        row = {**s, **{k: v for k, v in result.items() if isinstance(v, (int, float))},
               "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()

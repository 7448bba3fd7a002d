"""`htsat-hf search`: where in an annotated corpus does <phrase> happen? (annotation/search.py)"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from ..sed_postprocessing import positive_int

EXAMPLES = """examples:
  htsat-hf search out "a dog barking"    # out: annotated by a CLAP model, --text_labels,
  htsat-hf search out "a siren" "glass breaking" --top_k 20   # --tasks ... window_embeddings
  htsat-hf search out "a siren" --json   # one JSON object per hit

Each hit: the rank, the score (cosine similarity of the phrase's CLAP text embedding with the input's stored
joint-space audio embedding), the input's id and the span the stored embedding covers in seconds (a 10-s window for
a folder annotated with --tasks window_embeddings, else the whole input). The phrases run through the CLAP text
tower only; the audio is not read again."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf search", description="Ranked inputs of an annotated corpus for phrases (CLAP).",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a folder annotated by a CLAP model with the embeddings task")
    parser.add_argument("phrases", nargs="+", metavar="PHRASE")
    parser.add_argument("--model", help="the CLAP folder whose text tower embeds the phrases (default: the one the "
                        "folder was annotated with, as its manifest names it)")
    parser.add_argument("--hypothesis_template", help="default: the folder's (the annotation run's)")
    parser.add_argument("--top_k", type=positive_int, default=10, help="hits per phrase")
    parser.add_argument("--json", action="store_true", help="one JSON object per hit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ..annotation.search import EmbeddingIndex, SearchError, search

    started = time.perf_counter()
    try:
        index = EmbeddingIndex.open(args.output_dir)
        hits = search(args.output_dir, args.phrases, model=args.model, hypothesis_template=args.hypothesis_template,
                      top_k=args.top_k, index=index)
    except (SearchError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    for phrase, phrase_hits in hits.items():
        if args.json:
            for hit in phrase_hits:
                print(json.dumps(hit.to_dict()))
            continue
        print(f"{phrase!r}:")
        for hit in phrase_hits:
            print(f"  {hit.rank:3d}  {hit.score:+.4f}  {hit.id}  {hit.onset:.2f}-{hit.offset:.2f} s")
    print(f"[search] {len(index):,} rows, {len(hits)} phrase(s), {time.perf_counter() - started:.2f} s",
          file=sys.stderr)
    return 0


__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    raise SystemExit(main())

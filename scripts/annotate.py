#!/usr/bin/env python
"""Annotate a corpus: tags, events, embeddings and frame scores for every file, as resumable Parquet shards.

    python scripts/annotate.py --model_name_or_path DIR --files a.wav b.flac --output_dir OUT
    accelerate launch --num_processes N scripts/annotate.py --model_name_or_path DIR --file_list all.txt --output_dir OUT

See `python scripts/annotate.py --help` and htsat_hf/annotation/.
"""

from htsat_hf.commands.annotate import main

if __name__ == "__main__":
    main()

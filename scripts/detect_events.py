#!/usr/bin/env python
"""Sound event detection on audio files of any length with an HTS-AT folder.

Example:
    python scripts/detect_events.py recording.wav --model htsat-audioset --threshold 0.3 \
        --median-filter 0.5 --output events.tsv --plot events.png
Writes DCASE task 4 TSV rows (filename, onset, offset, event_label, score) to --output (or prints them). Files that
cannot be read are reported and skipped; the exit status is then 1. See htsat_hf/commands/detect.py.
"""

import sys

from htsat_hf.commands.detect import main

if __name__ == "__main__":
    sys.exit(main())

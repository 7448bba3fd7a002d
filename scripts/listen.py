#!/usr/bin/env python
"""Live sound event detection: tags every hop and events as they end, as JSON lines, from a microphone, a URL, a
file (in real time, or `--as-fast-as-possible`) or raw PCM on stdin.

    python scripts/listen.py --model DIR --ffmpeg-input "-f pulse -i default" --lookahead 2 --threshold 0.3
    python scripts/listen.py --model DIR --input recording.wav --as-fast-as-possible

See `python scripts/listen.py --help` and htsat_hf/live/.
"""

import sys

from htsat_hf.commands.listen import main

if __name__ == "__main__":
    sys.exit(main())

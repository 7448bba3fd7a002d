"""`htsat-hf listen`: live tags and events from a microphone, a URL, a file or raw PCM, as JSON lines."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import IO

from ..annotation.text_queries import add_text_query_arguments, text_query_from_arguments
from ..audio_decoding import AudioInputError, ffmpeg_blocks, ffmpeg_source, probe_streams
from ..sed_postprocessing import (
    add_event_arguments,
    check_event_arguments,
    positive_int,
    seconds,
)

EXAMPLES = """examples:
  htsat-hf listen --model DIR --ffmpeg-input "-f pulse -i default"      # the default PulseAudio microphone
  htsat-hf listen --model DIR --ffmpeg-input "-f alsa -i hw:0"          # an ALSA device
  htsat-hf listen --model DIR --input http://host/stream.mp3            # a network stream
  htsat-hf listen --model DIR --input rec.wav                           # a file, played in real time (ffmpeg -re)
  htsat-hf listen --model DIR --input rec.wav --as-fast-as-possible     # a file, as fast as the model runs
  arecord -f S16_LE -r 16000 | htsat-hf listen --model DIR --stdin --stdin-format s16le --stdin-rate 16000
  htsat-hf listen --model CLAP_DIR --input rec.wav --text-labels "a dog barking" "a siren"   # a CLAP model: phrases

Output, one JSON object per line:
  {"type": "tags", "time": 12.0, "tags": [{"label": ..., "score": ...}, ...]}     one per hop
  {"type": "event", "label": ..., "onset": 8.4, "offset": 10.9, "score": 0.93}   once its offset is final
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="htsat-hf listen", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HTS-AT folder (or Hub id in the local cache)")
    parser.add_argument("--trust-remote-code", action="store_true")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="a file or URL ffmpeg reads")
    source.add_argument("--ffmpeg-input", help='ffmpeg input options, e.g. "-f pulse -i default"')
    source.add_argument("--stdin", action="store_true", help="raw PCM on stdin (see --stdin-format/-rate/-channels)")
    parser.add_argument("--stdin-format", default="s16le", help="ffmpeg sample format of the raw PCM (s16le, f32le...)")
    parser.add_argument("--stdin-rate", type=positive_int, default=16000)
    parser.add_argument("--stdin-channels", type=positive_int, default=1)
    parser.add_argument("--as-fast-as-possible", action="store_true",
                        help="read a file as fast as the model runs instead of in real time")
    parser.add_argument("--hop", type=seconds, default=1.0, help="seconds of audio between runs of the model")
    parser.add_argument("--lookahead", type=seconds, default=0.0,
                        help="seconds of audio seen after a step before its score is emitted (more: closer to offline)")
    parser.add_argument("--top-k", type=positive_int, default=3, help="tags per hop")
    parser.add_argument("--no-pad-start", action="store_true", help="wait for one full window before the first hop")
    parser.add_argument("--device", default=None)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    add_event_arguments(parser)
    add_text_query_arguments(parser, dashes=True)
    return parser


def input_channels(args: argparse.Namespace) -> int:
    """The channels of the chosen source's first audio stream: raw PCM has those given; a file, URL or device is
    probed with ffprobe."""
    if args.stdin:
        return args.stdin_channels
    if args.ffmpeg_input:
        return probe_streams(args.ffmpeg_input, shlex.split(args.ffmpeg_input))[0][1]
    return probe_streams(args.input)[0][1]


def ffmpeg_command(args: argparse.Namespace, sampling_rate: int, channels: int) -> list[str]:
    """ffmpeg reading the chosen source's first audio stream and writing its `channels` as float32 at the model's
    rate to stdout: the detector averages them, as the pipelines average a file's (not ffmpeg's -ac 1 matrix)."""
    command = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error"]
    if args.stdin:
        command = command[:1] + command[2:]  # ffmpeg reads our stdin
        command += ["-f", args.stdin_format, "-ar", str(args.stdin_rate), "-ac", str(args.stdin_channels),
                    "-i", "pipe:0"]
    elif args.ffmpeg_input:
        command += shlex.split(args.ffmpeg_input)
    else:
        if Path(args.input).exists() and not args.as_fast_as_possible:
            command.append("-re")  # a file is played at its own pace, as a live source would deliver it
        command += ["-i", ffmpeg_source(args.input)]  # a path is a path; a URL only as scheme://
    return command + ["-map", "0:a:0", "-ac", str(channels), "-ar", str(sampling_rate), "-f", "f32le", "pipe:1"]


def json_lines(updates, out: IO) -> None:
    for update in updates:
        out.write(json.dumps({"type": "tags", "time": round(update.time, 4), "tags": update.tags}) + "\n")
        for event in update.events:
            out.write(json.dumps({"type": "event", **event}) + "\n")
    out.flush()


def main(argv: list[str] | None = None) -> int:
    """Listens until the source ends (or Ctrl-C); bad flags are usage errors (exit status 2) naming the flag."""
    parser = build_parser()
    args = parser.parse_args(argv)
    event_settings = check_event_arguments(parser, args)
    missing = [tool for tool in ("ffmpeg", "ffprobe") if shutil.which(tool) is None]
    if missing:
        print(f"htsat-hf listen reads audio through ffmpeg and ffprobe ({' and '.join(missing)} not found): "
              "install ffmpeg "
              "(e.g. apt-get install ffmpeg).", file=sys.stderr)
        return 1
    import torch

    from ..live.detector import READ_SECONDS, LiveDetector

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        channels = input_channels(args)
    except AudioInputError as error:
        print(error, file=sys.stderr)
        return 1
    try:  # settings that depend on the model (a hop of whole frames within the window, threshold labels)
        detector = LiveDetector(
            args.model, hop_seconds=args.hop, lookahead_seconds=args.lookahead, top_k=args.top_k,
            pad_start=not args.no_pad_start, device=args.device, bf16=args.bf16,
            trust_remote_code=args.trust_remote_code, channels=channels, event_settings=event_settings,
            label_mapping=args.label_mapping, **text_query_from_arguments(args),
        )
    except ValueError as error:  # bad settings, weights that do not fit, config files that disagree
        print(f"htsat-hf listen: {error}", file=sys.stderr)
        return 2
    rate = detector.sampling_rate
    command = ffmpeg_command(args, rate, channels)
    failure = None
    try:
        for block in ffmpeg_blocks(command, int(READ_SECONDS * rate) * channels,
                                   sys.stdin.buffer if args.stdin else None, frame=channels):
            json_lines(detector.push(block.reshape(-1, channels) if channels > 1 else block), sys.stdout)
    except KeyboardInterrupt:
        pass  # Ctrl-C ends the stream: the open events are closed below
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except AudioInputError as error:  # ffmpeg failed: what was heard so far is still reported
        failure = f"{error} (command: {' '.join(command)})"
    return finish_stream(detector, failure)


def finish_stream(detector, failure: str | None = None) -> int:
    """Flushes the last windows and events; the exit status: 1 with a message on stderr when the source failed
    (`failure`), gave no audio, or too little for one STFT frame, else 0."""
    if detector.seconds_seen == 0:
        print(failure or "htsat-hf listen: no audio was received: the input is empty.", file=sys.stderr)
        return 1
    try:
        json_lines(detector.flush(), sys.stdout)
    except AudioInputError as error:
        print(f"htsat-hf listen: {error}", file=sys.stderr)
        return 1
    if failure:
        print(failure, file=sys.stderr)
        return 1
    print(f"listened to {detector.seconds_seen:.1f} s of audio", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

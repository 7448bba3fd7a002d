"""An offline, labelled keyword-spotting dataset for demos and tests: spoken words synthesised with `espeak-ng`
(many accents, voice variants, speeds and pitches) placed at a random time in coloured background noise.

The held-out split uses voices (accent + variant pairs) that never occur in training, so its accuracy measures
generalisation to new "speakers", not memorisation. The result is an `audiofolder`:
`<root>/{train,test}/<word>/<n>.wav` (16 kHz mono, 16-bit), which `datasets.load_dataset(root)` reads with a `label`
`ClassLabel` (words sorted alphabetically).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2", "klatt3",
    "klatt4", "Alex", "Andy", "Annie", "Denis", "Gene", "Jacky", "Lee", "Mario", "Michael", "Mike", "Storm", "adam",
    "anika", "announcer", "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "grandma",
    "grandpa", "iven", "iven2", "john", "linda", "max", "michel", "norbert", "paul", "quincy", "rob", "robert",
    "shelby", "steph", "steph2", "travis", "victor", "croak", "whisper",
)


@dataclass
class KeywordDataSpec:
    """How much data to make and how hard it is."""

    words: Sequence[str] = KEYWORDS
    train_per_word: int = 100
    test_per_word: int = 30
    clip_seconds: float = 2.0
    sampling_rate: int = 16000
    snr_db: tuple[float, float] = (0.0, 20.0)
    speed_wpm: tuple[int, int] = (110, 220)
    pitch: tuple[int, int] = (15, 90)
    test_voice_fraction: float = 0.25
    seed: int = 0


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize(word: str, voice: str, speed: int, pitch: int) -> tuple[np.ndarray, int]:
    """One spoken word from `espeak-ng` as (float32 samples, sampling rate)."""
    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (e.g. `apt-get install espeak-ng`); it is needed for the demo data.")
    command = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word]
    result = subprocess.run(command, capture_output=True, check=True)
    samples, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    if samples.ndim > 1:
        samples = samples.mean(axis=1)
    return samples, rate


def coloured_noise(length: int, exponent: float, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS noise with a 1/f**exponent power spectrum (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    frequencies = np.fft.rfftfreq(length)
    frequencies[0] = frequencies[1]
    noise = np.fft.irfft(spectrum / frequencies ** (exponent / 2), n=length)
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def trim_silence(samples: np.ndarray, threshold_db: float = -40.0) -> np.ndarray:
    """Cut leading / trailing parts quieter than `threshold_db` below the peak."""
    level = np.abs(samples)
    loud = np.flatnonzero(level > level.max() * 10 ** (threshold_db / 20))
    return samples[loud[0] : loud[-1] + 1] if loud.size else samples


def make_clip(word: str, voice: str, spec: KeywordDataSpec, rng: np.random.Generator) -> np.ndarray:
    """The word in `voice` with a random speed and pitch, at a random time in random coloured noise."""
    speech, rate = synthesize(word, voice, int(rng.integers(*spec.speed_wpm)), int(rng.integers(*spec.pitch)))
    speech = torch.from_numpy(trim_silence(speech))
    speech = torchaudio.functional.resample(speech, rate, spec.sampling_rate).numpy()
    length = int(spec.clip_seconds * spec.sampling_rate)
    speech = speech[:length]
    offset = int(rng.integers(0, length - len(speech) + 1))
    speech_rms = np.sqrt(np.mean(speech**2)) + 1e-9
    snr = rng.uniform(*spec.snr_db)
    noise = coloured_noise(length, rng.choice([0.0, 1.0, 2.0]), rng) * speech_rms / 10 ** (snr / 20)
    clip = noise
    clip[offset : offset + len(speech)] += speech
    return (clip / (np.abs(clip).max() + 1e-9) * rng.uniform(0.1, 0.9)).astype(np.float32)


def split_voices(spec: KeywordDataSpec) -> tuple[list[str], list[str]]:
    """All accent+variant voices, split into (train voices, held-out test voices) by variant."""
    rng = np.random.default_rng(spec.seed)
    variants = list(rng.permutation(VARIANTS))
    held_out = max(1, int(round(len(variants) * spec.test_voice_fraction)))
    test_variants, train_variants = variants[:held_out], variants[held_out:]
    return (
        [f"{a}+{v}" for a in ACCENTS for v in train_variants],
        [f"{a}+{v}" for a in ACCENTS for v in test_variants],
    )


def build_keyword_dataset(root: str | Path, spec: KeywordDataSpec | None = None, workers: int = 4, progress: bool = True) -> Path:
    """Write the audiofolder at `root` (replacing a previous one) and return its path."""
    spec = spec or KeywordDataSpec()
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    train_voices, test_voices = split_voices(spec)
    jobs = []
    for split, voices, count in (("train", train_voices, spec.train_per_word), ("test", test_voices, spec.test_per_word)):
        for w, word in enumerate(spec.words):
            (root / split / word).mkdir(parents=True, exist_ok=True)
            for n in range(count):
                seed = [spec.seed, 0 if split == "train" else 1, w, n]
                jobs.append((root / split / word / f"{n:04d}.wav", word, voices, seed))

    def write(job) -> None:
        path, word, voices, seed = job
        rng = np.random.default_rng(seed)
        clip = make_clip(word, voices[int(rng.integers(len(voices)))], spec, rng)
        sf.write(path, clip, spec.sampling_rate, subtype="PCM_16")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        iterator = pool.map(write, jobs)
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(jobs), desc="Synthesising keywords")
        for _ in iterator:
            pass
    info = {**asdict(spec), "train_voices": len(train_voices), "test_voices": len(test_voices)}
    (root / "demo_info.json").write_text(json.dumps(info, indent=2, default=list))
    return root


# --------------------------------------------------------------------------------------- synthetic sound events
SOUND_CLASSES = ("beep", "chirp", "buzz", "hiss")


def sound_event(kind: str, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic event of `kind` (see SOUND_CLASSES), unit peak, with short fades."""
    t = np.arange(int(seconds * rate)) / rate
    if kind == "beep":  # a tone with a slow tremolo
        wave = np.sin(2 * np.pi * rng.uniform(600, 1500) * t) * (0.75 + 0.25 * np.sin(2 * np.pi * rng.uniform(3, 8) * t))
    elif kind == "chirp":  # a rising sweep
        low, high = rng.uniform(300, 800), rng.uniform(2000, 4000)
        wave = np.sin(2 * np.pi * (low * t + (high - low) * t**2 / (2 * seconds)))
    elif kind == "buzz":  # a low square wave (many harmonics)
        wave = np.sign(np.sin(2 * np.pi * rng.uniform(90, 200) * t)) * 0.5
    elif kind == "hiss":  # band-limited noise
        spectrum = np.fft.rfft(rng.standard_normal(len(t)))
        frequencies = np.fft.rfftfreq(len(t), 1 / rate)
        centre = rng.uniform(2500, 5000)
        spectrum[np.abs(frequencies - centre) > 1000] = 0
        wave = np.fft.irfft(spectrum, n=len(t))
    else:
        raise ValueError(f"unknown sound class {kind!r}; known: {SOUND_CLASSES}")
    fade = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)
    wave = wave * fade
    return (wave / (np.abs(wave).max() + 1e-9)).astype(np.float32)


def sound_event_scene(seconds: float, rate: int, rng: np.random.Generator, classes: Sequence[str] = SOUND_CLASSES,
                      gap: tuple[float, float] = (0.5, 4.0), event_seconds: tuple[float, float] = (0.3, 1.5),
                      snr_db: tuple[float, float] = (5.0, 25.0)) -> tuple[np.ndarray, list[dict]]:
    """`seconds` of coloured noise with events of `classes` at random, non-overlapping times:
    (float32 audio, events [{event_label, onset, offset}])."""
    length = int(seconds * rate)
    audio = coloured_noise(length, float(rng.choice([0.0, 1.0, 2.0])), rng) * 0.01
    events, position = [], float(rng.uniform(0.0, gap[1]))
    while True:
        duration = float(rng.uniform(*event_seconds))
        if position + duration >= seconds:
            break
        kind = str(classes[int(rng.integers(len(classes)))])
        begin = int(position * rate)
        event = sound_event(kind, duration, rate, rng)
        audio[begin : begin + len(event)] += event * 0.01 * np.sqrt(2) * 10 ** (rng.uniform(*snr_db) / 20)
        events.append({"event_label": kind, "onset": position, "offset": position + len(event) / rate})
        position += duration + float(rng.uniform(*gap))
    return (audio / (np.abs(audio).max() + 1e-9) * 0.8).astype(np.float32), events


def build_strong_label_scene_dataset(root: str | Path, clips: tuple[int, int] = (600, 100), clip_seconds: float = 10.0,
                                     rate: int = 16000, seed: int = 0) -> Path:
    """A DESED-style strong-label set of `clip_seconds` scenes, each with events of all SOUND_CLASSES at random,
    non-overlapping times in noise (`sound_event_scene`, the live benchmark's test streams cut short):
    `<root>/audio/{train,eval}/<n>.wav` and `<root>/metadata/{train,eval}.tsv` (filename, onset, offset,
    event_label; a scene without events has one row with empty times and label, as DESED writes it). For
    `htsat-hf train --strong_labels_train`."""
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    (root / "metadata").mkdir(parents=True)
    for s, (split, count) in enumerate(zip(("train", "eval"), clips)):
        (root / "audio" / split).mkdir(parents=True)
        lines = ["filename\tonset\toffset\tevent_label"]
        for n in range(count):
            audio, events = sound_event_scene(clip_seconds, rate, np.random.default_rng([seed, 100 + s, n]))
            name = f"{n:04d}.wav"
            sf.write(root / "audio" / split / name, audio, rate, subtype="PCM_16")
            lines += [f"{name}\t{e['onset']:.3f}\t{e['offset']:.3f}\t{e['event_label']}" for e in events]
            if not events:
                lines.append(f"{name}\t\t\t")
        (root / "metadata" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root

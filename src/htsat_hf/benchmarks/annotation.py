"""Benchmark of corpus annotation on a generated corpus (`htsat-hf benchmark annotation`).

Measured in one run, interleaved (model-only, end to end 1 x 2, model-only, end to end 2 x 1, model-only), with the
paper-size model (random weights: speed does not depend on them; `model_size="tiny"` takes a tiny one instead, to
check the plumbing in seconds):
- model-only throughput: forward passes over ready window features at the run's batch size, expressed as hours of
  audio per hour through the corpus's own windows per second of audio;
- end to end: `htsat-hf annotate` (`python -m htsat_hf.commands.annotate`) as a subprocess (decoding in DataLoader workers, features, model, Parquet), hours
  of audio per hour from its manifest, and peak RSS of its whole process tree once 10 % and 100 % of the inputs are
  committed;
- 2 processes x 1 thread (`accelerate launch`, CPU ranks) against 1 process x 2 threads.

On a GPU (`device="cuda"`, usually with `bf16`): model-only and one end-to-end process on the device, interleaved
(model-only, end to end, model-only, model-only), with the log-mel computed on the device (`--features_on device`);
hours of audio per GPU-hour, and how busy the GPU was (NVML's utilisation, sampled during the run, where
`torch.cuda.utilization` can read it).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..audio_decoding import decode_file
from .model import check_model_size, cpu_model, htsat_config
from ..configuration_htsat import HTSATConfig
from ..feature_extraction_htsat import HTSATFeatureExtractor
from ..modeling_htsat import HTSATForAudioClassification
from ..annotation.store import committed_shards, read_manifest
from ..annotation.windows import count_windows

FORMATS = (("flac", 32000, 1), ("wav", 16000, 2), ("mp3", 44100, 2), ("flac", 48000, 1), ("wav", 22050, 1))


@dataclass
class AnnotationBenchmarkSettings:
    hours: float = 2.0
    batch_size: int = 16
    num_workers: int = 2
    tasks: tuple[str, ...] = ("tags", "events")
    model_rounds: int = 3
    model_batches: int = 18  # forward passes per model-only measurement (about 30 s on 2 cores: 6 moved by 20 %)
    corpus_dir: str | None = None
    seed: int = 0
    device: str = "cpu"
    bf16: bool = False
    single_process: bool | None = None  # only the one-process run on `device` (default: on any device but the CPU)
    model_size: str = "paper"  # "tiny": a tiny HTS-AT, to check the plumbing in seconds (`benchmarks.model.htsat_config`)

    def __post_init__(self) -> None:
        check_model_size(self.model_size)

    @property
    def one_device_run(self) -> bool:
        return self.single_process if self.single_process is not None else self.device != "cpu"


# ------------------------------------------------------------------------------------------------------ corpus
def make_corpus(root: Path, hours: float, seed: int = 0) -> list[Path]:
    """Files of 10 s to 2 min in five formats (rates 16-48 kHz, mono and stereo) adding up to `hours`; reused when
    `root` already holds the same corpus."""
    root.mkdir(parents=True, exist_ok=True)
    listing = root / "corpus.json"
    if listing.exists():
        saved = json.loads(listing.read_text())
        if saved["hours"] == hours and saved["seed"] == seed and all((root / n).exists() for n in saved["files"]):
            return [root / name for name in saved["files"]]
    rng = np.random.default_rng(seed)
    files, total = [], 0.0
    while total < hours * 3600:
        seconds = float(min(rng.uniform(10, 120), hours * 3600 - total + 1.0))
        fmt, rate, channels = FORMATS[len(files) % len(FORMATS)]
        path = root / f"file{len(files):04d}.{fmt}"
        _write(path, seconds, rate, channels, rng)
        files.append(path.name)
        total += seconds
    listing.write_text(json.dumps({"hours": hours, "seed": seed, "files": files}))
    return [root / name for name in files]


def _write(path: Path, seconds: float, rate: int, channels: int, rng: np.random.Generator) -> None:
    import soundfile as sf

    n = int(seconds * rate)
    t = np.arange(n) / rate
    gate = (np.sin(2 * np.pi * t / rng.uniform(2, 6)) > 0.3).astype(np.float32)
    mono = 0.2 * gate * np.sin(2 * np.pi * rng.uniform(200, 4000) * t) + 0.03 * rng.standard_normal(n)
    audio = np.repeat(mono[:, None], channels, axis=1).astype(np.float32)
    if path.suffix == ".mp3":
        wav = path.with_suffix(".wav.tmp")
        sf.write(wav, audio, rate, format="WAV")
        subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "wav", "-i", str(wav), str(path)],
                       check=True)
        wav.unlink()
    else:
        sf.write(path, audio, rate)


def corpus_layout(files: list[Path], config: HTSATConfig, extractor: HTSATFeatureExtractor,
                  tasks: tuple[str, ...]) -> tuple[float, int]:
    """(seconds of audio, windows the annotator runs) of the corpus, from the files' headers (MP3s: decoded)."""
    seconds, windows = 0.0, 0
    for path in files:
        duration = _duration(path, extractor.sampling_rate)
        samples = int(round(duration * extractor.sampling_rate))
        seconds += duration
        windows += count_windows(samples, config, extractor, tasks)
    return seconds, windows


def _duration(path: Path, sampling_rate: int) -> float:
    """A corpus file's duration as the annotator sees it: soundfile's header for WAV and FLAC; for MP3 the length of
    its decoded samples (the header also counts the encoder's padding, about 30 ms here), in process with torchcodec
    or with the ffmpeg command where torchcodec or FFmpeg's libraries are missing (as on a GPU image)."""
    import soundfile as sf

    if path.suffix != ".mp3":
        return sf.info(path).duration
    return sum(len(block) for block in decode_file(str(path), sampling_rate, 1 << 20)) / sampling_rate


# ------------------------------------------------------------------------------------------------ measurements
def model_only_windows_per_second(model: HTSATForAudioClassification, batch_size: int, batches: int,
                                  bf16: bool = False) -> float:
    """Windows per second through the model alone (mel normalisation, folding, Swin, head) on ready features, on the
    model's device (bf16 autocast where asked, the GPU synchronised before the clock stops)."""
    device = next(model.parameters()).device
    features = torch.randn(batch_size, model.config.clip_frames, model.config.num_mel_bins, device=device) * 10 - 40
    htsat = model.htsat
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        model.classifier(htsat.encode_images(htsat.window_images(features)))  # warm-up
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            tokens = htsat.encode_images(htsat.window_images(features))
            model.classifier(tokens)
            tokens.mean(dim=1)
        _synchronize(device)
        return batches * batch_size / (time.perf_counter() - start)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuBusy:
    """How busy a GPU is while a run goes on: NVML's utilisation (% of time a kernel was running), sampled every
    `interval` s by `torch.cuda.utilization`; `stop()` returns their mean, or None where NVML could not be read
    (then `error` says why)."""

    def __init__(self, device: str, interval: float = 0.5):
        self.samples: list[float] = []
        self.error: str | None = None
        self.device = torch.device(device)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    def _poll(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(float(torch.cuda.utilization(self.device)))
            except Exception as error:  # noqa: BLE001 - pynvml missing, or no NVML: reported, not fatal
                self.error = f"{type(error).__name__}: {error}"
                return
            self._stop.wait(interval)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return statistics.mean(self.samples) if self.samples else None


class TreePeakMemory:
    """Peak memory of a process and all of its descendants (decoding workers, ffmpeg), from the kernel's high-water
    marks (`VmHWM` in /proc/<pid>/status: each process's exact peak RSS, kept by the kernel, read in microseconds),
    polled every `interval` s so that the marks of processes that exit are kept too.

    `total()` sums the processes' peaks: an upper bound, since peaks at different moments add up and pages a forked
    worker shares with its parent count in both. `largest()` is the biggest single process (the model process).
    An earlier version summed PSS every 0.5 s instead; reading PSS walks a process's page tables (23 ms for a
    1.2-GiB process here) and that cost 6-9 % of the measured 1 x 2 throughput on 2 cores, even at the lowest
    priority (0.85 of model-only against 0.90-0.97 unsampled, interleaved)."""

    def __init__(self, pid: int, interval: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.interval = interval
        self.peaks: dict[int, int] = {}  # pid -> bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def total(self) -> int:
        return sum(self.peaks.values())

    def largest(self) -> int:
        return max(self.peaks.values(), default=0)

    def _poll(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                processes = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                processes = []
            for process in processes:
                peak = high_water_mark(process.pid)
                if peak is not None:
                    self.peaks[process.pid] = max(peak, self.peaks.get(process.pid, 0))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def high_water_mark(pid: int) -> int | None:
    """The process's peak resident set size in bytes (Linux `VmHWM`), or None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def end_to_end(command: list[str], out: Path, total_inputs: int, env: dict[str, str]) -> dict[str, Any]:
    """Runs one annotation command; hours of audio per hour from its manifest, and the process tree's peak memory
    (`TreePeakMemory`) once 10 % and 100 % of the inputs are committed."""
    if high_water_mark(os.getpid()) is None:
        raise RuntimeError("The annotation benchmark reads peak memory from /proc/<pid>/status: run it on Linux.")
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    memory = TreePeakMemory(process.pid)
    at_10 = None
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        if at_10 is None and _committed_inputs(out) >= 0.1 * total_inputs:
            at_10 = (memory.total(), memory.largest())
        time.sleep(0.2)
    memory.stop()
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed:\n{''.join(output)[-4000:]}")
    run = read_manifest(out)["runs"][-1]
    at_10 = at_10 or (memory.total(), memory.largest())
    return {
        "audio_hours_per_hour": run["audio_hours_per_hour"], "wall_time_s": run["wall_time_s"],
        "audio_hours": run["audio_hours"],
        "peak_rss_mib_at_10_percent": at_10[0] / 2**20, "peak_rss_mib_at_100_percent": memory.total() / 2**20,
        "largest_process_peak_rss_mib_at_10_percent": at_10[1] / 2**20,
        "largest_process_peak_rss_mib_at_100_percent": memory.largest() / 2**20,
        "summary": output[-1].strip() if output else "",
    }


def _committed_inputs(out: Path) -> int:
    try:
        return sum(marker["rows"] + marker["errors"] for marker in committed_shards(out).values())
    except (OSError, ValueError):  # a marker being renamed into place
        return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_annotation_benchmark(settings: AnnotationBenchmarkSettings) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="htsat-annotation-bench-"))
    corpus_dir = Path(settings.corpus_dir) if settings.corpus_dir else work / "corpus"
    print(f"[bench] generating {settings.hours} h of audio in {corpus_dir}", flush=True)
    files = make_corpus(corpus_dir, settings.hours, settings.seed)
    (work / "files.txt").write_text("\n".join(str(p) for p in files) + "\n")
    config, extractor = htsat_config(settings.model_size), HTSATFeatureExtractor()
    torch.manual_seed(0)
    model = HTSATForAudioClassification(config).eval()
    model.save_pretrained(work / "model")
    extractor.save_pretrained(work / "model")
    seconds, windows = corpus_layout(files, config, extractor, settings.tasks)
    print(f"[bench] {len(files)} files, {seconds / 3600:.2f} h, {windows} windows; CPU: {cpu_model()}", flush=True)

    def model_only() -> float:
        if settings.device == "cpu":
            torch.set_num_threads(2)
        rate = model_only_windows_per_second(model, settings.batch_size, settings.model_batches, settings.bf16)
        hours_per_hour = rate * seconds / windows
        print(f"[bench] model only: {rate:.2f} windows/s = {hours_per_hour:.0f} h audio/h", flush=True)
        return hours_per_hour

    base = [
        "-m", "htsat_hf.commands.annotate", "--model_name_or_path", str(work / "model"), "--file_list",
        str(work / "files.txt"), "--tasks", *settings.tasks, "--batch_size", str(settings.batch_size),
        "--num_workers", str(settings.num_workers), "--no_progress", "--rows_per_shard", "2", "--overwrite",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if settings.one_device_run:
        model.to(settings.device)
        return _one_device_run(settings, base, work, files, env, model_only, dict(
            settings=asdict(settings), cpu=cpu_model(), torch=torch.__version__, files=len(files),
            audio_hours=seconds / 3600, windows=windows,
            gpu=torch.cuda.get_device_name(settings.device) if settings.device.startswith("cuda") else None))
    accelerate = Path(sys.executable).with_name("accelerate")
    results: dict[str, Any] = {"model_only_audio_hours_per_hour": []}
    results["model_only_audio_hours_per_hour"].append(model_only())
    print("[bench] end to end, 1 process x 2 threads", flush=True)
    single = end_to_end([sys.executable, *base, "--output_dir", str(work / "out1"), "--device", "cpu"],
                        work / "out1", len(files), dict(env, OMP_NUM_THREADS="2"))
    print(f"[bench]   {single['summary']}", flush=True)
    results["model_only_audio_hours_per_hour"].append(model_only())
    print("[bench] end to end, 2 processes x 1 thread (accelerate launch)", flush=True)
    double = end_to_end(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), *base,
         "--output_dir", str(work / "out2")],
        work / "out2", len(files), dict(env, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true"),
    )
    print(f"[bench]   {double['summary']}", flush=True)
    results["model_only_audio_hours_per_hour"].append(model_only())
    model_rate = statistics.median(results["model_only_audio_hours_per_hour"])
    results.update(
        settings=asdict(settings), cpu=cpu_model(), torch=torch.__version__, files=len(files),
        audio_hours=seconds / 3600, windows=windows, one_process_two_threads=single, two_processes_one_thread=double,
        end_to_end_share_of_model_only=single["audio_hours_per_hour"] / model_rate,
        two_process_share_of_model_only=double["audio_hours_per_hour"] / model_rate,
        memory_growth_10_to_100_percent=max(
            single["peak_rss_mib_at_100_percent"] / single["peak_rss_mib_at_10_percent"] - 1,
            single["largest_process_peak_rss_mib_at_100_percent"] / single["largest_process_peak_rss_mib_at_10_percent"]
            - 1,
        ),
        two_by_one_over_one_by_two=double["audio_hours_per_hour"] / single["audio_hours_per_hour"],
    )
    return results


def _one_device_run(settings: AnnotationBenchmarkSettings, base: list[str], work: Path, files: list[Path],
                    env: dict[str, str], model_only, results: dict[str, Any]) -> dict[str, Any]:
    """Model-only, one end-to-end process on `settings.device` (features on the device), model-only, model-only."""
    command = [sys.executable, *base, "--output_dir", str(work / "out1"), "--device", settings.device,
               "--features_on", "device", *(["--bf16"] if settings.bf16 else [])]
    rates = [model_only()]
    print(f"[bench] end to end, 1 process on {settings.device}" + (" (bf16)" if settings.bf16 else ""), flush=True)
    busy = GpuBusy(settings.device) if settings.device.startswith("cuda") else None
    run = end_to_end(command, work / "out1", len(files), env)
    results["gpu_utilization_percent"] = busy.stop() if busy else None
    results["gpu_utilization_error"] = busy.error if busy else None
    print(f"[bench]   {run['summary']}", flush=True)
    rates += [model_only(), model_only()]
    model_rate = statistics.median(rates)
    results.update(model_only_audio_hours_per_hour=rates, one_process_on_device=run,
                   end_to_end_share_of_model_only=run["audio_hours_per_hour"] / model_rate,
                   memory_growth_10_to_100_percent=run["peak_rss_mib_at_100_percent"]
                   / run["peak_rss_mib_at_10_percent"] - 1)
    return results


def format_report(results: dict[str, Any]) -> str:
    if "one_process_on_device" in results:
        return _format_device_report(results)
    single, double = results["one_process_two_threads"], results["two_processes_one_thread"]
    model = statistics.median(results["model_only_audio_hours_per_hour"])
    lines = [
        f"CPU: {results['cpu']}; torch {results['torch']}; {results['files']} files, {results['audio_hours']:.2f} h, "
        f"{results['windows']} windows; batch {results['settings']['batch_size']} windows, "
        f"{results['settings']['num_workers']} decoding worker(s) per process",
        "",
        "| | hours of audio per hour | wall s | peak RSS at 10 % / 100 %, MiB: sum of the processes (largest one) |",
        "| --- | --- | --- | --- |",
        "| model only (2 threads), median of " + ", ".join(f"{v:.0f}" for v in results["model_only_audio_hours_per_hour"])
        + f" | {model:.0f} | | |",
    ]
    for name, run in (("end to end, 1 process x 2 threads", single), ("end to end, 2 processes x 1 thread", double)):
        lines.append(
            f"| {name} | {run['audio_hours_per_hour']:.0f} | {run['wall_time_s']:.0f} | "
            f"{run['peak_rss_mib_at_10_percent']:.0f} ({run['largest_process_peak_rss_mib_at_10_percent']:.0f}) / "
            f"{run['peak_rss_mib_at_100_percent']:.0f} ({run['largest_process_peak_rss_mib_at_100_percent']:.0f}) |"
        )
    targets = [
        ("end to end (1 x 2) >= 85 % of model only", results["end_to_end_share_of_model_only"], 0.85, True),
        ("end to end (2 x 1) >= 85 % of model only", results["two_process_share_of_model_only"], 0.85, True),
        ("peak RSS at 100 % within 10 % of that at 10 % (sum and largest process)",
         results["memory_growth_10_to_100_percent"], 0.10, False),
        ("2 x 1 >= 0.9 x (1 x 2)", results["two_by_one_over_one_by_two"], 0.9, True),
    ]
    lines.append("")
    for name, value, goal, higher in targets:
        met = value >= goal if higher else value <= goal
        lines.append(f"{'PASS' if met else 'FAIL'}  {name}: {value:.3f} (target {'>=' if higher else '<='} {goal})")
    return "\n".join(lines)


def _format_device_report(results: dict[str, Any]) -> str:
    settings, run = results["settings"], results["one_process_on_device"]
    model = statistics.median(results["model_only_audio_hours_per_hour"])
    busy = results["gpu_utilization_percent"]
    busy_text = (f"{busy:.0f} % (NVML, mean over the run)" if busy is not None else
                 f"not read ({results['gpu_utilization_error'] or 'not a GPU'})")
    device = settings["device"] + (f" ({results['gpu']})" if results.get("gpu") else "")
    rounds = ", ".join(f"{v:.0f}" for v in results["model_only_audio_hours_per_hour"])
    memory = (f"{run['peak_rss_mib_at_10_percent']:.0f} ({run['largest_process_peak_rss_mib_at_10_percent']:.0f}) / "
              f"{run['peak_rss_mib_at_100_percent']:.0f} ({run['largest_process_peak_rss_mib_at_100_percent']:.0f})")
    lines = [
        (f"Device: {device}; CPU: {results['cpu']}; torch {results['torch']}; {results['files']} files, "
         f"{results['audio_hours']:.2f} h, {results['windows']} windows; batch {settings['batch_size']} windows, "
         f"{settings['num_workers']} decoding worker(s), features on the device"
         f"{', bf16 autocast' if settings['bf16'] else ''}"),
        "",
        "| | hours of audio per hour (per device-hour) | wall s | peak RSS at 10 % / 100 %, MiB (largest) |",
        "| --- | --- | --- | --- |",
        f"| model only, median of {rounds} | {model:.0f} | | |",
        f"| end to end, 1 process | {run['audio_hours_per_hour']:.0f} | {run['wall_time_s']:.0f} | {memory} |",
        "",
        (f"end to end / model only: {results['end_to_end_share_of_model_only']:.3f}; device busy: {busy_text}; "
         f"memory growth 10 % -> 100 %: {results['memory_growth_10_to_100_percent']:.3f}"),
    ]
    return "\n".join(lines)


__all__ = ["AnnotationBenchmarkSettings", "GpuBusy", "format_report", "make_corpus", "run_annotation_benchmark"]

"""Loading audio classification data through `datasets` for HTS-AT training.

Sources (`load_splits`):
- a Hub dataset id (`dataset_name`, `dataset_config_name`; `streaming=True` for sets too large to download);
- a local folder: an `audiofolder` (class sub-folders or `metadata.csv`), any folder `load_dataset` understands,
  the raw ESC-50 layout (`meta/esc50.csv` + `audio/`) or the raw Speech Commands layout (word folders +
  `validation_list.txt` / `testing_list.txt`);
- CSV / JSON(L) manifests (`train_file`, `eval_file`) with an audio path column (relative paths are resolved
  against the manifest's folder) and a label column.

Labels (`build_label_space`): `ClassLabel` ints, strings, lists of strings (AudioSet MIDs or names, mapped with an
AudioSet `index,mid,display_name` CSV), comma-joined strings (FSD50K), or plain ints (ESC-50's `target`, named by its
`category` column). Folds (`fold` column) select train / eval rows for cross-validation.

Audio is decoded and resampled by `datasets` (`Audio(sampling_rate=fe.sampling_rate)`, every channel) when a batch
is read, and the channels are averaged as the pipelines average them (`audio_decoding.downmix`, not FFmpeg's -ac 1
matrix); mono WAV / FLAC files already at the model's rate are read by libsndfile instead (`read_native_mono`): the
same samples, without FFmpeg's per-file decoder set-up (the up-front audio check uses the same path). Training clips
longer than `max_length_seconds` are randomly cropped to it; shorter ones are repeated to it by the feature extractor. Evaluation clips are cropped centrally to `max_length_seconds` by default
(`eval_crop="center"`, so batches stack); `eval_crop="none"` keeps them whole (the model then averages over
overlapping windows), which needs a batch size of 1 when clip lengths differ.

Bad data (`validate_split`): an unreadable / missing audio file, a missing or unknown label, or an empty split
raises `BadExampleError` naming the row and file; with `skip_bad_examples=True` the rows are dropped and counted.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import soundfile
import torch
from datasets import Audio, ClassLabel, Dataset, IterableDataset, load_dataset
from tqdm.auto import tqdm

from ..audio_decoding import downmix
from .labels import LabelError, LabelSpace, infer_names, looks_multi_label, read_label_csv

logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aiff", ".aif")
AUTO_CHECK_AUDIO_MAX_ROWS = 20_000


class BadExampleError(ValueError):
    """An example that cannot be used: unreadable audio, missing / unknown label, or an empty split."""


@dataclass
class SplitReport:
    """What `validate_split` found: rows kept, and (row, file, reason) of the rows skipped. `name` is for messages;
    `split` is the split the rows belong to ("train" or "eval")."""

    name: str
    kept: int
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    split: str | None = None

    def __post_init__(self) -> None:
        if self.split is None:
            self.split = self.name


# --------------------------------------------------------------------------------------------------- loading
def _is_esc50_folder(path: Path) -> bool:
    return (path / "meta" / "esc50.csv").exists() and (path / "audio").is_dir()


def _is_speech_commands_folder(path: Path) -> bool:
    return (path / "validation_list.txt").exists() and (path / "testing_list.txt").exists()


def load_esc50_folder(root: str | Path) -> datasets.DatasetDict:
    """The raw ESC-50 release (`meta/esc50.csv`, `audio/*.wav`) as one `train` split with `fold`, `target`
    (a `ClassLabel` named by `category`), `category`, `esc10` columns; evaluate by fold."""
    root = Path(root)
    with (root / "meta" / "esc50.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    names: dict[int, str] = {int(r["target"]): r["category"] for r in rows}
    class_names = [names[i] for i in range(len(names))]
    table = {
        "audio": [str(root / "audio" / r["filename"]) for r in rows],
        "fold": [int(r["fold"]) for r in rows],
        "target": [int(r["target"]) for r in rows],
        "category": [r["category"] for r in rows],
        "esc10": [r.get("esc10", "False") == "True" for r in rows],
    }
    features = datasets.Features(
        {
            "audio": Audio(decode=False),
            "fold": datasets.Value("int64"),
            "target": ClassLabel(names=class_names),
            "category": datasets.Value("string"),
            "esc10": datasets.Value("bool"),
        }
    )
    return datasets.DatasetDict({"train": Dataset.from_dict(table, features=features)})


def load_speech_commands_folder(root: str | Path) -> datasets.DatasetDict:
    """The raw Speech Commands release (one folder per word, `validation_list.txt`, `testing_list.txt`) as
    `train` / `validation` / `test` splits with a `label` `ClassLabel` (words sorted) and `speaker_id`.
    `_background_noise_` is left out."""
    root = Path(root)
    words = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    listed = {
        name: {line.strip() for line in (root / f"{name}_list.txt").read_text().splitlines() if line.strip()}
        for name in ("validation", "testing")
    }
    splits: dict[str, dict[str, list]] = {s: {"audio": [], "label": [], "speaker_id": []} for s in ("train", "validation", "test")}
    for word in words:
        for wav in sorted((root / word).glob("*.wav")):
            relative = f"{word}/{wav.name}"
            split = "validation" if relative in listed["validation"] else "test" if relative in listed["testing"] else "train"
            splits[split]["audio"].append(str(wav))
            splits[split]["label"].append(word)
            splits[split]["speaker_id"].append(wav.name.split("_nohash_")[0])
    features = datasets.Features(
        {"audio": Audio(decode=False), "label": ClassLabel(names=words), "speaker_id": datasets.Value("string")}
    )
    return datasets.DatasetDict({s: Dataset.from_dict(t, features=features) for s, t in splits.items() if t["audio"]})


def check_manifest_has_rows(path: str, split: str) -> None:
    """A manifest with no data rows (empty, or a CSV header only) is an error naming the split and the file, instead
    of a `datasets` traceback ("Instruction 'eval' corresponds to no data")."""
    with open(path, encoding="utf-8") as handle:
        lines = [line for line in handle if line.strip()]
    tabular = Path(path).suffix.lower() in (".csv", ".tsv")
    if len(lines) <= (1 if tabular else 0):
        what = "only a header" if lines else "nothing"
        flag = "--train_file" if split == "train" else "--eval_file"
        raise BadExampleError(
            f"The {split} manifest {path} holds {what}: no examples. Add rows (one audio file each) or leave out {flag}."
        )


def load_manifests(
    train_file: str | None, eval_file: str | None, audio_column: str, streaming: bool = False
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """CSV / JSON(L) manifests -> splits `train` / `eval`, audio paths resolved against each manifest's folder."""
    files = {name: path for name, path in (("train", train_file), ("eval", eval_file)) if path}
    suffixes = {Path(p).suffix.lower() for p in files.values()}
    if not suffixes <= {".csv", ".json", ".jsonl", ".tsv"} or len(suffixes) != 1:
        raise ValueError(f"Manifests must all be .csv, .tsv or .json/.jsonl files, got {sorted(files.values())}.")
    suffix = suffixes.pop()
    builder = "csv" if suffix in (".csv", ".tsv") else "json"
    kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
    for name, path in files.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"Manifest {path} does not exist.")
        check_manifest_has_rows(path, name)
    try:
        raw = load_dataset(builder, data_files=files, streaming=streaming, **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as error:
        cause = error.__cause__ or error
        raise BadExampleError(
            f"Could not read the manifests {files}: {type(cause).__name__}: {str(cause).splitlines()[0][:300]}"
        ) from error
    resolved = {}
    for name, split in raw.items():
        base = Path(files[name]).resolve().parent
        columns = split.column_names if split.column_names is not None else list(split.features or {})
        if audio_column not in columns:
            raise ValueError(
                f"Manifest {files[name]} has no audio column {audio_column!r} (columns: {columns}); pass "
                "--audio_column_name."
            )

        def absolute(batch: dict[str, list], base: Path = base) -> dict[str, list]:
            batch[audio_column] = [
                p if p is None or os.path.isabs(p) or "://" in p else str(base / p) for p in batch[audio_column]
            ]
            return batch

        split = split.map(absolute, batched=True)
        if split.features is not None and split.features[audio_column] != datasets.Value("string"):
            split = split.cast_column(audio_column, datasets.Value("string"))  # CSV gives large_string
        resolved[name] = split.cast_column(audio_column, Audio(decode=False))
    return type(raw)(resolved)


def is_saved_to_disk(folder: Path) -> bool:
    """A folder `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote (read with `datasets.load_from_disk`, which
    `load_dataset` refuses to read)."""
    return (folder / datasets.config.DATASETDICT_JSON_FILENAME).is_file() or (
        (folder / datasets.config.DATASET_STATE_JSON_FILENAME).is_file()
        and (folder / datasets.config.DATASET_INFO_FILENAME).is_file()
    )


def load_source(
    dataset_name: str | None,
    dataset_config_name: str | None = None,
    train_file: str | None = None,
    eval_file: str | None = None,
    audio_column: str = "audio",
    streaming: bool = False,
    cache_dir: str | None = None,
    token: str | None = None,
) -> datasets.DatasetDict | datasets.IterableDatasetDict:
    """All splits of the data source, the audio column cast to `Audio(decode=False)` (decoded later). A local folder
    may be one `save_to_disk` wrote (a lone `Dataset` is the split "train")."""
    if train_file or eval_file:
        return load_manifests(train_file, eval_file, audio_column, streaming)
    if not dataset_name:
        raise ValueError("Give --dataset_name (a Hub id or a local folder) or --train_file / --eval_file manifests.")
    local = Path(dataset_name)
    if local.is_dir() and is_saved_to_disk(local):
        if dataset_config_name:
            raise ValueError(f"--dataset_config_name {dataset_config_name}: {dataset_name} is a folder save_to_disk "
                             "wrote, which has no configurations; leave it out.")
        raw = datasets.load_from_disk(str(local))
        if isinstance(raw, datasets.Dataset):  # one split saved on its own: datasets' name for a lone split
            raw = datasets.DatasetDict({"train": raw})
    elif local.is_dir() and _is_esc50_folder(local):
        raw = load_esc50_folder(local)
    elif local.is_dir() and _is_speech_commands_folder(local):
        raw = load_speech_commands_folder(local)
    else:
        if not local.exists() and dataset_name.startswith(("/", "./", "../", "~")):
            raise FileNotFoundError(f"--dataset_name {dataset_name} looks like a local path but does not exist.")
        raw = load_dataset(dataset_name, dataset_config_name, streaming=streaming, cache_dir=cache_dir, token=token)
    if streaming and isinstance(raw, datasets.DatasetDict):
        raw = datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in raw.items()})
    out = {}
    for name, split in raw.items():
        features = split.features
        if features is not None and audio_column not in features:
            raise ValueError(
                f"Split {name!r} of {dataset_name} has no audio column {audio_column!r} (columns: {list(features)}); "
                "pass --audio_column_name."
            )
        out[name] = split.cast_column(audio_column, Audio(decode=False))
    return type(raw)(out)


def select_splits(
    raw: datasets.DatasetDict | datasets.IterableDatasetDict,
    train_split: str = "train",
    eval_split: str | None = "validation",
    fold_column: str = "fold",
    eval_fold: Any = None,
    validation_split_fraction: float | None = None,
    seed: int = 42,
) -> tuple[Dataset | IterableDataset, Dataset | IterableDataset | None]:
    """
    (train, eval) splits. With `eval_fold`, both come from `train_split`: rows whose `fold_column` equals `eval_fold`
    are the eval set, the rest train. Manifest sources name their splits `train` / `eval`. Without an eval split,
    `validation_split_fraction` holds out that fraction of the training rows (stratification is not attempted).
    """
    available = list(raw.keys())
    if train_split not in raw:
        alias = "train" if "train" in raw else None
        if alias is None:
            raise BadExampleError(f"No training split {train_split!r}; available splits: {available}.")
        train_split = alias
    train = raw[train_split]
    if eval_fold is not None:
        columns = train.column_names or []
        if fold_column not in columns:
            raise ValueError(f"--eval_fold needs a {fold_column!r} column; columns: {columns}.")
        if isinstance(train, IterableDataset):
            raise ValueError("Fold selection needs a non-streaming dataset.")
        folds = train[fold_column]
        target = type(folds[0])(eval_fold) if folds else eval_fold
        eval_rows = [i for i, f in enumerate(folds) if f == target]
        if not eval_rows:
            raise BadExampleError(f"Fold {eval_fold!r} has no rows; folds present: {sorted(set(folds))}.")
        train_rows = [i for i, f in enumerate(folds) if f != target]
        return train.select(train_rows), train.select(eval_rows)
    if eval_split and eval_split in raw:
        return train, raw[eval_split]
    if "eval" in raw and (eval_split in (None, "validation")):
        return train, raw["eval"]
    if validation_split_fraction:
        if isinstance(train, IterableDataset):
            raise ValueError("--validation_split_fraction needs a non-streaming dataset; name an eval split instead.")
        parts = train.train_test_split(test_size=validation_split_fraction, seed=seed)
        return parts["train"], parts["test"]
    if eval_split:
        raise BadExampleError(
            f"No evaluation split {eval_split!r}; available splits: {available}. Pass --eval_split_name, --eval_fold "
            "or --validation_split_fraction, or --do_eval False."
        )
    return train, None


def fold_values(dataset: Dataset, fold_column: str = "fold") -> list[Any]:
    """Sorted distinct values of the fold column (for cross-validation)."""
    if fold_column not in dataset.column_names:
        raise ValueError(f"Cross-validation needs a {fold_column!r} column; columns: {dataset.column_names}.")
    return sorted(set(dataset[fold_column]))


# ---------------------------------------------------------------------------------------------------- labels
def build_label_space(
    train: Dataset | IterableDataset,
    label_column: str,
    label_csv: str | None = None,
    label_names: Sequence[str] | None = None,
    multi_label: bool | None = None,
    separator: str = ",",
    names_column: str | None = "auto",
) -> LabelSpace:
    """
    The classes, from (first match): `label_csv`; `label_names`; a `ClassLabel` / list-of-`ClassLabel` feature; a
    `names_column` pairing integer labels with names (auto: ESC-50's `target` + `category`); else the distinct
    values of the training split. `multi_label=None` detects it: list columns, or comma-joined strings.
    """
    features = train.features or {}
    if label_column not in features:
        raise ValueError(
            f"No label column {label_column!r}; columns: {list(features)}. Pass --label_column_name "
            "(e.g. 'label', 'labels', 'target', 'category')."
        )
    feature = features[label_column]
    inner = getattr(feature, "feature", None)
    is_list_feature = isinstance(feature, (datasets.Sequence, datasets.List)) or inner is not None
    streaming = isinstance(train, IterableDataset)
    cells: list[Any] | None = None
    if not streaming:
        cells = train[label_column]
    elif multi_label is None and not is_list_feature:
        cells = [row[label_column] for row in train.select_columns([label_column]).take(1000)]

    aliases: dict[str, int] = {}
    if label_csv:
        names, aliases = read_label_csv(label_csv)
    elif label_names:
        names = list(label_names)
    elif isinstance(feature, ClassLabel):
        names = list(feature.names)
    elif isinstance(inner, ClassLabel):
        names = list(inner.names)
    else:
        names = []
    if multi_label is None:
        multi_label = is_list_feature or (cells is not None and looks_multi_label(cells, separator, names))
    if not names and names_column == "auto":
        names_column = "category" if label_column == "target" and "category" in features else None
    if not names and names_column:
        if streaming:
            raise ValueError("names_column needs a non-streaming dataset; pass --label_names or --label_csv instead.")
        pairs = dict(zip(train[label_column], train[names_column]))
        if not all(isinstance(k, (int, np.integer)) for k in pairs):
            raise ValueError(f"names_column={names_column!r} needs integer labels in {label_column!r}.")
        missing = [i for i in range(max(pairs) + 1) if i not in pairs]
        if missing:
            raise ValueError(f"Classes {missing[:10]} of {label_column!r} never occur, so {names_column!r} cannot name them.")
        names = [str(pairs[i]) for i in range(max(pairs) + 1)]
    if not names:
        if streaming:
            raise ValueError(
                f"Cannot list the classes of the streamed column {label_column!r} without reading it all: pass "
                "--label_names or --label_csv."
            )
        names = infer_names(cells or [], multi_label, separator)
        if not names:
            raise BadExampleError(f"The training split has no labels in column {label_column!r}.")
    return LabelSpace(names=names, multi_label=bool(multi_label), separator=separator, aliases=aliases)


# ------------------------------------------------------------------------------------------------ validation
def audio_locations(dataset: Dataset, audio_column: str) -> list[tuple[str | None, bool]]:
    """(path, has_bytes) of every row, read from the Arrow table without loading the audio."""
    column = dataset.with_format("arrow")[audio_column]
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    paths = column.field("path").to_pylist()
    has_bytes = column.field("bytes").is_valid().to_pylist()
    return list(zip(paths, has_bytes))


def check_decodes(cell: dict[str, Any]) -> None:
    """Decode one `Audio(decode=False)` cell fully, at its own rate, as training will (raises when unreadable or empty)."""
    samples = read_native_mono(cell, None)
    if samples is None:
        samples = Audio().decode_example(cell)["array"]
    if samples.size == 0:
        raise ValueError("no audio samples")
    if not np.isfinite(samples).all():
        raise ValueError("NaN or Inf samples")


def validate_split(
    dataset: Dataset,
    name: str,
    audio_column: str,
    label_column: str | None,
    labels: LabelSpace | None,
    check_audio: bool | None = None,
    skip_bad_examples: bool = False,
) -> tuple[Dataset, SplitReport]:
    """
    Check every row of a (non-streaming) split: the label is present and known, the audio file exists and (with
    `check_audio`; default: splits of at most 20,000 rows) decodes. Raises `BadExampleError` naming the first bad row
    and its file, or with `skip_bad_examples` drops the bad rows and reports them.
    """
    if len(dataset) == 0:
        raise BadExampleError(f"The {name} split is empty.")
    locations = audio_locations(dataset, audio_column)
    label_cells = dataset[label_column] if label_column and labels is not None else None
    if check_audio is None:
        check_audio = len(dataset) <= AUTO_CHECK_AUDIO_MAX_ROWS
    skipped: list[tuple[int, str, str]] = []
    audio_only = dataset.select_columns([audio_column]) if check_audio else None
    rows = range(len(dataset))
    if check_audio:
        rows = tqdm(rows, desc=f"Checking {name} audio", leave=False, disable=len(dataset) < 500)
    for row in rows:
        path, has_bytes = locations[row]
        file = path or "<embedded audio>"
        reason = None
        if label_cells is not None:
            try:
                labels.encode(label_cells[row])
            except LabelError as error:
                reason = str(error)
        if reason is None and not has_bytes:
            if not path:
                reason = "no audio path"
            elif "://" not in path and not os.path.exists(path):
                reason = "audio file not found"
        if reason is None and check_audio:
            try:
                check_decodes(audio_only[row][audio_column])
            except Exception as error:  # noqa: BLE001 - any decoder failure means the file is unusable
                reason = f"unreadable audio ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
        if reason is not None:
            if not skip_bad_examples:
                raise BadExampleError(
                    f"{name} split, row {row} ({file}): {reason}. Fix or remove it, or pass --skip_bad_examples."
                )
            skipped.append((row, file, reason))
    if skipped:
        bad = {row for row, _, _ in skipped}
        dataset = dataset.select([i for i in range(len(dataset)) if i not in bad])
        logger.warning(
            f"Skipped {len(skipped)} bad example(s) of the {name} split, e.g. row {skipped[0][0]} ({skipped[0][1]}): "
            f"{skipped[0][2]}."
        )
    if len(dataset) == 0:
        raise BadExampleError(f"The {name} split is empty after skipping {len(skipped)} bad example(s).")
    return dataset, SplitReport(name=name, kept=len(dataset), skipped=skipped)


# ------------------------------------------------------------------------------------------------ transforms
def random_crop_start(num_samples: int, length: int, rng: np.random.Generator | None = None) -> int:
    """Start sample of a random `length`-sample window of a clip of `num_samples` (0 when it is not longer)."""
    if num_samples <= length:
        return 0
    high = num_samples - length + 1
    return int(rng.integers(0, high)) if rng is not None else int(np.random.randint(0, high))


def center_crop_start(num_samples: int, length: int) -> int:
    """Start sample of the central `length`-sample window of a clip of `num_samples` (0 when it is not longer)."""
    return max(0, (num_samples - length) // 2)


def random_crop(waveform: np.ndarray, length: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """One random `length`-sample window of a longer clip (shorter clips are returned unchanged)."""
    start = random_crop_start(len(waveform), length, rng)
    return waveform[start : start + length]


def center_crop(waveform: np.ndarray, length: int) -> np.ndarray:
    """The central `length` samples of a longer clip (shorter clips are returned unchanged)."""
    start = center_crop_start(len(waveform), length)
    return waveform[start : start + length]


NATIVE_FORMATS = ("WAV", "WAVEX", "FLAC")


def read_native_mono(cell: dict[str, Any] | None, sampling_rate: int | None) -> np.ndarray | None:
    """float32 samples of a mono WAV / FLAC cell (`{"path", "bytes"}`) already at `sampling_rate` (None: at any rate),
    read by libsndfile, or None when the file needs FFmpeg (another rate, several channels, another format, unreadable).

    They equal what `datasets.Audio(sampling_rate)` decodes (integer PCM / 32768, floats as stored),
    at about 0.2 ms instead of 5-12 ms per 2-s file: FFmpeg sets up a decoder per file, which dominated the training
    step of a small model. Other files, and every error message, stay with `datasets`."""
    if not cell:
        return None
    if cell.get("bytes") is not None:
        source: Any = io.BytesIO(cell["bytes"])
    elif cell.get("path") and os.path.isfile(cell["path"]):
        source = cell["path"]
    else:
        return None
    try:
        with soundfile.SoundFile(source) as audio:
            other_rate = sampling_rate is not None and audio.samplerate != sampling_rate
            if audio.format not in NATIVE_FORMATS or audio.channels != 1 or other_rate:
                return None
            return audio.read(dtype="float32")
    except (soundfile.LibsndfileError, RuntimeError, ValueError):
        return None


class AudioTransform:
    """
    Batch transform for `Dataset.set_transform` / `IterableDataset.map(batched=True)`: decodes and resamples the audio
    with `datasets`, crops it (random in training, central or none in evaluation), computes `input_features` with
    the feature extractor, and encodes the labels. With `skip_bad_examples` (streaming only) unreadable rows are
    dropped and counted in `self.skipped`; otherwise they raise naming the file.

    Subclasses add targets that depend on the crop by overriding `targets` (see `strong_labels.StrongLabelTransform`).
    """

    def __init__(
        self,
        feature_extractor: Any,
        labels: LabelSpace | None,
        audio_column: str = "audio",
        label_column: str | None = "label",
        train: bool = True,
        max_length_seconds: float | None = None,
        eval_crop: str = "center",
        skip_bad_examples: bool = False,
    ) -> None:
        if eval_crop not in ("center", "none"):
            raise ValueError(f"eval_crop must be 'center' or 'none', got {eval_crop!r}.")
        self.feature_extractor = feature_extractor
        self.labels = labels
        self.audio_column = audio_column
        self.label_column = label_column
        self.train = train
        seconds = max_length_seconds or feature_extractor.max_length_seconds
        self.max_samples = int(round(seconds * feature_extractor.sampling_rate))
        self.eval_crop = eval_crop
        self.skip_bad_examples = skip_bad_examples
        self.skipped = 0
        self.decoder = Audio(sampling_rate=feature_extractor.sampling_rate)  # every channel: averaged in `decode`
        self.input_name = feature_extractor.model_input_names[0]

    @property
    def target_names(self) -> list[str]:
        """The target columns this transform adds next to the input features."""
        return ["labels"] if self.labels is not None else []

    def decode(self, cell: dict[str, Any]) -> np.ndarray:
        """The whole clip as float32 mono samples at the feature extractor's rate."""
        waveform = read_native_mono(cell, self.feature_extractor.sampling_rate)
        if waveform is None:
            waveform = downmix(self.decoder.decode_example(cell).get_all_samples().data.numpy())
        if waveform.size == 0:
            raise ValueError("no audio samples")
        return waveform

    def crop_start(self, num_samples: int) -> int | None:
        """Start sample of the window to use (random in training, central in evaluation); None keeps the clip whole."""
        if self.train:
            return random_crop_start(num_samples, self.max_samples)
        return center_crop_start(num_samples, self.max_samples) if self.eval_crop == "center" else None

    def crop(self, waveform: np.ndarray) -> tuple[np.ndarray, int]:
        """(the samples to use, their start sample in the clip)."""
        start = self.crop_start(len(waveform))
        if start is None:
            return waveform, 0
        return waveform[start : start + self.max_samples], start

    def load(self, cell: dict[str, Any]) -> np.ndarray:
        """The decoded, cropped samples of one audio cell."""
        return self.crop(self.decode(cell))[0]

    def targets(self, batch: dict[str, list], row: int, start: int, num_samples: int) -> dict[str, Any]:
        """The targets of one row whose audio was cut to `num_samples` samples from sample `start`."""
        if self.labels is None:
            return {}
        return {"labels": self.labels.encode(batch[self.label_column][row])}

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        waveforms: list[np.ndarray] = []
        targets: list[dict[str, Any]] = []
        for row, cell in enumerate(batch[self.audio_column]):
            file = (cell or {}).get("path") or "<embedded audio>"
            try:
                waveform, start = self.crop(self.decode(cell))
                target = self.targets(batch, row, start, len(waveform))
            except Exception as error:  # noqa: BLE001
                if self.skip_bad_examples:
                    self.skipped += 1
                    logger.warning(f"Skipping {file}: {type(error).__name__}: {error}")
                    continue
                raise BadExampleError(f"Cannot use {file}: {type(error).__name__}: {error}") from error
            waveforms.append(waveform)
            targets.append(target)
        out: dict[str, list] = {self.input_name: self.extract(waveforms)}
        for name in self.target_names:
            out[name] = [target[name] for target in targets]
        return out

    def extract(self, waveforms: list[np.ndarray]) -> list[torch.Tensor]:
        """Features of each clip; one batched call when they end up equally long (all within the clip length)."""
        if not waveforms:
            return []
        rate = self.feature_extractor.sampling_rate
        fe_samples = int(round(self.feature_extractor.max_length_seconds * rate))
        if all(len(w) <= fe_samples for w in waveforms):
            return list(self.feature_extractor(waveforms, sampling_rate=rate, return_tensors="pt")[self.input_name])
        return [self.feature_extractor(w, sampling_rate=rate, return_tensors="pt")[self.input_name][0] for w in waveforms]


@dataclass
class PreparedData:
    """Everything `run.py` needs: transformed splits, the label space, and the validation reports."""

    train: Dataset | IterableDataset | None
    eval: Dataset | IterableDataset | None
    labels: LabelSpace
    train_example_labels: list[list[int]] | None
    reports: list[SplitReport]
    transforms: list[AudioTransform]

    @property
    def num_skipped(self) -> int:
        """Bad examples skipped in every split."""
        return sum(len(r.skipped) for r in self.reports) + sum(t.skipped for t in self.transforms)

    def num_skipped_in(self, split: str) -> int:
        """Bad examples skipped in the "train" or the "eval" split (validation, and the transform when streamed)."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}.")
        reported = sum(len(r.skipped) for r in self.reports if r.split == split)
        return reported + sum(t.skipped for t in self.transforms if t.train == (split == "train"))


def attach_transform(
    dataset: Dataset | IterableDataset, transform: AudioTransform, shuffle_seed: int | None = None, buffer_size: int = 1000
) -> Dataset | IterableDataset:
    """`set_transform` for map-style datasets; a lazy batched `map` (dropping the raw columns) for streamed ones."""
    if isinstance(dataset, IterableDataset):
        if shuffle_seed is not None:
            dataset = dataset.shuffle(seed=shuffle_seed, buffer_size=buffer_size)
        columns = dataset.column_names
        return dataset.map(transform, batched=True, batch_size=16, remove_columns=columns)
    dataset.set_transform(transform)
    return dataset


def limit(dataset: Dataset | IterableDataset, count: int | None, seed: int) -> Dataset | IterableDataset:
    """The first `count` examples (after a seeded shuffle for map-style data) as `max_*_samples` asks."""
    if count is None:
        return dataset
    if isinstance(dataset, IterableDataset):
        return dataset.take(count)
    return dataset.shuffle(seed=seed).select(range(min(count, len(dataset))))


def prepare_data(
    train: Dataset | IterableDataset | None,
    eval_: Dataset | IterableDataset | None,
    feature_extractor: Any,
    audio_column: str = "audio",
    label_column: str = "label",
    label_space: LabelSpace | None = None,
    max_length_seconds: float | None = None,
    eval_crop: str = "center",
    check_audio: bool | None = None,
    skip_bad_examples: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
) -> PreparedData:
    """Validate, subsample and attach the decoding transforms to the train / eval splits."""
    reference = train if train is not None else eval_
    labels = label_space or (build_label_space(reference, label_column) if reference is not None else None)
    return prepare_splits(
        {"train": train, "eval": eval_},
        labels,
        make_transform=lambda is_train: AudioTransform(
            feature_extractor,
            labels,
            audio_column,
            label_column,
            train=is_train,
            max_length_seconds=max_length_seconds,
            eval_crop=eval_crop,
            skip_bad_examples=skip_bad_examples,
        ),
        validate=lambda split, name: validate_split(
            split, name, audio_column, label_column, labels, check_audio, skip_bad_examples
        ),
        example_labels=lambda split: [labels.indices(cell) for cell in split[label_column]],
        max_train_samples=max_train_samples,
        max_eval_samples=max_eval_samples,
        seed=seed,
    )


def prepare_splits(
    splits: dict[str, Dataset | IterableDataset | None],
    labels: LabelSpace,
    make_transform: Callable[[bool], AudioTransform],
    validate: Callable[[Dataset, str], tuple[Dataset, SplitReport]],
    example_labels: Callable[[Dataset], list[list[int]]],
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 42,
    reports: Sequence[SplitReport] = (),
) -> PreparedData:
    """The loop `prepare_data` and the strong-label preparation share: for each of the "train" / "eval" splits,
    subsample, validate a map-style split (and take the train examples' classes for the balanced sampler), then attach
    `make_transform(is_train)`. `reports` from earlier checks are carried into the result."""
    if all(split is None for split in splits.values()):
        raise ValueError("Nothing to prepare: no train and no eval split.")
    all_reports = list(reports)
    transforms: list[AudioTransform] = []
    train_example_labels = None
    prepared: dict[str, Dataset | IterableDataset | None] = {}
    for name, split in splits.items():
        if split is None:
            prepared[name] = None
            continue
        split = limit(split, max_train_samples if name == "train" else max_eval_samples, seed)
        if isinstance(split, Dataset):
            split, report = validate(split, name)
            all_reports.append(report)
            if name == "train":
                train_example_labels = example_labels(split)
        transform = make_transform(name == "train")
        transforms.append(transform)
        prepared[name] = attach_transform(split, transform, shuffle_seed=seed if name == "train" else None)
    return PreparedData(prepared["train"], prepared["eval"], labels, train_example_labels, all_reports, transforms)


__all__: list[str] = [
    "AudioTransform",
    "BadExampleError",
    "PreparedData",
    "SplitReport",
    "build_label_space",
    "center_crop",
    "center_crop_start",
    "fold_values",
    "is_saved_to_disk",
    "load_esc50_folder",
    "load_manifests",
    "load_source",
    "load_speech_commands_folder",
    "prepare_data",
    "prepare_splits",
    "random_crop",
    "random_crop_start",
    "select_splits",
    "validate_split",
]

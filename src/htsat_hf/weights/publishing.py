"""Turn a trained, converted or ensembled HTS-AT folder into a Hub-ready repository and upload it.

`prepare_repository` writes a clean folder: `model.safetensors` (never a pickle), `config.json` with `auto_map`,
`preprocessor_config.json`, the remote-code `.py` files (so the model loads with `trust_remote_code=True` where
`htsat_hf` is not installed) and a `README.md` model card rendered from `model_cards/` with card metadata (license,
tags, datasets, `pipeline_tag`, `library_name`, `model-index` from the run's `all_results.json` / `cv_results.json`).
Training leftovers (`training_args.bin`, optimizer states, checkpoints) are never copied.

`upload_repository` sends that folder with `huggingface_hub.HfApi` (`create_repo` + `upload_folder`), or with
`dry_run=True` only lists what would be sent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
DEFAULT_TEMPLATE = "htsat_audio_classification.md"
RESULT_FILES = ("all_results.json", "eval_results.json", "cv_results.json")
# Trainer metric name -> (model-index metric type, display name)
METRICS = {
    "mAP": ("map", "mAP"),
    "mAUC": ("roc_auc", "mAUC"),
    "dprime": ("d_prime", "d'"),
    "accuracy": ("accuracy", "Accuracy"),
}


@dataclass
class CardSettings:
    """What the model card says beyond what the config tells."""

    repo_id: str
    license: str = "mit"
    dataset_id: str | None = None  # Hub dataset id for `datasets` and `model-index`, e.g. "agkphysics/AudioSet"
    dataset_name: str | None = None  # display name, e.g. "AudioSet (balanced + unbalanced train)"
    dataset_split: str = "test"  # the split the run evaluated on
    base_model: str | None = None  # e.g. the Swin / CLAP checkpoint the run started from
    description: str | None = None  # a paragraph on provenance (which checkpoint was converted, training recipe)
    intended_use: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PreparedRepository:
    folder: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)


@dataclass
class UploadResult:
    repo_id: str
    files: list[tuple[str, int]]  # (path in the repository, bytes)
    dry_run: bool
    commit_url: str | None = None

    def describe(self) -> str:
        total = sum(size for _, size in self.files)
        head = "would send" if self.dry_run else "sent"
        lines = [f"{head} {len(self.files)} files ({total / 1e6:.1f} MB) to {self.repo_id}:"]
        lines += [f"  {name}  ({size:,} bytes)" for name, size in self.files]
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ inputs
def find_template(name: str = DEFAULT_TEMPLATE) -> Path:
    """A model card template: a path, or a name in the package's `model_cards/` (shipped in wheels; the repository's
    top-level `model_cards/` links to it)."""
    if Path(name).is_file():
        return Path(name)
    shipped = Path(__file__).resolve().parent / "model_cards" / name
    if shipped.is_file():
        return shipped
    raise FileNotFoundError(f"Model card template {name!r} not found; pass its path (template=...).")


def read_results(path: str | Path) -> dict[str, float]:
    """Headline metrics of a run: `eval_<metric>` of `all_results.json` / `eval_results.json`, or the fold means
    `eval_<metric>_mean` of `cv_results.json`. Returns {metric: value} for the metrics in `METRICS`."""
    data = json.loads(Path(path).read_text())
    results = {}
    for metric in METRICS:
        for key in (f"eval_{metric}", f"eval_{metric}_mean", metric):
            value = data.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                results[metric] = float(value)
                break
    return results


def find_results(source: Path) -> Path | None:
    for name in RESULT_FILES:
        if (source / name).is_file():
            return source / name
    return None


def pickled_files(folder: str | Path) -> list[str]:
    """Files under `folder` that are (by name) Python pickles."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix in PICKLE_SUFFIXES)


def _load_model(source: Path, convert_trusted_pickle: bool):
    """The model of `source` through the package's classes, from safetensors; pickled weights only on request."""
    from ..modeling_htsat import HTSATForAudioClassification
    from ..modeling_htsat_ensemble import HTSATEnsembleModel

    config = json.loads((source / "config.json").read_text())
    classes = {"htsat": HTSATForAudioClassification, "htsat_ensemble": HTSATEnsembleModel}
    model_class = classes.get(config.get("model_type"))
    if model_class is None:
        raise ValueError(f"{source} holds a {config.get('model_type')!r} model, not an HTS-AT model or ensemble.")
    has_safetensors = (source / "model.safetensors").exists() or (source / "model.safetensors.index.json").exists()
    if not has_safetensors and not convert_trusted_pickle:
        raise ValueError(
            f"{source} has no model.safetensors, only pickled weights ({', '.join(pickled_files(source)) or 'none'}). "
            "Pickles can run code when loaded: publish only safetensors. If you trust the file, convert it with "
            "--convert_trusted_pickle (read with torch.load(weights_only=True), written back as safetensors)."
        )
    model, info = model_class.from_pretrained(source, use_safetensors=has_safetensors, output_loading_info=True)
    problems = {key: value for key, value in info.items() if value and key != "error_msgs"}
    if problems:
        raise ValueError(f"The weights in {source} do not fit {model_class.__name__}: {problems}")
    return model.eval()


def _feature_extractor(source: Path, config):
    from ..feature_extraction_htsat import HTSATFeatureExtractor

    if (source / "preprocessor_config.json").exists():
        return HTSATFeatureExtractor.from_pretrained(source), None
    extractor = HTSATFeatureExtractor.for_model_config(config)
    return extractor, "no preprocessor_config.json in the source: written from the model config's front end"


def _add_sed_pipeline(output: Path) -> str:
    """Ships the sound-event-detection pipeline's code in the repository (`custom_pipelines` in config.json)."""
    try:
        from ..pipeline_htsat import add_remote_sed_pipeline
    except ImportError as error:
        return f"sound-event-detection pipeline code not available ({error}): not included"
    add_remote_sed_pipeline(output)
    return "sound-event-detection pipeline code included (custom_pipelines)"


# ---------------------------------------------------------------------------------------------- model card
def _architecture(config) -> str:
    if config.model_type == "htsat_ensemble":
        members = [config.member_config(index) for index in range(config.num_members)]
        return "; ".join(f"member {i + 1}: {_architecture(member)}" for i, member in enumerate(members))
    head = "token-semantic" if config.use_token_semantic_head else "pooled linear"
    return (
        f"{config.spec_size}x{config.spec_size} spectrogram image, patch {config.patch_size} (stride "
        f"{config.patch_stride}), width {config.embed_dim}, depths {list(config.depths)}, heads "
        f"{list(config.num_heads)}, window {config.window_size}, {head} head"
    )


def build_card(model, settings: CardSettings, results: dict[str, float], results_source: str | None,
               template: str | Path = DEFAULT_TEMPLATE):
    """A `huggingface_hub.ModelCard` for `model`, rendered from `template`."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = model.config
    ensemble = config.model_type == "htsat_ensemble"
    multi_label = config.problem_type == "multi_label_classification"
    sed = bool(config.use_token_semantic_head)
    tags = ["audio", "audio-classification", "htsat", "custom_code"]
    tags += (["sound-event-detection"] if sed else []) + (["ensemble"] if ensemble else [])
    tags += [tag for tag in settings.tags if tag not in tags]
    eval_results = None
    if results and settings.dataset_id:
        eval_results = [
            EvalResult(
                task_type="audio-classification",
                dataset_type=settings.dataset_id,
                dataset_name=settings.dataset_name or settings.dataset_id,
                dataset_split=settings.dataset_split,
                metric_type=METRICS[metric][0],
                metric_name=METRICS[metric][1],
                metric_value=round(value, 4),
            )
            for metric, value in results.items()
        ]
    model_name = settings.repo_id.split("/")[-1]
    card_data = ModelCardData(
        license=settings.license,
        library_name="transformers",
        pipeline_tag="audio-classification",
        tags=tags,
        datasets=[settings.dataset_id] if settings.dataset_id else None,
        metrics=[METRICS[metric][0] for metric in results] or None,
        base_model=settings.base_model,
        model_name=model_name,
        eval_results=eval_results,
    )
    labels = [config.id2label[index] for index in sorted(config.id2label)]
    dataset = settings.dataset_name or settings.dataset_id or "the data it was fine-tuned on (not stated)"
    kind = "multi-label audio tagging" if multi_label else "single-label audio classification"
    step_seconds = (config.clip_frames - 1) * config.hop_length / config.sampling_rate / config.token_steps
    dataset_label = settings.dataset_name or settings.dataset_id or "evaluation set"
    return ModelCard.from_template(
        card_data,
        template_path=str(find_template(str(template))),
        model_id=settings.repo_id,
        model_name=model_name,
        model_summary=(
            f"HTS-AT {'ensemble ' if ensemble else ''}for {kind} with {config.num_labels} classes"
            f"{' and sound event detection' if sed else ''}, trained on {dataset}, as a Transformers model."
        ),
        description=settings.description,
        is_ensemble=ensemble,
        num_members=getattr(config, "num_members", 1),
        task_description=kind + (" with frame-level event detection (token-semantic head)" if sed else ""),
        num_labels=config.num_labels,
        example_labels=labels[:8],
        multi_label=multi_label,
        sed=sed,
        sampling_rate=config.sampling_rate,
        num_mel_bins=config.num_mel_bins,
        f_min=config.f_min,
        f_max=config.f_max,
        hop_length=config.hop_length,
        clip_seconds=config.clip_seconds,
        token_steps=config.token_steps,
        step_ms=int(round(step_seconds * 1000)),
        architecture=_architecture(config),
        base_model=settings.base_model,
        license=settings.license,
        intended_use=settings.intended_use or _default_intended_use(multi_label, sed, config.num_labels),
        dataset_description=dataset,
        results=[
            {"dataset": dataset_label, "split": settings.dataset_split, "name": METRICS[metric][1],
             "value": f"{value:.4f}"}
            for metric, value in results.items()
        ],
        results_source=results_source,
    )


def _default_intended_use(multi_label: bool, sed: bool, num_labels: int) -> str:
    what = (
        f"Tagging which of its {num_labels} sound classes occur in a recording (several at once)"
        if multi_label
        else f"Assigning one of its {num_labels} classes to a short recording"
    )
    uses = [what + "."]
    if sed:
        uses.append("Locating those sounds in time (`pipeline(\"sound-event-detection\")`).")
    uses.append(
        "Extracting clip embeddings (`AutoModel` gives `pooler_output`) and starting fine-tuning on other audio "
        "classification tasks."
    )
    return " ".join(uses)


# ---------------------------------------------------------------------------------------------- preparing
def prepare_repository(
    source_dir: str | Path,
    output_dir: str | Path,
    settings: CardSettings,
    results_file: str | Path | None = None,
    template: str | Path = DEFAULT_TEMPLATE,
    convert_trusted_pickle: bool = False,
) -> PreparedRepository:
    """Writes the Hub repository for the model in `source_dir` (a `save_pretrained` / Trainer output folder, a
    converted original checkpoint or an ensemble) into `output_dir`."""
    source, output = Path(source_dir), Path(output_dir)
    if source.resolve() == output.resolve():
        raise ValueError("Write the repository to a new folder (output_dir), not into the source folder.")
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} is not empty; choose a new folder.")
    notes = []
    model = _load_model(source, convert_trusted_pickle)
    extractor, note = _feature_extractor(source, model.config)
    if note:
        notes.append(note)
    model.save_pretrained(output)
    extractor.save_pretrained(output)
    if model.config.use_token_semantic_head:
        notes.append(_add_sed_pipeline(output))
    results_path = Path(results_file) if results_file else find_results(source)
    results = read_results(results_path) if results_path else {}
    if results and not settings.dataset_id:
        notes.append("results found but no dataset id given: the card lists them without a model-index")
    if not results:
        notes.append("no evaluation results (all_results.json) found: the card has no results")
    card = build_card(model, settings, results, results_path.name if results_path else None, template)
    card.save(str(output / "README.md"))
    leftovers = pickled_files(output)
    if leftovers:
        raise RuntimeError(f"Pickled files ended up in {output}: {leftovers}")
    files = sorted(str(p.relative_to(output)) for p in output.rglob("*") if p.is_file())
    return PreparedRepository(folder=output, files=files, notes=notes)


# ----------------------------------------------------------------------------------------------- uploading
def check_publishable(folder: str | Path) -> list[tuple[str, int]]:
    """Files to send, with sizes. Raises when the folder holds pickles or lacks weights, config or card."""
    folder = Path(folder)
    pickles = pickled_files(folder)
    if pickles:
        raise ValueError(f"Refusing to publish pickled files: {pickles}. Publish safetensors only.")
    required = ("config.json", "preprocessor_config.json", "README.md")
    missing = [name for name in required if not (folder / name).is_file()]
    if not any(folder.glob("model*.safetensors")):
        missing.append("model.safetensors")
    if missing:
        raise ValueError(f"{folder} is not a prepared repository: missing {missing} (run prepare_repository).")
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def upload_repository(
    folder: str | Path,
    repo_id: str,
    api: Any = None,
    private: bool | None = None,
    commit_message: str = "Upload HTS-AT model",
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
) -> UploadResult:
    """Creates `repo_id` if needed and uploads exactly the files of `folder` (`api`: an `HfApi`, or a stand-in with
    `create_repo` and `upload_folder`; the token comes from the usual `huggingface_hub` login / `HF_TOKEN`)."""
    files = check_publishable(folder)
    if dry_run:
        return UploadResult(repo_id=repo_id, files=files, dry_run=True)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message,
        revision=revision,
        create_pr=create_pr,
        allow_patterns=[name for name, _ in files],
    )
    return UploadResult(repo_id=repo_id, files=files, dry_run=False, commit_url=getattr(commit, "commit_url", None))


def publish(
    source_dir: str | Path,
    output_dir: str | Path,
    settings: CardSettings,
    dry_run: bool = False,
    api: Any = None,
    private: bool | None = None,
    results_file: str | Path | None = None,
    template: str | Path = DEFAULT_TEMPLATE,
    convert_trusted_pickle: bool = False,
    commit_message: str = "Upload HTS-AT model",
) -> tuple[PreparedRepository, UploadResult]:
    """`prepare_repository` then `upload_repository` (the hook for `--push_to_hub` in training)."""
    prepared = prepare_repository(source_dir, output_dir, settings, results_file, template, convert_trusted_pickle)
    uploaded = upload_repository(prepared.folder, settings.repo_id, api=api, private=private,
                                 commit_message=commit_message, dry_run=dry_run)
    return prepared, uploaded


__all__ = [
    "CardSettings",
    "PreparedRepository",
    "UploadResult",
    "build_card",
    "check_publishable",
    "find_template",
    "prepare_repository",
    "publish",
    "read_results",
    "upload_repository",
]

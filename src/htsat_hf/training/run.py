"""The training driver behind `htsat-hf train`: data -> model -> `HTSATTrainer` -> saved model + metrics, and the
k-fold cross-validation loop (ESC-50). With `--strong_labels_train` (DESED-style TSVs) it trains sound event
detection: an `HTSATForSoundEventDetection` on frame-level plus clip-level targets."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import transformers
from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModelForAudioClassification,
    AutoModelForAudioFrameClassification,
    HfArgumentParser,
    TrainingArguments,
    set_seed,
)

from .. import HTSATConfig, HTSATFeatureExtractor, HTSATForAudioClassification, HTSATForSoundEventDetection
from ..inference_checks import check_front_end_agrees
from .arguments import TRAINING_DEFAULTS, DataTrainingArguments, HTSATRecipeArguments, ModelArguments
from .data import build_label_space, fold_values, load_source, prepare_data, select_splits
from .labels import LabelSpace
from .metrics import compute_metrics_for, default_metric_name, sound_event_metrics
from .mixup import HTSATDataCollator
from .strong_labels import StepGrid, load_strong_labels, prepare_strong_data
from .trainer import HTSATTrainer, sync_batchnorm_for_distributed

logger = logging.getLogger("htsat_hf.train")

ARCH_OVERRIDES = (
    "embed_dim",
    "depths",
    "num_heads",
    "window_size",
    "spec_size",
    "clip_seconds",
    "sampling_rate",
    "hop_length",
    "n_fft",
    "num_mel_bins",
    "f_min",
    "f_max",
    "drop_path_rate",
    "spec_augment",
    "time_mask_width",
    "freq_mask_width",
    "use_token_semantic_head",
)


def parse_args(argv: Sequence[str] | None = None) -> tuple[ModelArguments, DataTrainingArguments, HTSATRecipeArguments, TrainingArguments]:
    """Parse the command line (or a single .json file of arguments) with the recipe's defaults."""
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, HTSATRecipeArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(json_file=argv[0])
    return parser.parse_args_into_dataclasses(args=argv)


# ------------------------------------------------------------------------------------------------------- model
def build_model(model_args: ModelArguments, labels: LabelSpace, max_length_seconds: float | None,
                sound_event_detection: bool = False):
    """(model, feature extractor) for the label space: fine-tuned from `model_name_or_path`, or from scratch.
    `sound_event_detection` builds an `HTSATForSoundEventDetection` (strong labels) instead of the classifier."""
    overrides = {k: getattr(model_args, k) for k in ARCH_OVERRIDES if getattr(model_args, k) is not None}
    if "clip_seconds" in overrides:  # keep the paper's half-window hop between windows of long inputs
        overrides["long_input_hop_seconds"] = overrides["clip_seconds"] / 2
    label_kwargs = {
        "num_labels": labels.num_labels,
        "id2label": labels.id2label,
        "label2id": labels.label2id,
        "problem_type": labels.problem_type,
        "finetuning_task": "sound-event-detection" if sound_event_detection else "audio-classification",
    }
    common = {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token,
              "trust_remote_code": model_args.trust_remote_code}
    auto_class = AutoModelForAudioFrameClassification if sound_event_detection else AutoModelForAudioClassification
    config_source = model_args.config_name or model_args.model_name_or_path
    if config_source:
        config = AutoConfig.from_pretrained(config_source, **label_kwargs, **overrides, **common)
        if hasattr(config, "validate_architecture"):
            config.validate_architecture()
    else:
        config = HTSATConfig(**label_kwargs, **overrides)
    if model_args.init_from_swin or model_args.init_from_clap:
        if model_args.model_name_or_path:
            raise ValueError("--init_from_swin/--init_from_clap start a new model; leave out --model_name_or_path.")
        from ..weights.pretrained_init import initialise_model

        report = initialise_model(
            config, init_from_swin_path=model_args.init_from_swin, init_from_clap_path=model_args.init_from_clap,
            rgb_reduction=model_args.rgb_reduction, allow_pickle=model_args.allow_pickle,
            model_class=HTSATForSoundEventDetection if sound_event_detection else HTSATForAudioClassification,
        )
        logger.info(report.summary())
        model, config = report.model, report.model.config
    elif model_args.model_name_or_path:
        model = auto_class.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
            **common,
        )
    else:
        model = auto_class.from_config(config, trust_remote_code=model_args.trust_remote_code)
    fe_source = model_args.feature_extractor_name or model_args.model_name_or_path
    if fe_source:
        feature_extractor = AutoFeatureExtractor.from_pretrained(fe_source, **common)
    else:
        feature_extractor = HTSATFeatureExtractor.for_model_config(config)
    check_front_end_agrees(config, feature_extractor)  # else: pass a matching --feature_extractor_name
    if max_length_seconds is not None:
        feature_extractor.max_length_seconds = float(max_length_seconds)
    if model_args.freeze_feature_encoder:
        model.freeze_feature_encoder()
    return model, feature_extractor


# -------------------------------------------------------------------------------------------------------- run
def _log_data(prepared, labels: LabelSpace) -> None:
    sizes = {name: (len(split) if hasattr(split, "__len__") else "streamed") for name, split in
             (("train", prepared.train), ("eval", prepared.eval)) if split is not None}
    kind = "multi-label" if labels.multi_label else "single-label"
    logger.info(f"Data: {sizes}; {labels.num_labels} classes ({kind}): {labels.names[:8]}{' ...' if labels.num_labels > 8 else ''}")
    for report in prepared.reports:
        if report.skipped:
            logger.warning(f"{report.name}: skipped {len(report.skipped)} bad example(s), kept {report.kept}.")


def train_and_evaluate(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    recipe: HTSATRecipeArguments,
    training_args: TrainingArguments,
    raw: Any = None,
) -> dict[str, Any]:
    """One run: returns the metrics written to `output_dir/all_results.json`."""
    set_seed(training_args.seed)
    if uses_strong_labels(data_args):
        return train_on_strong_labels(model_args, data_args, recipe, training_args)
    if raw is None:
        raw = load_source(
            data_args.dataset_name, data_args.dataset_config_name, data_args.train_file, data_args.eval_file,
            data_args.audio_column_name, data_args.streaming, model_args.cache_dir, model_args.token,
        )
    eval_split = data_args.eval_split_name if training_args.do_eval else None
    train, eval_ = select_splits(
        raw, data_args.train_split_name, eval_split, data_args.fold_column, data_args.eval_fold,
        data_args.validation_split_fraction, training_args.seed,
    )
    labels = build_label_space(
        train, data_args.label_column_name, data_args.label_csv, data_args.class_names, data_args.multi_label,
        data_args.label_separator,
    )
    model, feature_extractor = build_model(model_args, labels, data_args.max_length_seconds)
    with training_args.main_process_first(desc="validating the data"):
        prepared = prepare_data(
            train if training_args.do_train else None, eval_ if training_args.do_eval else None, feature_extractor,
            data_args.audio_column_name, data_args.label_column_name, labels, data_args.max_length_seconds,
            data_args.eval_crop, data_args.check_audio, data_args.skip_bad_examples, data_args.max_train_samples,
            data_args.max_eval_samples, training_args.seed,
        )
    return fit(model, feature_extractor, prepared, labels, recipe, training_args,
               compute_metrics_for(labels.problem_type), default_balanced=labels.multi_label)


# --------------------------------------------------------------------------------------------- strong labels
def uses_strong_labels(data_args: DataTrainingArguments) -> bool:
    """Whether the run trains sound event detection on strong-label TSVs; checks the options that go with them."""
    if not (data_args.strong_labels_train or data_args.strong_labels_eval):
        return False
    if not data_args.strong_labels_train:
        raise ValueError("--strong_labels_eval needs --strong_labels_train (its clips define the classes).")
    conflicts = [flag for flag, used in (
        ("--dataset_name", data_args.dataset_name), ("--train_file", data_args.train_file),
        ("--eval_file", data_args.eval_file), ("--streaming", data_args.streaming),
        ("--cross_validation", data_args.cross_validation), ("--eval_fold", data_args.eval_fold),
    ) if used]
    if conflicts:
        raise ValueError(f"--strong_labels_train reads its clips from the TSV; it does not combine with {conflicts}.")
    if data_args.eval_crop != "center":
        raise ValueError("With strong labels every example is one model window: --eval_crop must be 'center'.")
    return True


def train_on_strong_labels(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    recipe: HTSATRecipeArguments,
    training_args: TrainingArguments,
) -> dict[str, Any]:
    """A sound event detection run on DESED-style TSVs: `HTSATForSoundEventDetection`, frame + clip targets."""
    if training_args.do_eval and not (data_args.strong_labels_eval or data_args.validation_split_fraction):
        raise ValueError("Evaluating on strong labels needs --strong_labels_eval or --validation_split_fraction "
                         "(or --do_eval False).")
    source = load_strong_labels(
        data_args.strong_labels_train, data_args.strong_labels_eval if training_args.do_eval else None,
        data_args.audio_dir, data_args.eval_audio_dir, data_args.label_csv, data_args.class_names,
        data_args.skip_bad_examples,
    )
    train, eval_ = select_splits(source.splits, "train", "eval" if training_args.do_eval else None,
                                 validation_split_fraction=data_args.validation_split_fraction, seed=training_args.seed)
    labels = LabelSpace(names=source.names, multi_label=True)
    model, feature_extractor = build_model(model_args, labels, data_args.max_length_seconds, sound_event_detection=True)
    with training_args.main_process_first(desc="validating the data"):
        prepared = prepare_strong_data(
            train if training_args.do_train else None, eval_ if training_args.do_eval else None, feature_extractor,
            StepGrid.from_config(model.config), labels, data_args.max_length_seconds, data_args.check_audio,
            data_args.skip_bad_examples, data_args.max_train_samples, data_args.max_eval_samples, training_args.seed,
            reports=source.reports,
        )
    return fit(model, feature_extractor, prepared, labels, recipe, training_args, sound_event_metrics(),
               default_balanced=False)


# ------------------------------------------------------------------------------------------------ training
def fit(
    model: Any,
    feature_extractor: Any,
    prepared: Any,
    labels: LabelSpace,
    recipe: HTSATRecipeArguments,
    training_args: TrainingArguments,
    compute_metrics: Any,
    default_balanced: bool,
) -> dict[str, Any]:
    """Train and/or evaluate `model` on the prepared splits with the HTS-AT recipe; save the model and metrics."""
    _log_data(prepared, labels)
    balanced = recipe.balanced_sampling if recipe.balanced_sampling is not None else default_balanced
    if balanced and prepared.train_example_labels is None and training_args.do_train:
        logger.warning("Balanced sampling needs a non-streaming training set; using the data's own order.")
        balanced = False
    collator = HTSATDataCollator(
        num_labels=labels.num_labels, mixup_alpha=recipe.mixup_alpha, mix_targets=recipe.mix_targets,
        input_name=feature_extractor.model_input_names[0],
    )
    if recipe.sync_batchnorm and training_args.do_train:
        model = sync_batchnorm_for_distributed(model, training_args.world_size, training_args.device.type)
    if training_args.metric_for_best_model is None and training_args.load_best_model_at_end:
        training_args.metric_for_best_model = default_metric_name(labels.problem_type)
    trainer = HTSATTrainer(
        model=model,
        args=training_args,
        data_collator=collator,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=feature_extractor,
        compute_metrics=compute_metrics,
        train_example_labels=prepared.train_example_labels,
        balanced_sampling=bool(balanced),
        htsat_lr_schedule=recipe.htsat_lr_schedule,
        lr_rate=recipe.lr_rate,
        lr_scheduler_epoch=recipe.lr_scheduler_epoch,
        schedule_steps_per_epoch=recipe.schedule_steps_per_epoch,
        decay_all_parameters=recipe.decay_all_parameters,
    )
    results: dict[str, Any] = {}
    if training_args.do_train:
        resume = training_args.resume_from_checkpoint
        if isinstance(resume, str) and resume.lower() in ("true", "last"):
            resume = True
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        train_metrics = dict(train_result.metrics)
        train_metrics["train_num_skipped_examples"] = prepared.num_skipped_in("train")
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)
    elif trainer.is_world_process_zero():
        trainer.save_model()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_num_skipped_examples"] = prepared.num_skipped_in("eval")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if prepared.num_skipped:
        logger.warning(f"Skipped {prepared.num_skipped} bad example(s) in total.")
    return results


def cross_validate(
    model_args: ModelArguments,
    data_args: DataTrainingArguments,
    recipe: HTSATRecipeArguments,
    training_args: TrainingArguments,
) -> dict[str, Any]:
    """Train/evaluate once per fold (each in `output_dir/fold_<k>`), then write `cv_results.json` with the per-fold
    metrics and their mean and standard deviation (population std, as ESC-50 results are usually reported)."""
    uses_strong_labels(data_args)  # raises: strong-label TSVs have no folds
    raw = load_source(
        data_args.dataset_name, data_args.dataset_config_name, data_args.train_file, data_args.eval_file,
        data_args.audio_column_name, False, model_args.cache_dir, model_args.token,
    )
    train_split = data_args.train_split_name if data_args.train_split_name in raw else "train"
    folds = fold_values(raw[train_split], data_args.fold_column)
    per_fold: dict[str, dict[str, Any]] = {}
    for fold in folds:
        logger.info(f"===== Cross-validation: evaluating on {data_args.fold_column}={fold} ({len(folds)} folds) =====")
        fold_args = replace(training_args, output_dir=str(Path(training_args.output_dir) / f"fold_{fold}"))
        fold_data = replace(data_args, eval_fold=str(fold), cross_validation=False)
        per_fold[str(fold)] = train_and_evaluate(model_args, fold_data, recipe, fold_args, raw=raw)
    summary: dict[str, Any] = {"folds": per_fold}
    keys = sorted({k for m in per_fold.values() for k, v in m.items() if k.startswith("eval_") and isinstance(v, (int, float))})
    for key in keys:
        values = np.array([m[key] for m in per_fold.values() if key in m], dtype=float)
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std())
    if training_args.process_index == 0:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(training_args.output_dir) / "cv_results.json").write_text(json.dumps(summary, indent=2))
    for key in keys:
        if not any(s in key for s in ("runtime", "per_second", "loss")):
            logger.info(f"{key}: {summary[key + '_mean']:.4f} +- {summary[key + '_std']:.4f} over {len(folds)} folds")
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    model_args, data_args, recipe, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", handlers=[logging.StreamHandler(sys.stdout)]
    )
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    ours = logging.INFO if training_args.should_log else logging.WARNING
    logger.setLevel(ours)
    logging.getLogger("htsat_hf").setLevel(ours)
    logger.info(
        f"Process rank {training_args.process_index} of {training_args.world_size}, device {training_args.device}, "
        f"distributed: {training_args.parallel_mode.value}"
    )
    push = training_args.push_to_hub
    if push:  # the Trainer's own push would upload the pickled training_args.bin: publish safetensors-only instead
        training_args = replace(training_args, push_to_hub=False)
    if data_args.cross_validation:
        return cross_validate(model_args, data_args, recipe, training_args)
    results = train_and_evaluate(model_args, data_args, recipe, training_args)
    if push and training_args.process_index == 0:
        push_trained_model(model_args, data_args, training_args)
    return results


def cli(argv: Sequence[str] | None = None) -> None:
    """`htsat-hf train`: `main`, with a data problem (an empty split or manifest, an unreadable file, an unknown
    label) said in one line that names the split and file, instead of a traceback."""
    from .data import BadExampleError

    try:
        main(argv)
    except BadExampleError as error:
        raise SystemExit(f"error: {error}") from None


def push_trained_model(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments,
                       api: Any = None) -> None:
    """`--push_to_hub`: a clean repository (safetensors, remote code, model card with the eval results) uploaded to
    `--hub_model_id` (default: the output folder's name)."""
    from ..weights.publishing import CardSettings, publish

    output = Path(training_args.output_dir)
    settings = CardSettings(
        repo_id=training_args.hub_model_id or output.name,
        dataset_id=data_args.dataset_name if data_args.dataset_name and not Path(data_args.dataset_name).exists() else None,
        dataset_name=data_args.dataset_name,
        dataset_split=data_args.eval_split_name,
        base_model=model_args.model_name_or_path or model_args.init_from_swin or model_args.init_from_clap,
    )
    prepared, uploaded = publish(output, output.with_name(output.name + "-hub"), settings, api=api,
                                 private=training_args.hub_private_repo)
    logger.info(uploaded.describe())


__all__ = ["build_model", "cross_validate", "fit", "main", "parse_args", "train_and_evaluate", "train_on_strong_labels"]

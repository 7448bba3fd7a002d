"""Command-line arguments of `htsat-hf train`: the names of Transformers' `run_audio_classification.py`
(`ModelArguments`, `DataTrainingArguments`) plus the HTS-AT recipe (`HTSATRecipeArguments`) and `TrainingArguments`."""

from __future__ import annotations

from dataclasses import dataclass, field

# TrainingArguments defaults that differ from the Trainer's: the paper's optimiser settings, and the ones the
# set_transform data pipeline needs. Every one can still be given on the command line.
TRAINING_DEFAULTS = {
    "learning_rate": 1e-3,  # x the schedule's multiplier (at most 0.1): peak 1e-4, as the paper
    "weight_decay": 0.05,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "remove_unused_columns": False,  # the audio column must reach the set_transform
    "ddp_find_unused_parameters": False,  # every HTS-AT parameter gets a gradient
    "do_train": True,
    "do_eval": True,
    "output_dir": "htsat-finetuned",
}


@dataclass
class ModelArguments:
    """Which model to fine-tune, or which (small) model to train from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A model folder or Hub id to fine-tune. Leave out to train from scratch."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config folder / id if not the model's."})
    feature_extractor_name: str | None = field(default=None, metadata={"help": "Feature extractor if not the model's."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache downloaded models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom code from the Hub."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Re-initialise the classifier when num_labels differs (e.g. AudioSet -> ESC-50)."}
    )
    freeze_feature_encoder: bool = field(
        default=False, metadata={"help": "Freeze the mel BatchNorm and patch embedding (HTS-AT fine-tunes them)."}
    )
    init_from_swin: str | None = field(
        default=None, metadata={"help": "Start from an ImageNet Swin checkpoint (Transformers SwinModel layout): folder or .safetensors."}
    )
    init_from_clap: str | None = field(
        default=None, metadata={"help": "Start from the audio tower of a CLAP checkpoint (Transformers ClapAudioModel layout)."}
    )
    rgb_reduction: str = field(default="mean", metadata={"help": "Swin's RGB patch filters -> one channel: mean or sum."})
    allow_pickle: bool = field(default=False, metadata={"help": "Allow pickled (.bin) start checkpoints you trust."})
    # Model settings (from-scratch runs, or overrides of a loaded config)
    embed_dim: int | None = field(default=None, metadata={"help": "Width of the first stage (paper: 96)."})
    depths: list[int] | None = field(default=None, metadata={"help": "Blocks per stage (paper: 2 2 6 2)."})
    num_heads: list[int] | None = field(default=None, metadata={"help": "Heads per stage (paper: 4 8 16 32)."})
    window_size: int | None = field(default=None, metadata={"help": "Attention window (paper: 8)."})
    spec_size: int | None = field(default=None, metadata={"help": "Side of the folded spectrogram image (paper: 256)."})
    clip_seconds: float | None = field(default=None, metadata={"help": "Seconds per model window (paper: 10)."})
    sampling_rate: int | None = field(default=None, metadata={"help": "Audio rate (paper: 32000; 16000 for SCV2)."})
    hop_length: int | None = field(default=None, metadata={"help": "STFT hop (paper: 320; 160 for SCV2)."})
    n_fft: int | None = field(default=None, metadata={"help": "STFT size and window length (paper: 1024)."})
    num_mel_bins: int | None = field(default=None, metadata={"help": "Mel bins (paper: 64; spec_size must be a multiple)."})
    f_min: float | None = field(default=None, metadata={"help": "Lowest mel frequency in Hz (paper: 50)."})
    f_max: float | None = field(default=None, metadata={"help": "Highest mel frequency in Hz (paper: 14000)."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth (paper: 0.1)."})
    spec_augment: bool | None = field(default=None, metadata={"help": "SpecAugment in training (paper: on)."})
    time_mask_width: int | None = field(default=None, metadata={"help": "SpecAugment time-mask width in frames (64)."})
    freq_mask_width: int | None = field(default=None, metadata={"help": "SpecAugment mel-bin mask width (8)."})
    use_token_semantic_head: bool | None = field(default=None, metadata={"help": "Token-semantic head (paper: on)."})


@dataclass
class DataTrainingArguments:
    """What data to train and evaluate on."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, or a local folder (audiofolder, ESC-50 or Speech Commands)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset configuration."})
    train_file: str | None = field(default=None, metadata={"help": "CSV/JSON manifest: audio path + label columns."})
    eval_file: str | None = field(default=None, metadata={"help": "CSV/JSON manifest for evaluation."})
    train_split_name: str = field(default="train", metadata={"help": "Training split."})
    eval_split_name: str = field(default="validation", metadata={"help": "Evaluation split."})
    audio_column_name: str = field(default="audio", metadata={"help": "Column with the audio (or its path)."})
    label_column_name: str = field(default="label", metadata={"help": "Column with the label(s)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training clips."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation clips."})
    max_length_seconds: float | None = field(
        default=None,
        metadata={"help": "Clip length: training clips are randomly cropped to it, shorter ones repeated up to it "
                          "(default: the feature extractor's, 10 s). Saved with the feature extractor."},
    )
    eval_crop: str = field(
        default="center",
        metadata={"help": "'center': crop long eval clips centrally to max_length_seconds; 'none': keep them whole "
                          "(needs --per_device_eval_batch_size 1 when lengths differ)."},
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of downloading it."})
    label_csv: str | None = field(
        default=None, metadata={"help": "Class list: AudioSet index,mid,display_name CSV (or index,name,mid)."}
    )
    class_names: list[str] | None = field(default=None, metadata={"help": "Class names in index order (for streamed data)."})
    multi_label: bool | None = field(
        default=None, metadata={"help": "Several labels per clip (default: detected from the label column)."}
    )
    label_separator: str = field(default=",", metadata={"help": "Separator of multi-label strings."})
    fold_column: str = field(default="fold", metadata={"help": "Column with cross-validation folds (ESC-50: fold)."})
    eval_fold: str | None = field(default=None, metadata={"help": "Evaluate on this fold, train on the others."})
    cross_validation: bool = field(
        default=False, metadata={"help": "Train and evaluate once per fold; report the mean and standard deviation."}
    )
    validation_split_fraction: float | None = field(
        default=None, metadata={"help": "Hold out this fraction of the training split when there is no eval split."}
    )
    strong_labels_train: str | None = field(
        default=None,
        metadata={"help": "DESED-style TSV (filename onset offset event_label) of the training clips: trains sound "
                          "event detection (frame-level + clip-level loss) and saves an HTSATForSoundEventDetection."},
    )
    strong_labels_eval: str | None = field(
        default=None, metadata={"help": "DESED-style TSV of the evaluation clips (needs --strong_labels_train)."}
    )
    audio_dir: str | None = field(
        default=None, metadata={"help": "Folder of the audio files --strong_labels_train names (default: the TSV's)."}
    )
    eval_audio_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of the audio files --strong_labels_eval names (default: --audio_dir, else the TSV's)."},
    )
    skip_bad_examples: bool = field(
        default=False, metadata={"help": "Skip unreadable audio / missing or unknown labels instead of stopping."}
    )
    check_audio: bool | None = field(
        default=None, metadata={"help": "Decode every clip before training (default: for splits up to 20,000 rows)."}
    )


@dataclass
class HTSATRecipeArguments:
    """The paper's training recipe on top of the Trainer."""

    mixup_alpha: float = field(default=0.5, metadata={"help": "Mixup Beta(alpha, alpha); 0 turns mixup off."})
    mix_targets: bool = field(
        default=True,
        metadata={"help": "Mix the targets like the inputs (standard mixup). False = the original's AudioSet code, "
                          "which leaves targets unmixed."},
    )
    balanced_sampling: bool | None = field(
        default=None,
        metadata={"help": "Class-balanced training queue (default: on for multi-label data, off for strong labels, "
                          "whose clips without events the class queue would never draw)."},
    )
    htsat_lr_schedule: bool = field(
        default=True, metadata={"help": "The original warm-up/step schedule instead of --lr_scheduler_type."}
    )
    lr_rate: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1], metadata={"help": "Warm-up multipliers."})
    lr_scheduler_epoch: list[int] = field(default_factory=lambda: [10, 20, 30], metadata={"help": "Step boundaries."})
    schedule_steps_per_epoch: int | None = field(
        default=None, metadata={"help": "Optimizer steps per schedule epoch (required with --streaming)."}
    )
    decay_all_parameters: bool = field(
        default=True, metadata={"help": "Weight decay on all parameters (original) rather than not on biases/norms."}
    )
    sync_batchnorm: bool = field(
        default=True,
        metadata={"help": "Under several processes on GPUs, SyncBatchNorm for the mel BatchNorm (original): statistics "
                          "of the global batch. PyTorch has no CPU SyncBatchNorm; CPU runs keep per-process statistics."},
    )

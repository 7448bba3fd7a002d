"""Configuration of HTS-AT (Chen et al., "HTS-AT: A Hierarchical Token-Semantic Audio Transformer for Sound
Classification and Detection", ICASSP 2022)."""

from __future__ import annotations

import math
import numbers
from typing import Any

from transformers import PreTrainedConfig

AUDIOSET_NUM_LABELS = 527

# The type and range of each setting, checked by `validate_types` (whole numbers: the lowest value allowed).
WHOLE_NUMBERS = {
    "sampling_rate": 1, "n_fft": 1, "hop_length": 1, "num_mel_bins": 1, "spec_size": 1, "patch_size": 1,
    "patch_stride": 1, "window_size": 1, "embed_dim": 1,
    "time_mask_width": 0, "num_time_masks": 0, "freq_mask_width": 0, "num_freq_masks": 0,
}
POSITIVE_NUMBERS = ("f_max", "clip_seconds", "mlp_ratio", "layer_norm_eps", "long_input_hop_seconds")
NON_NEGATIVE_NUMBERS = ("f_min", "initializer_range")
PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate")
FLAGS = ("qkv_bias", "use_token_semantic_head", "spec_augment")
PROBLEM_TYPES = (None, "multi_label_classification", "single_label_classification", "regression")  # Transformers' values
PER_STAGE = {"depths": [2, 2, 6, 2], "num_heads": [4, 8, 16, 32]}  # with the paper's values as examples


def is_whole_number(value: Any) -> bool:
    """An int (or numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_id2label(id2label: Any) -> None:
    """A ValueError naming `id2label` unless it maps the ids 0..n-1 (ints, or their strings as JSON has them), each
    once, to label names: a gap would leave a class without a name, and the model's classes are its columns."""
    if id2label is None:
        return
    if not isinstance(id2label, dict):
        raise ValueError(f"id2label must be a dict {{id: label name}}, got {id2label!r}.")
    if not id2label:
        raise ValueError("num_labels must be >= 1 (id2label is empty): the model needs at least one class.")
    ids = []
    for key, label in id2label.items():
        text = str(key)
        if isinstance(key, bool) or not (is_whole_number(key) or (isinstance(key, str) and text.isdigit())):
            raise ValueError(f"id2label's keys must be class ids 0, 1, ..., got {key!r}.")
        if not isinstance(label, str):
            raise ValueError(f"id2label[{key!r}] must be a label name (a string), got {label!r}.")
        ids.append(int(key))
    expected = set(range(len(id2label)))
    if set(ids) != expected or len(set(ids)) != len(ids):
        missing, extra = sorted(expected - set(ids)), sorted(set(ids) - expected)
        raise ValueError(f"id2label must number its {len(id2label)} classes 0..{len(id2label) - 1} without gaps or "
                         f"repeats: missing ids {missing}, ids out of range {extra}.")


class HTSATConfig(PreTrainedConfig):
    r"""
    Settings of an HTS-AT model. Defaults are the paper's AudioSet model.

    Front end (also stored in the feature extractor; kept here so the model knows its time axis):
        sampling_rate (`int`, 32000), n_fft (`int`, 1024; also the window length), hop_length (`int`, 320),
        num_mel_bins (`int`, 64), f_min (`float`, 50.0), f_max (`float`, 14000.0),
        clip_seconds (`float`, 10.0): the length of the training clips; one window of the model.

    Spectrogram image and Swin encoder:
        spec_size (`int`, 256): the (frames x mel bins) spectrogram, `spec_size * spec_size / num_mel_bins`
            frames long, is folded into a `spec_size x spec_size` image (time -> frequency -> window order).
        patch_size (`int`, 4), patch_stride (`int`, 4), window_size (`int`, 8), embed_dim (`int`, 96),
        depths (`tuple[int]`, (2, 2, 6, 2)), num_heads (`tuple[int]`, (4, 8, 16, 32)), mlp_ratio (`float`, 4.0),
        qkv_bias (`bool`, True), hidden_dropout_prob (`float`, 0.0), attention_probs_dropout_prob (`float`, 0.0),
        drop_path_rate (`float`, 0.1), layer_norm_eps (`float`, 1e-5), initializer_range (`float`, 0.02).

    Head:
        use_token_semantic_head (`bool`, True): the token-semantic Conv2d head giving per-class activations over
            time (needed for sound event detection). False is the paper's "H" ablation: pooled tokens -> linear.

    Training-time augmentation inside the model (active only in `model.train()`):
        spec_augment (`bool`, True), time_mask_width (`int`, 64), num_time_masks (`int`, 2),
        freq_mask_width (`int`, 8), num_freq_masks (`int`, 2).

    Inputs longer than one window:
        long_input_hop_seconds (`float`, 5.0): hop between the overlapping `clip_seconds` windows that a longer
            input is cut into; every frame is covered and the windows' outputs are stitched back in time.
    """

    model_type = "htsat"

    sampling_rate: int = 32000
    n_fft: int = 1024
    hop_length: int = 320
    num_mel_bins: int = 64
    f_min: float = 50.0
    f_max: float = 14000.0
    clip_seconds: float = 10.0

    spec_size: int = 256
    patch_size: int = 4
    patch_stride: int = 4
    window_size: int = 8
    embed_dim: int = 96
    depths: list[int] | tuple[int, ...] = (2, 2, 6, 2)
    num_heads: list[int] | tuple[int, ...] = (4, 8, 16, 32)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    use_token_semantic_head: bool = True

    spec_augment: bool = True
    time_mask_width: int = 64
    num_time_masks: int = 2
    freq_mask_width: int = 8
    num_freq_masks: int = 2

    long_input_hop_seconds: float = 5.0

    problem_type: str | None = "multi_label_classification"

    def __post_init__(self, **kwargs):
        check_id2label(self.id2label)  # before Transformers turns its keys into ints
        if self.id2label is None and kwargs.get("num_labels") is None:
            kwargs["num_labels"] = AUDIOSET_NUM_LABELS
        super().__post_init__(**kwargs)
        if self.id2label is not None and not self.label2id:
            self.label2id = {label: index for index, label in self.id2label.items()}
        self.validate_types()
        self.depths = list(self.depths)
        self.num_heads = list(self.num_heads)
        self.validate_architecture()

    def to_diff_dict(self) -> dict:
        """Keeps the labels even when they look like Transformers' default (2 labels): HTS-AT's default is AudioSet's
        527, so a saved 2-label config without them would load with 527."""
        diff = super().to_diff_dict()
        if "id2label" not in diff and self.id2label is not None:
            diff["id2label"] = {str(index): label for index, label in self.id2label.items()}
            diff["label2id"] = dict(self.label2id)
        return diff

    # ----------------------------------------------------------------------------------------------- derived sizes
    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def hidden_sizes(self) -> list[int]:
        """Width of each stage: `embed_dim` doubling after every patch merging."""
        return [self.embed_dim * 2**i for i in range(self.num_stages)]

    @property
    def hidden_size(self) -> int:
        """Width of the last stage (the pooled embedding size)."""
        return self.hidden_sizes[-1]

    @property
    def freq_ratio(self) -> int:
        """How many time chunks are stacked along the frequency axis of the image (256 // 64 = 4)."""
        return self.spec_size // self.num_mel_bins

    @property
    def image_frames(self) -> int:
        """Frames of one folded spectrogram image (256 * 4 = 1024)."""
        return self.spec_size * self.freq_ratio

    @property
    def patch_grid_size(self) -> int:
        """Token grid side after patch embedding (256 / 4 = 64)."""
        return (self.spec_size + 2 * self.patch_padding - self.patch_size) // self.patch_stride + 1

    @property
    def patch_padding(self) -> int:
        return (self.patch_size - self.patch_stride) // 2

    def stage_grid_size(self, stage: int) -> int:
        return self.patch_grid_size // 2**stage

    def stage_window_size(self, stage: int) -> int:
        """Attention window of a stage: clipped to the grid when the grid is not larger than the window."""
        return min(self.window_size, self.stage_grid_size(stage))

    @property
    def token_steps(self) -> int:
        """Time steps of the token-semantic map for one window (8 tokens x 4 chunks = 32 per 10 s)."""
        return self.stage_grid_size(self.num_stages - 1) * self.freq_ratio

    @property
    def clip_frames(self) -> int:
        """Spectrogram frames of one `clip_seconds` window (centred STFT: 10 s at hop 320 gives 1001)."""
        return int(round(self.clip_seconds * self.sampling_rate / self.hop_length)) + 1

    # ------------------------------------------------------------------------------------------------- validation
    def validate_types(self) -> None:
        """Raise a ValueError naming the setting when a setting has the wrong type or is out of its range (a string
        `embed_dim`, an int `num_heads`, a NaN duration, a missing `num_mel_bins`), before they are combined."""
        for name, lowest in WHOLE_NUMBERS.items():
            value = getattr(self, name)
            if not is_whole_number(value) or value < lowest:
                raise ValueError(f"{name} must be a whole number >= {lowest}, got {value!r}.")
        for name in POSITIVE_NUMBERS + NON_NEGATIVE_NUMBERS + PROBABILITIES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
            if name in POSITIVE_NUMBERS and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}.")
            if name in NON_NEGATIVE_NUMBERS and not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}.")
            if name in PROBABILITIES and not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}.")
        for name in FLAGS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        for name, example in PER_STAGE.items():
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not value or not all(is_whole_number(v) for v in value):
                raise ValueError(f"{name} must be a list with one whole number per stage (e.g. {example}), got "
                                 f"{value!r}.")
        check_id2label(self.id2label)
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}.")

    def validate_architecture(self) -> None:
        """Raise a ValueError naming the setting when the settings cannot work together."""
        self.validate_types()
        if len(self.depths) != len(self.num_heads):
            raise ValueError(
                f"depths has {len(self.depths)} stages but num_heads has {len(self.num_heads)}; give one head count "
                "per stage."
            )
        if self.num_stages < 1 or min(self.depths) < 1:
            raise ValueError(f"depths={self.depths}: every stage needs at least one block.")
        for stage, (width, heads) in enumerate(zip(self.hidden_sizes, self.num_heads)):
            if heads < 1 or width % heads != 0:
                raise ValueError(
                    f"num_heads[{stage}]={heads} does not divide the width of stage {stage} "
                    f"(embed_dim * 2**{stage} = {width}); choose a divisor of {width}."
                )
        if self.num_mel_bins < 1 or self.spec_size % self.num_mel_bins != 0:
            raise ValueError(
                f"num_mel_bins={self.num_mel_bins} does not fold into the spec_size={self.spec_size} image: spec_size "
                "must be a multiple of num_mel_bins (the time axis is cut into spec_size // num_mel_bins chunks "
                "stacked along frequency)."
            )
        if self.patch_size < self.patch_stride or (self.patch_size - self.patch_stride) % 2:
            raise ValueError(
                f"patch_size={self.patch_size} with patch_stride={self.patch_stride}: the patch must be at least the "
                "stride and exceed it by an even number (symmetric padding)."
            )
        grid = self.patch_grid_size
        if grid % 2 ** (self.num_stages - 1) != 0:
            raise ValueError(
                f"spec_size={self.spec_size} with patch_stride={self.patch_stride} gives a {grid}x{grid} token grid "
                f"that {self.num_stages - 1} patch mergings cannot halve evenly; change spec_size or depths."
            )
        for stage in range(self.num_stages):
            size = self.stage_grid_size(stage)
            if size > self.window_size and size % self.window_size != 0:
                raise ValueError(
                    f"window_size={self.window_size} does not tile the {size}x{size} token grid of stage {stage}; "
                    "choose a window that divides it."
                )
        last = self.stage_grid_size(self.num_stages - 1)
        if self.use_token_semantic_head and last % self.freq_ratio != 0:
            raise ValueError(
                f"the last stage's {last}x{last} grid cannot be split into freq_ratio={self.freq_ratio} time chunks "
                "for the token-semantic head; change spec_size, num_mel_bins or depths."
            )
        if self.clip_frames > self.image_frames:
            raise ValueError(
                f"one clip_seconds={self.clip_seconds} window is {self.clip_frames} frames (sampling_rate="
                f"{self.sampling_rate}, hop_length={self.hop_length}), more than the {self.image_frames} frames that "
                f"the spec_size={self.spec_size} image holds with num_mel_bins={self.num_mel_bins} (spec_size // "
                f"num_mel_bins = {self.freq_ratio} chunks of {self.spec_size} frames); use fewer num_mel_bins "
                "(64, as the paper), a larger spec_size or a shorter clip_seconds."
            )
        if not 0 < self.long_input_hop_seconds <= self.clip_seconds:
            raise ValueError(
                f"long_input_hop_seconds={self.long_input_hop_seconds} must be in (0, clip_seconds={self.clip_seconds}]."
            )
        # f_max above Nyquist is allowed: the original Speech Commands model runs 16 kHz audio with f_max 14 kHz.
        if self.f_min < 0 or self.f_min >= self.f_max:
            raise ValueError(f"f_min={self.f_min}, f_max={self.f_max} must satisfy 0 <= f_min < f_max.")
        if not math.isfinite(self.mlp_ratio) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio={self.mlp_ratio} must be positive.")


HTSATConfig.register_for_auto_class()

__all__ = ["HTSATConfig"]

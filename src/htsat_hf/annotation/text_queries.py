"""Phrases instead of labels (#31): a CLAP model (`HTSATClapModel`) asked about fixed phrases, for the annotator, the
live detector and their commands.

The phrases reach them as stage 1's text-query module (`modeling_htsat_clap.text_query_model`), which has the
interface of an `HTSATForSoundEventDetection` whose labels are the phrases: `htsat` (the audio tower, which the
annotator and the live detector run on their own windows), `classifier(tokens)` (calibrated step logits, the same
`token_step_logits` as the SED pipeline's forward), `clip_logits(pooled)` (a window's or an input's calibrated clip
logits from its pooled embedding) and `joint_embedding(pooled)` (CLAP's normalised audio embedding). So the rows,
live scores and events for phrases come out of the same stitching and post-processing code as those for labels.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..modeling_htsat_clap import DEFAULT_TEMPLATE
from .sources import listed_lines

# The text-query options, with the SED pipeline's names (`pipeline_htsat.TEXT_QUERY_ARGUMENTS`) and defaults
# (`HTSATClapModel.text_query`); `text_labels` are the pipeline's `candidate_labels`.
TEXT_QUERY_DEFAULTS = dict(hypothesis_template=DEFAULT_TEMPLATE, calibration="softmax", background_label=None,
                           calibration_bias=0.0)


def read_phrases(text_labels: str | os.PathLike | Iterable[str]) -> list[str]:
    """Phrases as given: a list of phrases; or a path (a `PathLike`, or a string naming an existing file) of a text
    file with one phrase per line (blank lines and lines starting with '#' are skipped); or one phrase."""
    if isinstance(text_labels, os.PathLike) or (isinstance(text_labels, str) and Path(text_labels).is_file()):
        phrases = listed_lines(Path(text_labels).read_text(encoding="utf-8"))
        if not phrases:
            raise ValueError(f"The phrase file {text_labels} holds no phrases (one per line).")
        return phrases
    if isinstance(text_labels, str):
        return [text_labels]
    return [str(phrase) for phrase in text_labels]


def is_clap(model: Any) -> bool:
    """An `HTSATClapModel` (also loaded as remote code): it answers phrases, not labels."""
    return hasattr(model, "text_query") and hasattr(model, "get_text_features")


def is_text_query(model: Any) -> bool:
    """A CLAP model asked about phrases (`HTSATClapTextQuery`)."""
    return hasattr(model, "clip_logits") and hasattr(model, "phrase_embeds")


def text_query_for(model: Any, text_labels: Any, feature_extractor: Any = None, *, tokenizer: Any = None,
                   device: Any = None, trust_remote_code: bool = False, **options: Any) -> tuple[Any, Any]:
    """
    (model, feature_extractor) for the annotator or live detector: with `text_labels`, the CLAP model (a folder or
    Hub id, or a loaded `HTSATClapModel`) asked about them (`HTSATClapModel.text_query` with `options`:
    hypothesis_template, calibration, background_label, calibration_bias) and its feature extractor (the folder's,
    or the model's own `HTSATClapFeatureExtractor`); without them, what was given, unchanged. A CLAP model without
    phrases, or phrases for a label model, is a ValueError saying what to pass.
    """
    unknown = sorted(set(options) - set(TEXT_QUERY_DEFAULTS))
    if unknown:
        raise TypeError(f"Unknown text-query options {unknown}; they are {sorted(TEXT_QUERY_DEFAULTS)}.")
    given = {key: value for key, value in options.items() if value is not None}
    if text_labels is None:
        if given:
            raise ValueError(f"{', '.join(sorted(given))}: these go with text_labels (phrases for a CLAP model).")
        if is_clap(model) or _is_clap_folder(model, trust_remote_code):
            raise ValueError("A CLAP model (HTSATClapModel) detects the phrases it is given: pass text_labels "
                             "(phrases, or a file of them one per line; --text_labels on the command line).")
        return model, feature_extractor
    phrases = read_phrases(text_labels)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        name = str(model)
        if not _is_clap_folder(name, trust_remote_code):
            raise ValueError(f"text_labels need a CLAP model (HTSATClapModel); {name} is not one.")
        from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer

        model = AutoModel.from_pretrained(name, trust_remote_code=trust_remote_code)
        if feature_extractor is None:
            feature_extractor = AutoFeatureExtractor.from_pretrained(name, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(name)
        if device is None and torch.cuda.is_available():
            model = model.to("cuda")
    if not is_clap(model):
        raise ValueError(f"text_labels need a CLAP model (HTSATClapModel), not {type(model).__name__}.")
    if feature_extractor is None:
        from ..feature_extraction_htsat_clap import HTSATClapFeatureExtractor

        feature_extractor = HTSATClapFeatureExtractor.for_model_config(model.config.audio_config)
    if device is not None:
        model = model.to(device)
    settings = {**TEXT_QUERY_DEFAULTS, **given}
    query = model.eval().text_query(phrases, tokenizer, **settings)
    return query, feature_extractor


def text_query_settings(model: Any) -> dict | None:
    """What decides the rows for phrases (a run's manifest records it, so that resuming with other phrases or
    calibration is refused): the phrases and their options; None for a label model."""
    query = getattr(model, "query", None)
    return dict(query) if is_text_query(model) and isinstance(query, Mapping) else None


def _is_clap_folder(model: Any, trust_remote_code: bool) -> bool:
    if not (isinstance(model, (str, bytes)) or hasattr(model, "__fspath__")):
        return False
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return False  # the label model's loader reports what is wrong with the folder
    return getattr(config, "model_type", None) == "htsat_clap"


# ------------------------------------------------------------------------------------------------- live windows
def window_logits(member: Any, tokens: torch.Tensor) -> torch.Tensor:
    """(n, tokens, hidden) final tokens of n windows -> their step logits (n, steps, labels) through the member's
    `classifier`; for phrases with each window's own clip logits (`clip_logits` of its pooled tokens) appended as a
    last row (n, steps + 1, labels), since a CLAP window's clip logits are not the mean of its step logits."""
    steps = member.classifier(tokens)
    if not is_text_query(member):
        return steps
    return torch.cat([steps, member.clip_logits(tokens.mean(dim=1))[:, None]], dim=1)


def split_window_logits(model: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`window_logits`' rows (..., steps [+ 1], labels) -> step logits and, for phrases, the window's clip logits
    (None for a label model: its clip logits are the mean of its steps)."""
    if not is_text_query(model):
        return logits, None
    return logits[..., :-1, :], logits[..., -1, :]


# ------------------------------------------------------------------------------------------------- command line
def add_text_query_arguments(parser: argparse.ArgumentParser | Any, dashes: bool = False) -> None:
    """--text_labels and the calibration options, each also spelled with dashes (--text-labels ...; shown first with
    `dashes`, as commands/listen.py spells its options)."""
    def name(option: str) -> tuple[str, str]:
        spellings = ("--" + option, "--" + option.replace("_", "-"))
        return spellings[::-1] if dashes else spellings

    group = parser.add_argument_group("phrases (a CLAP model: HTSATClapModel)")
    group.add_argument(*name("text_labels"), dest="text_labels", nargs="+", metavar="PHRASE",
                       help="phrases to detect instead of labels, or one file of them, one per line")
    group.add_argument(*name("hypothesis_template"), dest="hypothesis_template",
                       help="how each phrase is put to the text tower "
                       f"(default {TEXT_QUERY_DEFAULTS['hypothesis_template']!r})")
    group.add_argument(*name("calibration"), dest="calibration", choices=["softmax", "sigmoid"],
                       help="softmax across the phrases (default) or sigmoid per phrase")
    group.add_argument(*name("background_label"), dest="background_label", metavar="PHRASE",
                       help='a phrase for what is none of them, e.g. "background noise"')
    group.add_argument(*name("calibration_bias"), dest="calibration_bias", type=float,
                       help="added to sigmoid logits (default 0)")


def text_query_from_arguments(args: argparse.Namespace) -> dict:
    """The Annotator / LiveDetector keyword arguments of `add_text_query_arguments`' options."""
    text_labels = args.text_labels
    if text_labels is not None and len(text_labels) == 1:
        text_labels = text_labels[0]  # one phrase, or a file of them (`read_phrases`)
    return dict(text_labels=text_labels, **{key: getattr(args, key) for key in TEXT_QUERY_DEFAULTS})


__all__ = ["TEXT_QUERY_DEFAULTS", "add_text_query_arguments", "is_clap", "is_text_query", "read_phrases",
           "split_window_logits", "text_query_for", "text_query_from_arguments", "text_query_settings", "window_logits"]

"""A CLAP folder in Transformers' layout (`ClapModel` weights and config, `ClapFeatureExtractor`, RoBERTa tokenizer,
e.g. a local copy of `laion/clap-htsat-unfused`) -> an htsat-hf folder (`HTSATClapModel`, `HTSATClapFeatureExtractor`,
the same tokenizer) that the Auto classes, the pipelines and `trust_remote_code=True` load.

Command line: `htsat-hf convert-clap CLAP_DIR OUTPUT_DIR` (`commands/convert_clap.py`).
"""

from __future__ import annotations

from pathlib import Path

from ..feature_extraction_htsat_clap import HTSATClapFeatureExtractor
from ..modeling_htsat_clap import HTSATClapModel


def convert_clap_folder(clap_dir: str | Path, output_dir: str | Path, allow_pickle: bool = False) -> HTSATClapModel:
    """Writes `output_dir` from the CLAP folder `clap_dir` (see the module); returns the model."""
    from transformers import AutoTokenizer, ClapFeatureExtractor

    clap_dir = Path(clap_dir)
    clap_extractor = ClapFeatureExtractor.from_pretrained(clap_dir)
    model = HTSATClapModel.from_clap(clap_dir, clap_extractor, allow_pickle=allow_pickle)
    model.save_pretrained(output_dir)
    HTSATClapFeatureExtractor.from_clap_feature_extractor(clap_extractor).save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(clap_dir).save_pretrained(output_dir)
    return model


__all__ = ["convert_clap_folder"]

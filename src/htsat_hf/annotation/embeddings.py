"""The embeddings the annotator stores: of the whole input (`embedding`) and of each window with its span
(`window_embeddings`). A label model's are its pooled latent (the mean of the final tokens); a CLAP model asked about
phrases (`text_queries.py`) stores CLAP's joint-space audio embedding instead (the same mean tokens through the audio
projection, L2-normalised: `get_audio_features`), comparable with its text embeddings, which is what `search.py`
ranks."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .text_queries import is_text_query


def stored_embeddings(model: Any, pooled: torch.Tensor) -> np.ndarray:
    """(..., hidden) mean tokens -> the float32 embeddings stored for them: as they are for a label model, CLAP's
    joint-space ones for phrases."""
    if is_text_query(model):
        with torch.inference_mode():
            parameter = next(model.parameters())
            pooled = model.joint_embedding(pooled.to(parameter.device, parameter.dtype)).float().cpu()
    return pooled.numpy().astype(np.float32)


def window_embedding_rows(model: Any, pooled: list[torch.Tensor], starts: list[int], duration: float,
                          windowed: bool) -> list[dict]:
    """Each window's {onset, offset, embedding}: the windows the input's clip results come from, `pooled` their mean
    tokens and `starts` their start frames. A windowed input's window k spans [start_k, start_k + clip_seconds) in
    seconds (the last ends with the input); an input of one window spans the whole input."""
    config = model.config
    embeddings = stored_embeddings(model, torch.stack(pooled))
    rows = []
    for start, embedding in zip(starts, embeddings):
        onset = start * config.hop_length / config.sampling_rate if windowed else 0.0
        offset = min(duration, onset + config.clip_seconds) if windowed else duration
        rows.append({"onset": onset, "offset": offset, "embedding": embedding.tolist()})
    return rows


__all__ = ["stored_embeddings", "window_embedding_rows"]

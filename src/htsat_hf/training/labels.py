"""Label spaces: turning a dataset's label cells (class index, name, list of names or MIDs, comma-joined string)
into class indices (single-label) or multi-hot vectors (multi-label)."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MID_PATTERN = re.compile(r"^/[a-z]/[0-9a-z_]+$")


class LabelError(ValueError):
    """A label cell that is missing, malformed, or names a class that is not in the label space."""


def normalize_name(name: str) -> str:
    """Case-, space- and underscore-insensitive key: "Electric_guitar" and "electric guitar" match."""
    return " ".join(str(name).replace("_", " ").split()).lower()


@dataclass
class LabelSpace:
    """
    The classes of a task and how to read label cells.

    names: class names in index order (become `config.id2label`).
    multi_label: cells hold several labels; encoded as float32 multi-hot vectors (else int class indices).
    separator: split string cells on it when `multi_label` (FSD50K / DESED weak labels: "Dog,Bark").
    aliases: extra spellings -> index (e.g. AudioSet MIDs "/m/09x0r"); names and their normalised forms always work.
    """

    names: list[str]
    multi_label: bool = False
    separator: str = ","
    aliases: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.names:
            raise LabelError("The label space is empty: no class names were found or given.")
        if len(set(self.names)) != len(self.names):
            duplicates = sorted({n for n in self.names if self.names.count(n) > 1})
            raise LabelError(f"Duplicate class names {duplicates[:10]}.")
        self._lookup: dict[str, int] = {}
        for index, name in enumerate(self.names):
            self._lookup.setdefault(normalize_name(name), index)
        for alias, index in self.aliases.items():
            self._lookup.setdefault(normalize_name(alias), int(index))
        for index, name in enumerate(self.names):
            self._lookup[name] = index
        for alias, index in self.aliases.items():
            self._lookup.setdefault(alias, int(index))

    @property
    def num_labels(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.names)}

    @property
    def problem_type(self) -> str:
        return "multi_label_classification" if self.multi_label else "single_label_classification"

    def index_of(self, token: Any) -> int:
        """Class index of one label: an int index, a name (any case / `_` vs space) or an alias (MID)."""
        if isinstance(token, (bool, np.bool_)):
            raise LabelError(f"label {token!r} is a boolean, not a class")
        if isinstance(token, (int, np.integer)):
            if not 0 <= int(token) < self.num_labels:
                raise LabelError(f"class index {int(token)} is outside [0, {self.num_labels})")
            return int(token)
        if isinstance(token, str):
            text = token.strip()
            if text in self._lookup:
                return self._lookup[text]
            if normalize_name(text) in self._lookup:
                return self._lookup[normalize_name(text)]
            raise LabelError(f"unknown label {token!r} (not one of the {self.num_labels} classes{self._hint()})")
        raise LabelError(f"label {token!r} has unsupported type {type(token).__name__}")

    def _hint(self) -> str:
        return f", e.g. {self.names[:3]}" if self.num_labels > 3 else f": {self.names}"

    def tokens(self, cell: Any) -> list[Any]:
        """The individual labels of one cell; raises `LabelError` for a missing/empty cell."""
        if cell is None or (isinstance(cell, float) and np.isnan(cell)):
            raise LabelError("missing label")
        if isinstance(cell, str):
            parts = [cell]
            if self.multi_label and self.separator:
                parts = cell.split(self.separator)
            parts = [p.strip() for p in parts if p.strip()]
        elif isinstance(cell, (list, tuple, np.ndarray)):
            parts = [p.strip() if isinstance(p, str) else p for p in list(cell)]
            parts = [p for p in parts if not (isinstance(p, str) and not p)]
            if len(parts) > 1 and not self.multi_label:
                raise LabelError(f"{len(parts)} labels {parts[:5]} for a single-label task (pass --multi_label True)")
        else:
            parts = [cell]
        if not parts:
            raise LabelError("empty label")
        return parts

    def encode(self, cell: Any) -> int | np.ndarray:
        """A cell -> class index (single-label) or float32 multi-hot vector (multi-label)."""
        indices = [self.index_of(token) for token in self.tokens(cell)]
        if not self.multi_label:
            return indices[0]
        target = np.zeros(self.num_labels, dtype=np.float32)
        target[indices] = 1.0
        return target

    def indices(self, cell: Any) -> list[int]:
        """The class indices of a cell (for the class-balanced sampler)."""
        return sorted({self.index_of(token) for token in self.tokens(cell)})


def read_label_csv(path: str | Path) -> tuple[list[str], dict[str, int]]:
    """
    Read a class list: AudioSet's `class_labels_indices.csv` (header `index,mid,display_name`) or a header-less
    `index,name,mid` vocabulary (FSD50K's `vocabulary.csv`). Returns (names in index order, MID -> index).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--label_csv {path} does not exist.")
    with path.open(newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row and any(cell.strip() for cell in row)]
    if not rows:
        raise LabelError(f"{path} is empty.")
    header = [cell.strip().lower() for cell in rows[0]]
    if "mid" in header or "display_name" in header or "index" in header:
        rows = rows[1:]
    entries: list[tuple[int, str, str | None]] = []
    for line, row in enumerate(rows, start=2 if header else 1):
        cells = [cell.strip() for cell in row]
        index_cells = [c for c in cells if c.isdigit()]
        mids = [c for c in cells if MID_PATTERN.match(c)]
        names = [c for c in cells if c not in index_cells and c not in mids]
        if len(index_cells) != 1 or len(names) != 1:
            raise LabelError(f"{path}, line {line}: expected `index,mid,display_name` or `index,name,mid`, got {row}.")
        entries.append((int(index_cells[0]), names[0], mids[0] if mids else None))
    entries.sort()
    if [e[0] for e in entries] != list(range(len(entries))):
        raise LabelError(f"{path}: class indices must be 0..{len(entries) - 1} without gaps.")
    return [e[1] for e in entries], {e[2]: e[0] for e in entries if e[2]}


def infer_names(cells: Iterable[Any], multi_label: bool, separator: str = ",") -> list[str]:
    """Class names from the label cells of a split: sorted unique names, or "0".."max" for integer labels."""
    tokens: set[Any] = set()
    for cell in cells:
        if cell is None or (isinstance(cell, float) and np.isnan(cell)):
            continue
        if isinstance(cell, str):
            parts = cell.split(separator) if multi_label and separator else [cell]
            tokens.update(p.strip() for p in parts if p.strip())
        elif isinstance(cell, (list, tuple, np.ndarray)):
            tokens.update(p.strip() if isinstance(p, str) else p for p in cell)
        else:
            tokens.add(cell)
    tokens.discard("")
    if not tokens:
        return []
    if all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in tokens):
        return [str(i) for i in range(int(max(tokens)) + 1)]
    return sorted(str(t) for t in tokens)


def looks_multi_label(cells: Sequence[Any], separator: str = ",", known_names: Sequence[str] = ()) -> bool:
    """Auto-detection: list cells, or string cells joined by `separator` that are not themselves class names."""
    known = {normalize_name(n) for n in known_names}
    for cell in cells:
        if isinstance(cell, (list, tuple, np.ndarray)):
            return True
        if isinstance(cell, str) and separator and separator in cell and normalize_name(cell) not in known:
            return True
    return False

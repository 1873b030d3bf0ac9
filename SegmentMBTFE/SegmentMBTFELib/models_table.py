"""`segment-mbtfe models list` as text: one row per model, in columns a terminal lines up.

Long label lists are cut to fit a row (`models info NAME` shows them all); a model that cannot be used says why
in place of its details, so a broken download or a moved folder shows up here rather than at `predict`.
"""
from typing import List

from .models_home import InstalledModel, size_text

HEADER = ("NAME", "FROM", "NETWORK", "CHANNELS", "LABELS", "CONFIGURATIONS (FOLDS)", "SIZE", "FOLDER")
_LABELS_WIDTH = 40


def models_table(models: List[InstalledModel]) -> str:
    rows = [HEADER] + [_row(m) for m in models]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER) - 1)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def configurations_text(model: InstalledModel) -> str:
    """'3d_fullres (0, 1, 2, 3, 4), 2d (0)'."""
    return ", ".join(f"{c.name} ({', '.join(c.folds) or 'no folds'})" for c in model.configurations)


def _row(model: InstalledModel) -> tuple:
    if model.problem:  # why goes last, so that it does not widen the columns of the other rows
        return (model.name, model.source, "unusable", "", "", "", size_text(model.size_bytes),
                f"{model.path}  ({model.problem})")
    networks = ", ".join(dict.fromkeys(c.network for c in model.configurations))
    return (model.name, model.source, networks, ", ".join(model.channels), _labels(model.labels),
            configurations_text(model), size_text(model.size_bytes), str(model.path))


def _labels(labels: List[str]) -> str:
    text = ", ".join(labels)
    if len(text) <= _LABELS_WIDTH:
        return text
    return text[:_LABELS_WIDTH - 12].rsplit(", ", 1)[0] + f", ... ({len(labels)})"

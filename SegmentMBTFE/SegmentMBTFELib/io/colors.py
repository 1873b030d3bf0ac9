"""Segment colours: distinct, pleasant colours for label values 1..n.

A model's output is only readable when touching structures differ at a glance: the two halves of a
hippocampus as much as a hundred abdominal structures. The first colours are hand-picked, soft and of
clearly different hues. Every later colour is the candidate farthest, in CIELAB (where distance follows
perceived difference), from all colours picked before it; candidates are limited to moderate saturation
and brightness so that none is garish, near-black or near-white. The order is fixed: label k gets the
same colour whatever n is, so a model's colours do not change when it gains labels.
"""
from functools import lru_cache
from typing import List, Tuple

import numpy as np

Color = Tuple[float, float, float]

_HAND_PICKED = (
    (0.86, 0.38, 0.32),  # soft red
    (0.31, 0.60, 0.86),  # soft blue
    (0.47, 0.76, 0.40),  # green
    (0.96, 0.80, 0.31),  # gold
    (0.63, 0.46, 0.82),  # purple
    (0.30, 0.78, 0.75),  # teal
    (0.96, 0.56, 0.22),  # orange
    (0.91, 0.56, 0.76),  # pink
    (0.62, 0.46, 0.31),  # brown
    (0.76, 0.86, 0.46),  # lime
)


def segment_colors(n: int) -> List[Color]:
    """Colours (r, g, b in 0..1) for label values 1..n; they repeat only beyond several hundred labels."""
    palette = _palette()
    return [palette[i % len(palette)] for i in range(n)]


@lru_cache(maxsize=1)
def _palette() -> Tuple[Color, ...]:
    candidates = _candidates()
    chosen = [np.array(c) for c in _HAND_PICKED]
    lab = _to_lab(candidates)
    nearest = np.min([np.linalg.norm(lab - _to_lab(c[None]), axis=1) for c in chosen], axis=0)
    while nearest.max() > 0:
        index = int(np.argmax(nearest))
        chosen.append(candidates[index])
        nearest = np.minimum(nearest, np.linalg.norm(lab - lab[index], axis=1))
    return tuple(tuple(round(float(v), 4) for v in c) for c in chosen)


def _candidates() -> np.ndarray:
    """RGB colours on a hue x saturation x value grid kept away from grey, black and white."""
    hue, saturation, value = np.meshgrid(np.arange(48) / 48, (0.25, 0.4, 0.55, 0.68), (0.62, 0.75, 0.87, 0.97),
                                         indexing="ij")
    return _hsv_to_rgb(hue.ravel(), saturation.ravel(), value.ravel())


def _hsv_to_rgb(h, s, v) -> np.ndarray:
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([np.stack(x, axis=-1) for x in
                      ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return table[i, np.arange(len(h))]


def _to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..1) to CIELAB under D65."""
    rgb = np.asarray(rgb, dtype=float)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ np.array([[0.4124, 0.3576, 0.1805],
                             [0.2126, 0.7152, 0.0722],
                             [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def color_distance(a: Color, b: Color) -> float:
    """Perceived difference of two colours (CIE76 delta E; about 2.3 is just noticeable)."""
    lab = _to_lab(np.array([a, b]))
    return float(np.linalg.norm(lab[0] - lab[1]))

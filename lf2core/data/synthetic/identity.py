"""The appearance of one synthetic person: its attributes drawn from a domain's palettes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .styles import (BAGS, COLOUR_NAMES, COLOUR_RGB, HAIR, HAIR_STYLES, KNOBS, LOWER_TYPES, SKIN, UPPER_PATTERNS,
                     DomainStyle, Knobs, colour_weights)


@dataclass
class Identity:
    """Appearance attributes of one person (RGB colours in [0, 1], float32 [3])."""

    skin: np.ndarray
    hair: np.ndarray
    hair_style: str
    upper: np.ndarray
    upper2: np.ndarray  # pattern / inner-shirt colour
    upper_pattern: str
    long_sleeves: bool
    lower: np.ndarray
    lower_type: str
    shoes: np.ndarray
    bag: str
    bag_colour: np.ndarray
    bag_side: int  # -1 = person's right (image left in front view), +1 = left
    hat: np.ndarray
    width: float  # build: multiplies body widths
    height: float  # build: multiplies person height
    attrs: dict[str, Any] = field(default_factory=dict)  # names, for the docs and tests


def _colour(rng: np.random.Generator, probs: np.ndarray, tint: float) -> tuple[np.ndarray, str]:
    i = int(rng.choice(len(COLOUR_NAMES), p=probs))
    c = COLOUR_RGB[i] + rng.normal(0.0, tint, 3).astype(np.float32)
    return np.clip(c, 0.02, 0.98).astype(np.float32), COLOUR_NAMES[i]


def make_identity(style: DomainStyle, rng: np.random.Generator, knobs: Knobs = KNOBS) -> Identity:
    """Draw the attributes of one person of a domain."""
    t = style.id_tint or knobs.id_tint
    upper, un = _colour(rng, style.upper_colours, t)
    upper2, u2n = _colour(rng, colour_weights(dict(style.upper2_colours)), t)
    if u2n == un:  # a pattern must be visible
        upper2 = np.clip(1.0 - upper2, 0.05, 0.95).astype(np.float32)
    lower, ln = _colour(rng, style.lower_colours, t)
    shoes, sn = _colour(rng, style.shoe_colours, t)
    bag_colour, bn = _colour(rng, style.bag_colours, t)
    hat, hn = _colour(rng, style.bag_colours, t)
    hair_i = int(rng.choice(len(HAIR), p=style.hair_p))
    skin_i = int(rng.choice(len(SKIN), p=style.skin_p))
    ident = Identity(
        skin=np.clip(SKIN[skin_i] + rng.normal(0, 0.02, 3), 0, 1).astype(np.float32),
        hair=np.clip(HAIR[hair_i] + rng.normal(0, 0.02, 3), 0, 1).astype(np.float32),
        hair_style=HAIR_STYLES[int(rng.choice(3, p=style.hair_style_p))],
        upper=upper,
        upper2=upper2,
        upper_pattern=UPPER_PATTERNS[int(rng.choice(len(UPPER_PATTERNS), p=style.upper_pattern_p))],
        long_sleeves=bool(rng.random() < style.long_sleeve_p),
        lower=lower,
        lower_type=LOWER_TYPES[int(rng.choice(3, p=style.lower_type_p))],
        shoes=shoes,
        bag=BAGS[int(rng.choice(3, p=style.bag_p))],
        bag_colour=bag_colour,
        bag_side=int(rng.choice([-1, 1])),
        hat=hat,
        width=float(rng.uniform(0.9, 1.12)),
        height=float(rng.uniform(0.94, 1.04)),
    )
    ident.attrs = {"upper": un, "upper2": u2n, "lower": ln, "shoes": sn, "bag_colour": bn, "hat": hn,
                   "hair": hair_i, "skin": skin_i}
    return ident


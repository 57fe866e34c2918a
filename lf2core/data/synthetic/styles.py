"""Attribute tables, domain styles and calibration knobs of the synthetic data (pure data, no drawing).

The tables and both ``STYLES`` are frozen with ``GENERATOR_VERSION``: changing any value changes the images.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

DOMAINS = ("a", "b")

# ------------------------------------------------------------------------------------ attribute tables
# Garment colours (sRGB in [0, 1]). Several are deliberately close (black/charcoal/navy, grey/silver,
# white/cream, beige/khaki) so identities collide unless the network looks at all body parts.
COLOURS: dict[str, tuple[float, float, float]] = {
    "black": (0.09, 0.09, 0.10),
    "charcoal": (0.22, 0.22, 0.24),
    "navy": (0.12, 0.15, 0.32),
    "grey": (0.50, 0.50, 0.52),
    "silver": (0.68, 0.68, 0.70),
    "white": (0.90, 0.90, 0.88),
    "cream": (0.90, 0.86, 0.74),
    "beige": (0.76, 0.67, 0.52),
    "khaki": (0.60, 0.56, 0.38),
    "brown": (0.40, 0.27, 0.17),
    "denim": (0.27, 0.38, 0.58),
    "skyblue": (0.50, 0.70, 0.88),
    "red": (0.72, 0.12, 0.13),
    "maroon": (0.42, 0.10, 0.14),
    "pink": (0.92, 0.60, 0.70),
    "orange": (0.90, 0.50, 0.15),
    "yellow": (0.92, 0.82, 0.25),
    "olive": (0.36, 0.40, 0.20),
    "green": (0.20, 0.55, 0.30),
    "purple": (0.45, 0.25, 0.55),
}
COLOUR_NAMES = tuple(COLOURS)
COLOUR_RGB = np.array([COLOURS[n] for n in COLOUR_NAMES], dtype=np.float32)

SKIN = np.array([[0.96, 0.80, 0.68], [0.85, 0.65, 0.50], [0.66, 0.46, 0.32], [0.42, 0.28, 0.20]], np.float32)
HAIR = np.array([[0.06, 0.05, 0.05], [0.22, 0.14, 0.08], [0.42, 0.28, 0.14], [0.80, 0.66, 0.38],
                 [0.62, 0.62, 0.62]], np.float32)
HAIR_STYLES = ("short", "long", "hat")
UPPER_PATTERNS = ("plain", "stripes", "checks", "logo", "jacket")
LOWER_TYPES = ("trousers", "shorts", "skirt")
BAGS = ("none", "backpack", "shoulder")
VIEWS = ("front", "back", "left", "right")


def colour_weights(spec: dict[str, float]) -> np.ndarray:
    """Probability vector over COLOUR_NAMES from a sparse {name: weight} dict (unlisted -> 0)."""
    w = np.array([spec.get(n, 0.0) for n in COLOUR_NAMES], dtype=np.float64)
    return w / w.sum()


@dataclass(frozen=True)
class DomainStyle:
    """Everything that makes one domain look like itself (shared by its cameras)."""

    name: str
    num_cams: int
    upper_colours: np.ndarray  # [len(COLOURS)] probabilities
    lower_colours: np.ndarray
    shoe_colours: np.ndarray
    bag_colours: np.ndarray
    skin_p: tuple[float, ...]
    hair_p: tuple[float, ...]
    hair_style_p: tuple[float, ...]
    upper_pattern_p: tuple[float, ...]
    lower_type_p: tuple[float, ...]
    long_sleeve_p: float
    bag_p: tuple[float, ...]
    light_gain: float  # global exposure
    light_cast: tuple[float, float, float]  # white balance (multiplies R, G, B)
    contrast: float  # around mid grey
    saturation: float
    lowres: float  # effective resolution divisor: edges/textures rendered band-limited (1 = sharp)
    blur: float  # extra optical blur: edge softness in pixels at 128 px height
    noise: float  # base sensor noise (std in [0, 1] units)
    background: str  # "campus" | "street"
    person_scale: tuple[float, float]  # person height / image height range
    jpeg_quality: int
    occluder_p: float
    sun: float  # directional sunlight: brightness slope across a person's body (0 = overcast)
    # --- added in v1.2 (the defaults are v1.1's values, so v1.1 is drawn exactly as before) ---
    id_tint: float = 0.0  # > 0: this domain's personal colour offset std (else Knobs.id_tint)
    upper2_colours: tuple[tuple[str, float], ...] = (("white", 3), ("black", 3), ("grey", 1), ("red", 1),
                                                     ("navy", 1), ("yellow", 1), ("skyblue", 1))
    side_views: float = 1.5  # Dirichlet weight of the left / right views in every camera's view mix
    # which images a domain holds (lf2core.data.synthetic.schedule)
    cams_per_id_p: tuple[float, ...] = (0.30, 0.30, 0.20, 0.12, 0.08, 0.05, 0.03)  # P(2, 3, ... cameras)
    frames_per_tracklet: tuple[int, int] = (1, 4)  # uniform, inclusive
    second_tracklet_p: float = 0.35  # P(a second tracklet of an identity in a camera)
    distractor_share: float = 0.08  # gallery distractors (pid 0) per test image of a person
    junk_share: float = 0.03  # junk detections (pid -1) per test image of a person


STYLES_V1_1: dict[str, DomainStyle] = {
    # a: winter-like campus. Dark, neutral clothing; long sleeves and trousers; cool, crisp light.
    "a": DomainStyle(
        name="a",
        num_cams=6,
        upper_colours=colour_weights({"black": 3, "charcoal": 2, "navy": 2.5, "grey": 2, "silver": 1, "white": 1.5,
                                "beige": 1, "brown": 2, "denim": 1.5, "red": 2, "maroon": 1.5, "olive": 1.5,
                                "green": 1.5, "purple": 0.5, "khaki": 1}),
        lower_colours=colour_weights({"black": 4, "charcoal": 2, "navy": 2, "denim": 3, "grey": 2, "khaki": 1.5,
                                "brown": 1.5, "beige": 1, "olive": 1, "maroon": 0.5, "green": 0.5}),
        shoe_colours=colour_weights({"black": 5, "brown": 2, "white": 2, "grey": 1.5, "navy": 1}),
        bag_colours=colour_weights({"black": 4, "charcoal": 2, "navy": 2, "grey": 1.5, "brown": 1.5, "red": 1,
                              "olive": 1}),
        skin_p=(0.45, 0.30, 0.15, 0.10),
        hair_p=(0.40, 0.30, 0.15, 0.10, 0.05),
        hair_style_p=(0.45, 0.30, 0.25),
        upper_pattern_p=(0.80, 0.05, 0.03, 0.07, 0.05),
        lower_type_p=(0.85, 0.05, 0.10),
        long_sleeve_p=0.85,
        bag_p=(0.45, 0.35, 0.20),
        light_gain=0.95,
        light_cast=(0.97, 1.0, 1.05),
        contrast=1.05,
        saturation=0.95,
        lowres=1.0,
        blur=0.2,
        noise=0.015,
        background="campus",
        person_scale=(0.74, 0.90),
        jpeg_quality=92,
        occluder_p=0.06,
        sun=0.0,
    ),
    # b: summer-like street. Lighter, more colourful clothing; short sleeves, shorts, skirts; warm sun,
    # lower contrast, low resolution (upsampled) and stronger compression.
    "b": DomainStyle(
        name="b",
        num_cams=5,
        upper_colours=colour_weights({"white": 3, "cream": 1.5, "silver": 1.5, "grey": 1.5, "black": 1.5, "skyblue": 2,
                                "pink": 2, "yellow": 1.5, "orange": 1.5, "green": 1.5, "red": 1.5, "navy": 1,
                                "purple": 1.5, "beige": 1, "denim": 1}),
        lower_colours=colour_weights({"denim": 3, "black": 2, "khaki": 2, "beige": 1.5, "white": 1.5, "grey": 1.5,
                                "navy": 1.5, "skyblue": 1, "red": 0.5, "pink": 0.5}),
        shoe_colours=colour_weights({"white": 5, "black": 2, "grey": 2, "beige": 1, "skyblue": 0.5, "red": 0.5}),
        bag_colours=colour_weights({"black": 2, "beige": 2, "brown": 2, "pink": 1, "skyblue": 1, "white": 1,
                              "grey": 1, "red": 1}),
        skin_p=(0.35, 0.35, 0.20, 0.10),
        hair_p=(0.45, 0.30, 0.15, 0.07, 0.03),
        hair_style_p=(0.45, 0.40, 0.15),
        upper_pattern_p=(0.30, 0.25, 0.15, 0.25, 0.05),
        lower_type_p=(0.50, 0.30, 0.20),
        long_sleeve_p=0.15,
        bag_p=(0.45, 0.30, 0.25),
        light_gain=1.05,
        light_cast=(1.14, 1.0, 0.80),
        contrast=0.72,
        saturation=1.20,
        lowres=2.2,
        blur=0.2,
        noise=0.02,
        background="street",
        person_scale=(0.88, 1.00),
        jpeg_quality=75,
        occluder_p=0.06,
        sun=0.35,
    ),
}


# v1.2: the target's density and test split in Market-1501's proportions (~17 training images per identity
# seen by ~4.3 of 6 cameras; the gallery holds ~3 images per query and distractors = 17 % of the test identity
# images: Market has 12,936 / 751 training images, 3,368 queries, 13,115 identity + 2,798 distractor gallery
# images), and a bigger domain-level shift in WHICH cues identify a person: in a identities differ mostly by
# garment colour (plain tops, wide dark palette, strong personal tint); in b tops are light and alike
# (narrow palette, small tint) and identities differ by pattern, second colour, build and bag (cues the
# source never needed), seen more often from the side and at a lower resolution. Calibrated with
# bench/synth_calibrate.py only (docs/synthetic.md).
_MARKET_SHAPE = dict(cams_per_id_p=(0.08, 0.17, 0.30, 0.25, 0.20), frames_per_tracklet=(1, 5),
                     second_tracklet_p=0.35, distractor_share=0.17, junk_share=0.03)
STYLES_V1_2: dict[str, DomainStyle] = {
    "a": replace(STYLES_V1_1["a"], id_tint=0.13, **_MARKET_SHAPE),
    "b": replace(
        STYLES_V1_1["b"],
        num_cams=6,
        upper_colours=colour_weights({"white": 4, "cream": 2, "silver": 2, "grey": 1.5, "beige": 1.5,
                                      "skyblue": 1.5, "black": 1}),
        lower_colours=colour_weights({"denim": 4, "khaki": 2, "beige": 2, "black": 1.5, "grey": 1}),
        upper2_colours=(("red", 2), ("navy", 2), ("green", 1.5), ("orange", 1.5), ("purple", 1.5), ("black", 2),
                        ("yellow", 1), ("pink", 1)),
        upper_pattern_p=(0.20, 0.30, 0.20, 0.25, 0.05),
        id_tint=0.06,
        side_views=3.0,
        lowres=2.6,
        **_MARKET_SHAPE,
    ),
}
VERSIONS = ("1.1", "1.2")
STYLES_BY_VERSION = {"1.1": STYLES_V1_1, "1.2": STYLES_V1_2}
STYLES = STYLES_V1_2  # the current version's (GENERATOR_VERSION)


# Calibration knobs (frozen with GENERATOR_VERSION; see bench/synth_calibrate.py and docs/synthetic.md).
@dataclass(frozen=True)
class Knobs:
    id_tint: float = 0.13  # std of an identity's personal offset of each garment colour (RGB units)
    shot_gain: tuple[float, float] = (0.90, 1.10)  # per-tracklet illumination range
    shot_tint: float = 0.02  # per-tracklet colour cast std
    cam_gain: float = 0.06  # per-camera gain spread (std, relative)
    cam_cast: float = 0.03  # per-camera colour cast spread (std per channel)
    cam_blur: float = 0.4  # per-camera extra edge softness (pixels at 128 px height, uniform up to this)
    cam_noise: float = 0.01  # per-camera extra noise (uniform up to this)
    cam_bg: float = 0.04  # per-camera background colour spread within the domain's style
    shift: float = 0.06  # horizontal shift of the person (fraction of width, uniform +-)
    crop: float = 0.04  # vertical crop jitter (fraction of person height)
    other_person_p: float = 0.35  # fraction of occluders that are another pedestrian


KNOBS = Knobs()

"""Findings drawn into a synthetic patient, each in the anatomy where it belongs.

A finding is a function draw(scene, rng) -> its parameters (plain JSON values), or None when it found
no place. It locates itself from the label map, writes HU into scene.hu and its code into
scene.finding_mask, and never paints over another finding. FINDINGS is also the drawing order:
cardiomegaly reshapes the heart before the pericardium is filled; fluid and opacities take lung
before nodules look for aerated lung, and emphysema spares the nodule; devices come last.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage, spatial

from .anatomy import LUNG_LOBES, in_labels

LOBES = {  # label name -> how a report names it
    "lung_upper_lobe_right": "right upper lobe",
    "lung_middle_lobe_right": "right middle lobe",
    "lung_lower_lobe_right": "right lower lobe",
    "lung_upper_lobe_left": "left upper lobe",
    "lung_lower_lobe_left": "left lower lobe",
}
SIDES = {
    "right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
}
LOWER_LOBES = {"right": "lung_lower_lobe_right", "left": "lung_lower_lobe_left"}
MIRRORED_LOBES = {  # the other lung's nearest lobe (the lingula, in the left upper lobe, mirrors the middle lobe)
    "lung_upper_lobe_right": "lung_upper_lobe_left",
    "lung_middle_lobe_right": "lung_upper_lobe_left",
    "lung_lower_lobe_right": "lung_lower_lobe_left",
    "lung_upper_lobe_left": "lung_upper_lobe_right",
    "lung_lower_lobe_left": "lung_lower_lobe_right",
}
GRADES = ("small", "moderate", "large")
CTRATE_LABELS = (
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion", "Mosaic attenuation pattern",
    "Peribronchial thickening", "Consolidation", "Bronchiectasis", "Interlobular septal thickening",
)
UNLABELLED = 0  # label of tissue the map does not name: mediastinal fat, chest wall
IN_PLANE = np.array([[[0, 1, 0], [1, 1, 1], [0, 1, 0]]], bool)  # 4-neighbours within a slice


@dataclass
class Scene:
    """A patient being drawn: HU, anatomy labels and finding codes on one [k, j, i] grid."""

    hu: np.ndarray  # float32, edited in place
    labels: np.ndarray  # uint8 anatomy ids
    spacing: np.ndarray  # mm along k, j, i
    names: dict[str, int]  # structure name -> label id
    finding_mask: np.ndarray = field(init=False)
    _masks: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.finding_mask = np.zeros(self.labels.shape, np.uint8)

    def mask(self, *structures: str) -> np.ndarray:
        """Voxels labelled as any of `structures` (cached until labels_changed)."""
        key = tuple(sorted(structures))
        if key not in self._masks:
            self._masks[key] = in_labels(self.labels, [self.names[s] for s in structures])
        return self._masks[key]

    def labels_changed(self) -> None:
        self._masks.clear()

    def ids(self, *structures: str) -> list[int]:
        return [self.names[s] for s in structures]

    def paint(self, box: tuple[slice, ...], alpha: np.ndarray, value, code: int) -> int:
        """Blend `value` in with weight `alpha` where no other finding is; returns voxels now marked."""
        alpha = alpha * (self.finding_mask[box] == 0)
        hu = self.hu[box]
        hu += alpha * (value - hu)
        marked = alpha >= 0.5
        self.finding_mask[box][marked] = code
        return int(marked.sum())

    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000


@dataclass(frozen=True)
class Finding:
    name: str
    ctrate_label: str  # the CT-RATE label it sets to 1
    parsed_as: str  # the name ctflow.report reads it by (report.FINDING_CODE_NAMES)
    prior: float  # chance a patient has it
    draw: Callable[..., dict | None]  # (scene, rng) -> parameters, or None when it cannot be drawn in him
    sided: bool = False  # draw also takes side="right" | "left" to force the side it lies on
    lobed: bool = False  # draw also takes lobe=<a LOBES label> to force the lobe it lies in
    measured: Callable[[Scene], dict] | None = None  # (scene) -> what a report may state when it is absent (no draws)


# ---------------------------------------------------------------- shared geometry


def _box(scene: Scene, centre, radius_mm) -> tuple[tuple[slice, ...], list[np.ndarray]]:
    """Slices of the box around `centre` (voxels) reaching `radius_mm`, and open mm-offset grids."""
    centre = np.round(np.asarray(centre)).astype(int)
    reach = np.ceil(np.broadcast_to(radius_mm, 3) / scene.spacing).astype(int)
    low = np.maximum(0, centre - reach)
    high = np.minimum(scene.hu.shape, centre + reach + 1)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    offsets = []
    for axis, (a, b) in enumerate(zip(low, high)):
        shape = [1, 1, 1]
        shape[axis] = b - a
        offsets.append(((np.arange(a, b) - centre[axis]) * scene.spacing[axis]).reshape(shape).astype(np.float32))
    return box, offsets


def _ellipsoid(offsets: list[np.ndarray], radii_mm, edge_mm: float = 1.0, wobble: np.ndarray | float = 0.0) -> np.ndarray:
    """Soft-edged ellipsoid weight (1 inside, 0 outside, a ramp of `edge_mm`); `wobble` bumps the surface."""
    radii = np.broadcast_to(np.asarray(radii_mm, dtype=np.float32), 3)
    rho = np.sqrt(sum((o / r) ** 2 for o, r in zip(offsets, radii))) * (1 + wobble)
    return np.clip((1 - rho) * radii.min() / edge_mm + 0.5, 0, 1)


def _noise(rng: np.random.Generator, shape, grain_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Smooth random field of unit std with blobs about `grain_mm` across."""
    field_ = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), grain_mm / 2 / spacing, mode="wrap")
    return field_ / max(float(field_.std()), 1e-6)


def _shape(box: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in box)


def _bounding_box(mask: np.ndarray, margin_vox=0) -> tuple[slice, ...]:
    """Slices around the True voxels of `mask`, widened by `margin_vox` (clipped to the array)."""
    margin = np.broadcast_to(margin_vox, 3)
    box = []
    for axis in range(3):
        hit = np.nonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))[0]
        box.append(slice(max(0, hit[0] - margin[axis]), min(mask.shape[axis], hit[-1] + margin[axis] + 1)))
    return tuple(box)


def _with_rim(scene: Scene, box: tuple[slice, ...], lung: np.ndarray) -> np.ndarray:
    """`lung` (a mask over `box`) plus the air-containing voxels touching it in-plane that are neither
    airway nor another lobe.

    Label edges sit up to half a voxel off the HU after resampling, and rib labels bleed into lung;
    without this rim, fluid or consolidation drawn by label leaves a dotted line of air at the pleura.
    """
    near = ndimage.binary_dilation(lung, IN_PLANE, iterations=2)
    excluded = in_labels(scene.labels[box], scene.ids("trachea", "esophagus", *LUNG_LOBES))
    return lung | (near & (scene.hu[box] < -200) & ~excluded)


def _random_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.array(np.unravel_index(rng.choice(np.flatnonzero(mask)), mask.shape))


def _interior_point(scene: Scene, region: np.ndarray, radius_mm: float, rng: np.random.Generator, tries: int = 200):
    """A voxel of `region` whose ball of `radius_mm` is aerated lung free of other findings, or None."""
    lung = scene.mask(*LUNG_LOBES)
    candidates = np.flatnonzero(region)
    for _ in range(tries):
        centre = np.array(np.unravel_index(rng.choice(candidates), region.shape))
        box, offsets = _box(scene, centre, radius_mm)
        ball = sum(o**2 for o in offsets) <= radius_mm**2
        if lung[box][ball].all() and not scene.finding_mask[box][ball].any() and scene.hu[box][ball].mean() < -600:
            return centre
    return None


def _posterior_layer(scene: Scene, lung: np.ndarray, depth_mm: float, height_mm: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """Weight of a dependent layer: the posterior `depth_mm` of `lung` (supine: posterior is down),
    full depth at the lung base, thinning to nothing `height_mm` above it.
    """
    slices = np.nonzero(lung.any(axis=(1, 2)))[0]
    base = slices[-1]
    top = max(slices[0], base - int(height_mm / scene.spacing[0]))
    box = (slice(top, base + 1), slice(None), slice(None))
    sub = _with_rim(scene, box, lung[box])
    rows = sub.shape[1]
    last_row = rows - 1 - np.argmax(sub[:, ::-1, :], axis=1)  # [k, i]: most posterior lung row
    above_base = (base - np.arange(top, base + 1)) * scene.spacing[0]
    depth = depth_mm * np.sqrt(np.clip(1 - above_base / height_mm, 0, 1))
    front = last_row - (depth / scene.spacing[1])[:, None]
    alpha = np.clip(np.arange(rows)[None, :, None] - front[:, None, :] + 0.5, 0, 1) * sub
    return box, alpha.astype(np.float32)


def _lobe_patch(scene: Scene, rng: np.random.Generator, lobe: str, radius_mm: float, edge: float):
    """A patchy, irregular region of one lobe (respecting its fissures): box, weight and centre, or None.

    `edge` is the width of the border ramp as a fraction of the radius: small for dense, sharp
    consolidation, large for hazy ground glass.
    """
    region = scene.mask(lobe) & (scene.finding_mask == 0) & (scene.hu < -600)
    if not region.any():
        return None
    centre = _random_voxel(region, rng)
    box, offsets = _box(scene, centre, radius_mm * 1.4)
    rho = np.sqrt(sum(o**2 for o in offsets)) / radius_mm
    rho = rho + 0.35 * _noise(rng, rho.shape, 12.0, scene.spacing)
    alpha = np.clip((1 - rho) / edge, 0, 1) * _with_rim(scene, box, scene.mask(lobe)[box])
    return box, alpha, centre


def mirrored(params: dict) -> dict:
    """A drawn finding's parameters on the other side: its side swapped, its lobe the other lung's nearest
    (MIRRORED_LOBES), the rest as drawn. What a report states of it then differs in the side alone (positions are
    not mirrored: no report states them)."""
    other = {"right": "left", "left": "right"}
    named = {LOBES[lobe]: LOBES[mirror] for lobe, mirror in MIRRORED_LOBES.items()}
    return {**params, **({"side": other[params["side"]]} if params.get("side") in other else {}),
            **({"lobe": named[params["lobe"]]} if params.get("lobe") in named else {})}


def _side_choice(rng: np.random.Generator) -> str:
    return str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.3, 0.3]))


def _sides(side: str) -> tuple[str, ...]:
    return ("right", "left") if side == "bilateral" else (side,)


def _grade(rng: np.random.Generator, weights=(0.45, 0.35, 0.2), names=GRADES) -> str:
    return str(rng.choice(names, p=weights))


def _xyz(point) -> list[int]:
    return [int(v) for v in point]


# ---------------------------------------------------------------- the findings


def cardiomegaly(scene: Scene, rng: np.random.Generator) -> dict:
    """Enlarge the heart about a posterior-right anchor, so it grows to the left, forwards and down,
    over lung and fat but never over bone, airway, esophagus or the great vessels."""
    heart_id = scene.names["heart"]
    k, j, i = np.nonzero(scene.mask("heart"))
    factor = rng.uniform(1.15, 1.35)
    growth = np.array([1 + (factor - 1) / 2, factor, factor])
    anchor = np.array([np.percentile(k, 40), np.percentile(j, 75), np.percentile(i, 35)])
    low = np.array([k.min(), j.min(), i.min()])
    high = np.array([k.max(), j.max(), i.max()])
    start = np.maximum(0, np.floor(anchor - (anchor - low) * growth) - 2).astype(int)
    stop = np.minimum(scene.hu.shape, np.ceil(anchor + (high - anchor) * growth) + 3).astype(int)
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    grid = np.indices(stop - start, dtype=np.float32) + start[:, None, None, None]
    source = anchor[:, None, None, None] + (grid - anchor[:, None, None, None]) / growth[:, None, None, None]
    source -= start[:, None, None, None]  # inside the box: the anchor is, and scaling towards it keeps points inside
    was_heart = scene.labels[box] == heart_id
    heartness = ndimage.map_coordinates(ndimage.gaussian_filter(was_heart.astype(np.float32), 1.0), source, order=1)
    source_hu = ndimage.map_coordinates(scene.hu[box], source, order=1)
    writable = in_labels(scene.labels[box], [UNLABELLED, heart_id, *scene.ids(*LUNG_LOBES, "pulmonary_vein", "atrial_appendage_left")])
    alpha = np.clip((heartness - 0.5) * 3 + 0.5, 0, 1) * writable  # smooth border, not label staircases
    hu = scene.hu[box]
    hu += alpha * (source_hu - hu)
    grown = (heartness >= 0.5) & writable
    scene.labels[box][grown] = heart_id
    scene.finding_mask[box][grown & ~was_heart] = CODES["cardiomegaly"]
    scene.labels_changed()
    return {"scale": round(factor, 3), "cardiothoracic_ratio": round(cardiothoracic_ratio(scene), 3)}


def normal_heart(scene: Scene) -> dict:
    """A normal heart's cardiothoracic ratio: reports state it of normal hearts too, so that the ratio named in a
    report is not by itself a sign of cardiomegaly (issue 18: "cardiothoracic ratio approximately 0.45" drew one)."""
    return {"cardiothoracic_ratio": round(cardiothoracic_ratio(scene), 3)}


def cardiothoracic_ratio(scene: Scene) -> float:
    """Widest heart over widest lungs, side to side (from projections: a robust approximation)."""

    def width(mask: np.ndarray) -> int:
        cols = np.nonzero(mask.any(axis=(0, 1)))[0]
        return int(cols[-1] - cols[0] + 1)

    return width(scene.mask("heart")) / width(scene.mask(*LUNG_LOBES))


def pericardial_effusion(scene: Scene, rng: np.random.Generator) -> dict:
    """A rim of water around the cardiac silhouette: thicker posteriorly (dependent) and towards the
    apex, tapering to nothing at the top of the heart; it displaces fat and lung, never airways."""
    grade = _grade(rng, (0.5, 0.35, 0.15))
    thickness = rng.uniform(*{"small": (4, 8), "moderate": (8, 14), "large": (14, 22)}[grade])
    heart = scene.mask("heart")
    box = _bounding_box(heart, np.ceil(1.4 * thickness / scene.spacing).astype(int))
    silhouette = np.stack([_convex_fill(plane) for plane in heart[box]])
    distance = ndimage.distance_transform_edt(~silhouette, sampling=scene.spacing)
    levels = np.nonzero(silhouette.any(axis=(1, 2)))[0]
    rows = np.nonzero(silhouette.any(axis=(0, 2)))[0]
    down = np.clip((np.arange(distance.shape[0]) - levels[0]) / (0.3 * (levels[-1] - levels[0] + 1)), 0, 1)
    down[levels[-1] + 1 :] = 0
    back = np.clip((np.arange(distance.shape[1]) - rows[0]) / max(1, rows[-1] - rows[0]), 0, 1)
    local = thickness * down[:, None, None] * (0.7 + 0.6 * back)[None, :, None]
    labels, hu = scene.labels[box], scene.hu[box]
    writable = in_labels(labels, scene.ids(*LUNG_LOBES)) | ((labels == UNLABELLED) & (hu > -500))  # not airway air
    alpha = np.clip(local - distance + 0.5, 0, 1) * (distance > 0) * writable
    scene.paint(box, alpha.astype(np.float32), rng.uniform(0, 15), CODES["pericardial_effusion"])
    return {"grade": grade, "thickness_mm": round(thickness, 1)}


def _convex_fill(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a 2-D mask, filled: the heart label leaves gaps (grooves, vessel roots)
    that belong to the cardiac silhouette, which the pericardial sac wraps as a whole."""
    points = np.argwhere(mask)
    try:
        hull = spatial.ConvexHull(points)
    except (spatial.QhullError, ValueError):  # empty, a line or a point: nothing to fill
        return mask
    pixels = np.indices(mask.shape).reshape(2, -1).T
    inside = np.all(pixels @ hull.equations[:, :2].T + hull.equations[:, 2] <= 0.5, axis=1)
    return inside.reshape(mask.shape)


def pleural_effusion(scene: Scene, rng: np.random.Generator, side: str | None = None) -> dict | None:
    """Water-density fluid layering in the posterior (dependent) pleural space, deepest at the base."""
    drawn_side = _side_choice(rng)  # drawn even when forced, so the rest of the stream stays the same
    side = side or drawn_side
    grade = _grade(rng)
    depth = rng.uniform(*{"small": (8, 16), "moderate": (18, 35), "large": (40, 70)}[grade])
    height = rng.uniform(*{"small": (40, 70), "moderate": (70, 120), "large": (120, 190)}[grade])
    fluid = rng.uniform(8, 20)
    marked = 0
    for one_side in _sides(side):
        box, alpha = _posterior_layer(scene, scene.mask(*SIDES[one_side]), depth, height)
        value = fluid + 4 * _noise(rng, alpha.shape, 6.0, scene.spacing)
        marked += scene.paint(box, alpha, value, CODES["pleural_effusion"])
    if not marked:
        return None
    return {"side": side, "grade": grade, "depth_mm": round(depth, 1), "volume_ml": round(marked * scene.voxel_ml())}


def atelectasis(scene: Scene, rng: np.random.Generator) -> dict | None:
    """Dependent (posterior basal band of aerated lower lobe) or linear (a thin plate in a lower/middle lobe)."""
    if rng.random() < 0.5:
        side = _side_choice(rng)
        for one_side in _sides(side):
            aerated = scene.mask(LOWER_LOBES[one_side]) & (scene.finding_mask == 0)
            box, alpha = _posterior_layer(scene, aerated, rng.uniform(4, 10), rng.uniform(25, 60))
            scene.paint(box, alpha * 0.9, rng.uniform(-350, -100), CODES["atelectasis"])
        return {"kind": "dependent", "side": side}
    lobe = str(rng.choice(["lung_lower_lobe_right", "lung_lower_lobe_left", "lung_middle_lobe_right"]))
    centre = _interior_point(scene, scene.mask(lobe), 6.0, rng)
    if centre is None:
        return None
    reach = rng.uniform(15, 35)
    box, offsets = _box(scene, centre, reach + 2)
    angle, tilt = rng.uniform(0, np.pi), rng.uniform(-0.3, 0.3)
    normal = np.array([tilt, np.sin(angle), np.cos(angle)])
    normal /= np.linalg.norm(normal)
    across = sum(o * n for o, n in zip(offsets, normal))
    along = np.sqrt(np.maximum(sum(o**2 for o in offsets) - across**2, 0))
    half_thickness = rng.uniform(1.5, 2.5)
    alpha = np.clip(half_thickness - np.abs(across) + 0.5, 0, 1) * np.clip((reach - along) / 4, 0, 1) * scene.mask(lobe)[box]
    scene.paint(box, alpha, rng.uniform(-150, 0), CODES["atelectasis"])
    return {"kind": "linear", "lobe": LOBES[lobe], "length_mm": round(2 * reach), "centre_kji": _xyz(centre)}


def consolidation(scene: Scene, rng: np.random.Generator, side: str | None = None, lobe: str | None = None) -> dict | None:
    """Dense patchy opacity confined to one lobe, optionally with an air bronchogram (its bronchi stay air)."""
    drawn = str(rng.choice(list(LOBES)))  # drawn when forced too: the rest of the draws stay the unforced one's
    lobe = lobe or (drawn if side is None or drawn in SIDES[side] else MIRRORED_LOBES[drawn])
    patch = _lobe_patch(scene, rng, lobe, rng.uniform(20, 45), 0.2)
    if patch is None:
        return None
    box, alpha, centre = patch
    alpha = ndimage.maximum_filter(alpha, size=(1, 5, 5)) * _with_rim(scene, box, scene.mask(lobe)[box])  # reach the pleura
    value = rng.uniform(-60, 40) + 12 * _noise(rng, alpha.shape, 4.0, scene.spacing)
    bronchogram = bool(rng.random() < 0.5)
    if bronchogram:
        value[_air_bronchogram(scene, box, alpha > 0.9, centre, rng)] = -950
    marked = scene.paint(box, alpha, value, CODES["consolidation"])
    return {"lobe": LOBES[lobe], "air_bronchogram": bronchogram, "volume_ml": round(marked * scene.voxel_ml()), "centre_kji": _xyz(centre)}


def _air_bronchogram(scene: Scene, box: tuple[slice, ...], inside: np.ndarray, centre, rng: np.random.Generator) -> np.ndarray:
    """2-4 air-filled bronchi fanning out through the consolidation from its hilar side (mask in `box`)."""
    trachea = np.argwhere(scene.mask("trachea"))
    carina = trachea[trachea[:, 0] == trachea[:, 0].max()].mean(axis=0)
    toward = (np.asarray(centre) - carina) * scene.spacing
    toward /= np.linalg.norm(toward)
    reach = np.array([s.stop - s.start for s in box]).min() / 2 * scene.spacing.min()
    start = np.asarray(centre) * scene.spacing - 0.8 * reach * toward  # mm
    tubes = np.zeros(inside.shape, bool)
    origin = np.array([s.start for s in box])
    for _ in range(rng.integers(2, 5)):
        branch = toward + rng.normal(0, 0.35, 3)
        branch /= np.linalg.norm(branch)
        points = (start + np.outer(np.linspace(0, 1.6 * reach, 200), branch)) / scene.spacing - origin
        points = np.round(points).astype(int)
        points = points[np.all((points >= 0) & (points < inside.shape), axis=1)]
        tubes[tuple(points.T)] = True
    return ndimage.binary_dilation(tubes, IN_PLANE) & inside


def ground_glass(scene: Scene, rng: np.random.Generator, lobe: str | None = None) -> dict | None:
    """Hazy opacity in one lobe: parenchyma raised to -700..-500 HU, vessels still visible through it."""
    drawn = str(rng.choice(list(LOBES)))
    lobe = lobe or drawn
    patch = _lobe_patch(scene, rng, lobe, rng.uniform(20, 50), 0.6)
    if patch is None:
        return None
    box, alpha, centre = patch
    level = rng.uniform(-700, -500)
    value = level + 60 * _noise(rng, alpha.shape, 5.0, scene.spacing)
    marked = scene.paint(box, alpha * (scene.hu[box] < value), value, CODES["ground_glass"])
    return {"lobe": LOBES[lobe], "volume_ml": round(marked * scene.voxel_ml()), "centre_kji": _xyz(centre)}


def emphysema(scene: Scene, rng: np.random.Generator) -> dict:
    """Centrilobular low-attenuation areas (< -950 HU) in the upper lobes, most at the apices; vessels spared."""
    severity = _grade(rng, names=("mild", "moderate", "severe"))
    fraction = {"mild": 0.1, "moderate": 0.2, "severe": 0.32}[severity]
    upper = scene.mask("lung_upper_lobe_right", "lung_upper_lobe_left")
    box = _bounding_box(upper)
    region = upper[box] & (scene.hu[box] < -600) & (scene.finding_mask[box] == 0)
    levels = np.linspace(0, 1, region.shape[0], dtype=np.float32)[:, None, None]  # apex 0 -> bottom of upper lobes 1
    score = _noise(rng, region.shape, rng.uniform(5, 10), scene.spacing) - 1.5 * levels
    threshold = np.quantile(score[region], 1 - fraction)
    alpha = np.clip((score - threshold) / 0.4, 0, 1) * region
    scene.paint(box, alpha, rng.uniform(-1000, -970), CODES["emphysema"])
    return {"severity": severity, "low_attenuation_fraction": fraction}


def nodule(scene: Scene, rng: np.random.Generator, side: str | None = None, lobe: str | None = None) -> dict | None:
    """A solid, slightly lobulated nodule of 5-30 mm surrounded by aerated lung of one lobe (of the `side` lung, or
    the `lobe`)."""
    volumes = np.array([scene.mask(name).sum() for name in LOBES], dtype=float)
    diameter = 5 + 25 * rng.beta(1.3, 2.5)
    radius = diameter / 2
    tried = rng.choice(list(LOBES), size=len(LOBES), replace=False, p=volumes / volumes.sum())  # drawn as unforced
    allowed = (lobe,) if lobe else SIDES[side] if side else tuple(LOBES)
    for chosen in (name for name in tried if name in allowed):
        centre = _interior_point(scene, scene.mask(chosen) & (scene.finding_mask == 0), radius + 3, rng)
        if centre is not None:
            break
    else:
        return None
    lobe = str(chosen)
    box, offsets = _box(scene, centre, radius + 2)
    wobble = 0.12 * _noise(rng, _shape(box), max(2.0, radius), scene.spacing)
    alpha = _ellipsoid(offsets, radius, 0.8, wobble)
    scene.paint(box, alpha, rng.uniform(15, 55) + 8 * _noise(rng, alpha.shape, 2.0, scene.spacing), CODES["nodule"])
    return {"lobe": LOBES[lobe], "diameter_mm": round(diameter, 1), "centre_kji": _xyz(centre)}


def lymphadenopathy(scene: Scene, rng: np.random.Generator) -> dict | None:
    """1-3 enlarged soft-tissue nodes (short axis 11-22 mm) at mediastinal stations found from the trachea.

    A node displaces fat and may bulge a little into lung (at most a third of it), but never overlaps
    a labelled organ, vessel or bone; a position is kept only where the node changes the image (at
    least 30 % of it was fat or lung).
    """
    lung_ids = scene.ids(*LUNG_LOBES)
    wanted = rng.integers(1, 4)
    stations = _node_stations(scene)
    nodes = []
    for station_index in rng.permutation(len(stations)):
        if len(nodes) == wanted:
            break
        station, anchor = stations[station_index]
        short = rng.uniform(11, 22)
        radii = np.array([short * rng.uniform(1.2, 1.6), short, short * rng.uniform(1.0, 1.2)]) / 2
        for _ in range(8):
            centre = anchor + rng.normal(0, 3, 3) / scene.spacing
            box, offsets = _box(scene, centre, radii.max() + 2)
            shape = _ellipsoid(offsets, radii, 1.0)
            inside = shape >= 0.5
            lung = in_labels(scene.labels[box], lung_ids)
            writable = (lung | (scene.labels[box] == UNLABELLED)) & (scene.finding_mask[box] == 0)
            visible = (scene.hu[box][inside] < -50).mean() > 0.3
            if writable[inside].mean() > 0.7 and lung[inside].mean() < 0.35 and visible:
                scene.paint(box, shape * writable, rng.uniform(30, 50), CODES["lymphadenopathy"])
                nodes.append({"station": station, "short_axis_mm": round(short, 1), "centre_kji": _xyz(np.round(centre))})
                break
    if not nodes:
        return None
    return {"nodes": sorted(nodes, key=lambda node: -node["short_axis_mm"])}


NODE_STATIONS = ("right paratracheal", "subcarinal", "aortopulmonary window")


def _node_stations(scene: Scene) -> list[tuple[str, np.ndarray]]:
    """NODE_STATIONS with typical centres (voxels) relative to the trachea and carina of this patient."""
    trachea = scene.mask("trachea")
    levels = np.nonzero(trachea.any(axis=(1, 2)))[0]
    carina = levels[-1]
    above = max(levels[0], carina - int(25 / scene.spacing[0]))

    def at(k: int, mm) -> np.ndarray:
        rows, cols = np.nonzero(trachea[k])
        return np.array([k, rows.mean(), cols.mean()]) + np.asarray(mm, dtype=float) / scene.spacing

    offsets = {  # mm along k (down), j (back), i (to the left) from the trachea centre
        "right paratracheal": (above, (0, -6, -16)),
        "subcarinal": (carina, (12, 6, 10)),
        "aortopulmonary window": (carina, (-8, -4, 22)),
    }
    return [(name, at(*offsets[name])) for name in NODE_STATIONS]


PLAQUE_REACH_MM = 4.0  # a plaque is drawn in the box this far around its centre


def arterial_calcification(scene: Scene, rng: np.random.Generator) -> dict:
    """Bright plaques on the aortic wall: a band one voxel outside to two inside the aorta.

    Plaques are at least a voxel across and drawn denser than they end up (300-800 HU), because the
    scanner blur spreads them.
    """
    severity = _grade(rng, names=("mild", "moderate", "extensive"))
    count = int(rng.integers(*{"mild": (3, 8), "moderate": (8, 18), "extensive": (18, 35)}[severity]))
    aorta = scene.mask("aorta")
    box = _bounding_box(aorta, np.ceil(PLAQUE_REACH_MM / scene.spacing).astype(int))  # holds every plaque's box
    local = aorta[box]
    wall = local & ~ndimage.binary_erosion(local)
    band = ndimage.binary_dilation(local) & ~ndimage.binary_erosion(local, iterations=2)
    start = np.array([s.start for s in box])
    centres = []
    for _ in range(count):
        centre = _random_voxel(wall, rng) + start
        plaque, offsets = _box(scene, centre, PLAQUE_REACH_MM)
        sub = tuple(slice(p.start - s, p.stop - s) for p, s in zip(plaque, start))
        radii = np.maximum(rng.uniform(1.5, 3.5, 3), scene.spacing)
        alpha = _ellipsoid(offsets, radii, 0.7) * band[sub]
        scene.paint(plaque, alpha, rng.uniform(600, 1200), CODES["arterial_calcification"])
        centres.append(_xyz(centre))
    return {"severity": severity, "plaques": count, "centres_kji": centres}


def medical_material(scene: Scene, rng: np.random.Generator, side: str | None = None) -> dict:
    """A pacemaker (generator in the chest wall, lead via the superior vena cava to the right ventricle)
    or a venous port (reservoir in the chest wall, catheter tip at the cavo-atrial junction), in the chest wall of
    the `side` it is forced to (its side drawn all the same, so every later draw is as unforced)."""
    device = "pacemaker" if rng.random() < 0.5 else "port"
    drawn = ("left" if rng.random() < 0.75 else "right") if device == "pacemaker" else ("right" if rng.random() < 0.7 else "left")
    side = side or drawn
    lung = scene.mask(*SIDES[side])
    k = int(np.nonzero(lung.any(axis=(1, 2)))[0][0] + rng.uniform(55, 75) / scene.spacing[0])  # below the clavicle
    cols = np.nonzero(lung[k].any(axis=0))[0]
    lateral = 0.35 * (cols[-1] - cols[0])
    i = int(cols[0] + lateral if side == "right" else cols[-1] - lateral)
    skin = int(np.argmax(scene.hu[k, :, i] > -300))
    radii = np.array([22, 4, 24]) if device == "pacemaker" else np.array([12, 6, 12])
    pocket = np.array([k, skin + (radii[1] + 6) / scene.spacing[1], i])
    box, offsets = _box(scene, pocket, radii + 1)
    scene.paint(box, _ellipsoid(offsets, radii, 0.7), 3000 if device == "pacemaker" else 2000, CODES["medical_material"])
    # the lead enters the subclavian vein 20 mm higher, 25 mm deeper and 60 % of the way to the midline
    entry = pocket + np.array([-20 / scene.spacing[0], 25 / scene.spacing[1], 0.6 * (_midline(scene) - i)])
    path = [pocket, entry]
    svc = scene.mask("superior_vena_cava")
    svc_levels = np.nonzero(svc.any(axis=(1, 2)))[0]
    path += [np.array([level, *np.argwhere(svc[level]).mean(axis=0)]) for level in (svc_levels[0], svc_levels[-1])]
    if device == "pacemaker":
        path.append(_right_ventricle(scene))
    _draw_line(scene, _smooth_path(np.array(path)), 2500)
    tip = "right ventricle" if device == "pacemaker" else "cavo-atrial junction"
    return {"device": device, "side": side, "tip": tip, "pocket_kji": _xyz(np.round(pocket))}


def _midline(scene: Scene) -> float:
    return float(np.nonzero(scene.mask("trachea").any(axis=(0, 1)))[0].mean())


def _right_ventricle(scene: Scene) -> np.ndarray:
    """Near the anterior-inferior heart border, a little left of the heart's most anterior point."""
    heart = scene.mask("heart")
    k = int(np.percentile(np.nonzero(heart.any(axis=(1, 2)))[0], 75))
    rows, cols = np.nonzero(heart[k])
    front = rows.min()
    return np.array([k, front + 12 / scene.spacing[1], cols[rows <= front + 2].mean()])


def _smooth_path(points: np.ndarray, rounds: int = 3) -> np.ndarray:
    """Corner-cutting (Chaikin) refinement of a polyline: a catheter bends, it does not kink."""
    for _ in range(rounds):
        start, stop = points[:-1], points[1:]
        cut = np.empty((2 * len(start), 3))
        cut[0::2], cut[1::2] = 0.75 * start + 0.25 * stop, 0.25 * start + 0.75 * stop
        points = np.vstack([points[:1], cut, points[-1:]])
    return points


def _draw_line(scene: Scene, points: np.ndarray, value: float) -> None:
    """A one-voxel wire through `points` (voxel coordinates), sampled finely enough to be continuous."""
    samples = [points[:1]]
    for start, stop in zip(points[:-1], points[1:]):
        count = int(np.ceil(np.abs(stop - start).max() * 2)) + 1
        samples.append(start + (stop - start) * np.linspace(0, 1, count)[:, None])
    voxels = np.unique(np.round(np.vstack(samples)).astype(int), axis=0)
    voxels = voxels[np.all((voxels >= 0) & (voxels < scene.hu.shape), axis=1)]
    voxels = tuple(voxels[scene.finding_mask[tuple(voxels.T)] == 0].T)
    scene.hu[voxels] = value
    scene.finding_mask[voxels] = CODES["medical_material"]


FINDINGS = (
    Finding("cardiomegaly", "Cardiomegaly", "cardiomegaly", 0.3, cardiomegaly, measured=normal_heart),
    Finding("pericardial_effusion", "Pericardial effusion", "pericardial effusion", 0.25, pericardial_effusion),
    Finding("pleural_effusion", "Pleural effusion", "pleural effusion", 0.3, pleural_effusion, sided=True),
    Finding("atelectasis", "Atelectasis", "atelectasis", 0.3, atelectasis),
    Finding("consolidation", "Consolidation", "consolidation", 0.3, consolidation, sided=True, lobed=True),
    Finding("ground_glass", "Lung opacity", "ground-glass opacity", 0.25, ground_glass, lobed=True),
    Finding("nodule", "Lung nodule", "nodule", 0.35, nodule, sided=True, lobed=True),
    Finding("emphysema", "Emphysema", "emphysema", 0.3, emphysema),
    Finding("lymphadenopathy", "Lymphadenopathy", "lymph node", 0.3, lymphadenopathy),
    Finding("arterial_calcification", "Arterial wall calcification", "arterial calcification", 0.35,
            arterial_calcification),
    Finding("medical_material", "Medical material", "device", 0.25, medical_material, sided=True),
)
CODES = {finding.name: code for code, finding in enumerate(FINDINGS, start=1)}
SIDED = tuple(finding.name for finding in FINDINGS if finding.sided)
LOBED = tuple(finding.name for finding in FINDINGS if finding.lobed)


def draw_findings(
    scene: Scene, rng: np.random.Generator, present: dict[str, bool | str] | None = None
) -> dict[str, dict]:
    """Decide (by prior, or `present`) and draw every finding; returns name -> {"present": bool, ...}.

    `present` forces a finding on (True) or off (False), or on at a place: for a sided one (SIDED) "right" or
    "left", for a lobed one (LOBED) a lobe's label (a LOBES key). Each finding draws from its own random stream, so
    forcing one leaves the others as they were.
    """
    present = present or {}
    unknown = set(present) - set(CODES)
    if unknown:
        raise ValueError(f"unknown findings {sorted(unknown)}; known: {sorted(CODES)}")
    for name, wanted in present.items():
        if isinstance(wanted, str) and not (name in SIDED and wanted in SIDES or name in LOBED and wanted in LOBES):
            raise ValueError(f"{name} cannot be forced to {wanted!r}: only {SIDED} take a side, 'right' or 'left', "
                             f"and only {LOBED} a lobe, one of {sorted(LOBES)}")
    chances = rng.random(len(FINDINGS))
    streams = rng.spawn(len(FINDINGS))
    drawn = {}
    for finding, chance, stream in zip(FINDINGS, chances, streams):
        wanted = present.get(finding.name, chance < finding.prior)
        place = {} if not isinstance(wanted, str) else {"side": wanted} if wanted in SIDES else {"lobe": wanted}
        params = finding.draw(scene, stream, **place) if wanted else None
        absent = finding.measured(scene) if params is None and finding.measured else {}
        drawn[finding.name] = {"present": params is not None, **(params or absent)}
    return drawn


def ctrate_labels(drawn: dict[str, dict]) -> dict[str, int]:
    """The 18 CT-RATE abnormality labels (0/1) implied by the drawn findings."""
    labels = dict.fromkeys(CTRATE_LABELS, 0)
    for finding in FINDINGS:
        if drawn[finding.name]["present"]:
            labels[finding.ctrate_label] = 1
    return labels

"""Implicit (signed-distance) dental anatomy in millimetres, LPS, one frame per patient.

The anatomy frame: x to the patient's left, y posterior, z superior; the occlusal plane is
z = 0 with a small bite opening, upper teeth above (crowns pointing to -z), lower below.

Every tissue is the zero set of a signed distance function (negative inside), so any
acquisition geometry can be rendered exactly: a voxel's tissue fractions come from
``clip(0.5 - sdf / h, 0, 1)`` (partial volume), which puts the half-way grey level between
two tissues on their true boundary.  Teeth are evaluated only inside their bounding boxes.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation
from skimage.draw import polygon as draw_polygon


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on the seed and the purpose (order of cases irrelevant)."""
    entropy = [int(seed)] + [zlib.crc32(k.encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(entropy))


# ---------------------------------------------------------------------------------------
# signed distance primitives (vectorised over points (N, 3))


def sd_round_box(p: np.ndarray, half: np.ndarray, radius: float) -> np.ndarray:
    """Exact SDF of a box with rounded edges centred at the origin (half extents incl. radius)."""
    q = np.abs(p) - (half - radius)
    outside = np.linalg.norm(np.maximum(q, 0.0), axis=1)
    inside = np.minimum(q.max(axis=1), 0.0)
    return outside + inside - radius


def sd_sphere(p: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    return np.linalg.norm(p - centre, axis=1) - radius


def sd_capsule(p: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float) -> np.ndarray:
    pa = p - a
    ba = b - a
    h = np.clip(pa @ ba / float(ba @ ba), 0.0, 1.0)
    return np.linalg.norm(pa - h[:, None] * ba, axis=1) - radius


def sd_round_cone(p: np.ndarray, a: np.ndarray, b: np.ndarray, r1: float, r2: float) -> np.ndarray:
    """Exact SDF of a cone with spherical ends: radius r1 at a, r2 at b."""
    ba = b - a
    l2 = float(ba @ ba)
    rr = r1 - r2
    a2 = l2 - rr * rr
    il2 = 1.0 / l2
    pa = p - a
    y = pa @ ba
    z = y - l2
    x = pa * l2 - y[:, None] * ba
    x2 = np.einsum("ij,ij->i", x, x)
    y2 = y * y * l2
    z2 = z * z * l2
    k = math.copysign(1.0, rr) * rr * rr * x2
    d_b = np.sqrt(x2 + z2) * il2 - r2
    d_a = np.sqrt(x2 + y2) * il2 - r1
    d_side = (np.sqrt(x2 * a2 * il2) + y * rr) * il2 - r1
    return np.where(np.sign(z) * a2 * z2 > k, d_b, np.where(np.sign(y) * a2 * y2 < k, d_a, d_side))


def occupancy(sdf: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume fraction of a voxel of size h whose centre has signed distance sdf."""
    return np.clip(0.5 - sdf / h, 0.0, 1.0)


# ---------------------------------------------------------------------------------------
# teeth

# per tooth type 1..7 (central incisor .. second molar); millimetres
UPPER = {
    "width": [8.5, 6.5, 7.5, 7.0, 6.5, 10.0, 9.0],
    "depth": [7.0, 6.2, 8.0, 9.0, 9.0, 11.0, 10.5],
    "crown": [10.5, 9.0, 10.0, 8.5, 7.8, 7.5, 7.0],
    "root": [13.0, 13.0, 17.0, 14.0, 14.0, 12.5, 12.0],
}
LOWER = {
    "width": [5.2, 5.7, 6.8, 7.0, 7.0, 11.0, 10.5],
    "depth": [6.0, 6.2, 7.5, 7.5, 8.0, 10.5, 10.0],
    "crown": [9.0, 9.5, 11.0, 8.5, 8.0, 7.5, 7.0],
    "root": [12.5, 14.0, 16.0, 14.0, 14.5, 14.0, 13.0],
}
BITE_OPENING_MM = 3.0
GUM_COVER_MM = 1.5  # gingiva covers the cervical 1.5 mm of each crown
CREST_BELOW_CEJ_MM = 1.5  # alveolar bone crest this far apical of the CEJ


@dataclass(frozen=True)
class Tooth:
    """One tooth: local frame (u distal along the arch, v buccal, w occlusal), origin at the CEJ centre."""

    name: str  # e.g. "UR6"
    arch: str  # "upper" / "lower"
    kind: int  # 1..7
    origin: np.ndarray  # (3,) anatomy mm
    axes: np.ndarray  # (3, 3) columns u, v, w in anatomy frame
    half: np.ndarray  # crown box half extents (u, v, w)
    box_radius: float
    cusps: tuple  # ((centre_local (3,), radius), ...) spheres, or capsule for incisors
    incisal: tuple | None  # (a_local, b_local, radius) capsule for incisors
    roots: tuple  # ((a_local, b_local, r1, r2), ...)
    enamel_mm: float
    cusp_local: np.ndarray  # landmark
    apex_local: np.ndarray  # landmark
    bbox_local: tuple  # (lo (3,), hi (3,))

    def to_local(self, p: np.ndarray) -> np.ndarray:
        return (p - self.origin) @ self.axes

    def to_anatomy(self, q: np.ndarray) -> np.ndarray:
        return np.atleast_2d(q) @ self.axes.T + self.origin

    def crown_sdf(self, q: np.ndarray) -> np.ndarray:
        centre = np.array([0.0, 0.0, self.half[2]])
        d = sd_round_box(q - centre, self.half, self.box_radius)
        for c, r in self.cusps:
            d = np.minimum(d, sd_sphere(q, c, r))
        if self.incisal is not None:
            a, b, r = self.incisal
            d = np.minimum(d, sd_capsule(q, a, b, r))
        return d

    def layers(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Signed distances (tooth, dentin core, pulp), nested: pulp within core within tooth."""
        crown = self.crown_sdf(q)
        tooth = crown.copy()
        root_sd = []
        for a, b, r1, r2 in self.roots:
            d = sd_round_cone(q, a, b, r1, r2)
            root_sd.append(d)
            tooth = np.minimum(tooth, d)
        w = q[:, 2]
        core = np.minimum(crown + self.enamel_mm, np.maximum(crown, w - 1.0))
        for d in root_sd:
            core = np.minimum(core, d)
        core = np.maximum(core, tooth)
        # pulp: chamber inside the crown, canals inside the roots
        chamber = np.maximum(crown + self.enamel_mm + 1.6, w - 0.55 * 2 * self.half[2])
        pulp = chamber
        for a, b, r1, r2 in self.roots:
            axis = b - a
            pulp = np.minimum(pulp, sd_round_cone(q, a, a + 0.92 * axis, max(0.28 * r1, 0.4), 0.15))
        pulp = np.maximum(pulp, core + 0.3)
        return tooth, core, pulp


def _make_tooth(name: str, arch: str, kind: int, origin: np.ndarray, axes: np.ndarray,
                width: float, depth: float, crown_h: float, root_l: float,
                rng: np.random.Generator) -> Tooth:
    prot = {1: 0.6, 2: 0.6, 3: 1.8, 4: 1.3, 5: 1.2, 6: 1.2, 7: 1.1}[kind]
    hb = crown_h - prot  # box height; cusps protrude to crown_h
    half = np.array([width / 2 - 0.15, depth / 2, hb / 2])
    box_r = float(min(0.38 * min(half[0], half[1]), 0.45 * hb))
    cusps: list = []
    incisal = None
    if kind in (1, 2):
        r = min(0.9, 0.45 * half[1])
        za = crown_h - r
        incisal = (np.array([-0.55 * half[0], 0.0, za - 0.15]), np.array([0.55 * half[0], 0.0, za - 0.15]), r)
        # a slightly higher incisal point makes the tip unique
        cusps.append((np.array([0.0, 0.1, za]), r))
        cusp = np.array([0.0, 0.1, crown_h])
    elif kind == 3:
        r = 0.45 * half[0]
        c = np.array([0.0, 0.15 * half[1], crown_h - r])
        cusps.append((c, r))
        cusp = c + np.array([0.0, 0.0, r])
    elif kind in (4, 5):
        r = 0.55 * half[0]
        hb_top = crown_h - r
        cb = np.array([0.0, 0.45 * half[1], hb_top])
        cl = np.array([0.0, -0.45 * half[1], hb_top - 0.5 - 0.2 * rng.random()])
        cusps += [(cb, r), (cl, r)]
        cusp = cb + np.array([0.0, 0.0, r])
    else:
        r = 0.42 * min(half[0], half[1])
        top = crown_h - r
        drops = [0.0, 0.3 + 0.2 * rng.random(), 0.35 + 0.2 * rng.random(), 0.5 + 0.3 * rng.random()]
        offs = [(-1, 1), (1, 1), (-1, -1), (1, -1)]  # mesio-buccal first (mesial is -u)
        for (su, sv), dz in zip(offs, drops):
            cusps.append((np.array([su * 0.45 * half[0], sv * 0.45 * half[1], top - dz]), r))
        cusp = cusps[0][0] + np.array([0.0, 0.0, r])
    roots: list = []
    r1_single = 0.72 * min(half[0], half[1])
    if kind in (1, 2, 3, 5) or (kind == 4 and arch == "lower"):
        roots.append((np.array([0.0, 0.0, 1.5]), np.array([0.0, -0.05 * half[1], -root_l + 0.6]), r1_single, 0.6))
    elif kind == 4:  # upper first premolar: buccal and palatal roots
        for sv in (1, -1):
            roots.append((np.array([0.0, sv * 0.3 * half[1], 1.5]),
                          np.array([0.0, sv * 0.45 * half[1], -root_l + 0.5]), 0.55 * r1_single, 0.5))
    elif arch == "upper":  # molars: mesio-buccal, disto-buccal, palatal
        for su, sv, f in ((-1, 1, 1.0), (1, 1, 0.92), (0, -1, 1.05)):
            roots.append((np.array([su * 0.35 * half[0], sv * 0.35 * half[1], 1.5]),
                          np.array([su * 0.55 * half[0], sv * 0.55 * half[1], -f * root_l + 0.5]),
                          0.42 * min(half[0], half[1]), 0.5))
    else:  # lower molars: mesial and distal
        for su, f in ((-1, 1.0), (1, 0.93)):
            roots.append((np.array([su * 0.4 * half[0], 0.0, 1.5]),
                          np.array([su * 0.5 * half[0], 0.0, -f * root_l + 0.5]),
                          0.5 * min(half[0], half[1]), 0.5))
    a, b, _, r2 = roots[0]
    axis = (b - a) / np.linalg.norm(b - a)
    apex = b + r2 * axis
    lo = np.array([-half[0] - 0.5, -half[1] - 0.5, -root_l * 1.06 - 1.0])
    hi = np.array([half[0] + 0.5, half[1] + 0.5, crown_h + 0.5])
    return Tooth(name=name, arch=arch, kind=kind, origin=origin, axes=axes, half=half,
                 box_radius=box_r, cusps=tuple(cusps), incisal=incisal, roots=tuple(roots),
                 enamel_mm=1.1 if kind < 4 else 1.3, cusp_local=cusp, apex_local=apex,
                 bbox_local=(lo, hi))


# ---------------------------------------------------------------------------------------
# arches and the whole patient


@dataclass
class ArchCurve:
    """A U-shaped curve z = const, sampled densely; s = signed arc length from the midline."""

    points: np.ndarray  # (M, 2) xy
    s: np.ndarray  # (M,)

    def at(self, s: float) -> tuple[np.ndarray, np.ndarray]:
        """Point and unit tangent (towards increasing x side... i.e. increasing s) at arc length s."""
        x = np.interp(s, self.s, self.points[:, 0])
        y = np.interp(s, self.s, self.points[:, 1])
        ds = 0.05
        x2 = np.interp(s + ds, self.s, self.points[:, 0])
        y2 = np.interp(s + ds, self.s, self.points[:, 1])
        x1 = np.interp(s - ds, self.s, self.points[:, 0])
        y1 = np.interp(s - ds, self.s, self.points[:, 1])
        t = np.array([x2 - x1, y2 - y1])
        return np.array([x, y]), t / np.linalg.norm(t)


def _arch_curve(half_length: float, depth_ratio: float, y_front: float) -> ArchCurve:
    phi = np.linspace(-math.radians(105), math.radians(105), 2001)
    base = np.stack([np.sin(phi), depth_ratio * (1 - np.cos(phi))], axis=1)
    seg = np.linalg.norm(np.diff(base, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    s -= s[len(s) // 2]
    scale = half_length / s[-1]
    pts = base * scale
    pts[:, 1] += y_front
    return ArchCurve(points=pts, s=s * scale)


@dataclass
class Field2D:
    """A 2D scalar field on a regular xy grid in the anatomy frame, bilinear lookup."""

    values: np.ndarray  # (ny, nx) float32
    x0: float
    y0: float
    step: float

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        coords = np.stack([(xy[:, 1] - self.y0) / self.step, (xy[:, 0] - self.x0) / self.step])
        return ndimage.map_coordinates(self.values, coords, order=1, mode="nearest")


@dataclass
class Materials:
    air: float
    soft: float
    bone: float
    bone_texture: float
    dentin: float
    enamel: float
    pulp: float
    metal: float


CBCT_MATERIALS = Materials(air=0.0, soft=1.0, bone=1.75, bone_texture=0.12, dentin=2.3,
                           enamel=3.0, pulp=1.05, metal=9.0)
MR_MATERIALS = Materials(air=0.0, soft=1.0, bone=0.22, bone_texture=0.08, dentin=0.07,
                         enamel=0.03, pulp=0.6, metal=0.0)


@dataclass
class Anatomy:
    """One patient's anatomy (mm, anatomy frame) built from a seed."""

    patient: str
    teeth: list[Tooth]
    arches: dict[str, ArchCurve]
    dist: dict[str, Field2D]  # distance to each arch curve in xy
    gum_level: dict[str, Field2D]  # |z| of the gum margin near each arch
    mouth: Field2D  # signed distance (xy) of the oral cavity outline
    palate: Field2D  # signed distance (xy) of the region inside the upper arch
    gum_half_width: float
    bone_half_width: float
    z_extent: tuple[float, float]  # (lowest root apex, highest root apex) z
    texture_waves: np.ndarray  # (K, 4): kx, ky, kz, phase
    metal_tooth: str
    scale: float = 1.0
    _bounds: dict = field(default_factory=dict)

    # -- landmarks ------------------------------------------------------------------
    def landmarks(self) -> tuple[list[str], list[str], list[str], np.ndarray]:
        names, kinds, teeth, pts = [], [], [], []
        for t in self.teeth:
            for kind, q in (("cusp", t.cusp_local), ("apex", t.apex_local)):
                names.append(f"{t.name}_{kind}")
                kinds.append(kind)
                teeth.append(t.name)
                pts.append(t.to_anatomy(q)[0])
        return names, kinds, teeth, np.array(pts)

    def roi(self) -> tuple[np.ndarray, np.ndarray]:
        """Anatomy-frame box holding the jaws, teeth and some margin (mm)."""
        pts = np.concatenate([a.points for a in self.arches.values()])
        lo = np.array([pts[:, 0].min(), pts[:, 1].min(), self.z_extent[0]])
        hi = np.array([pts[:, 0].max(), pts[:, 1].max(), self.z_extent[1]])
        margin = np.array([self.gum_half_width + 2.0, self.gum_half_width + 2.0, 2.5])
        return lo - margin, hi + margin

    # -- signed distances of the soft parts -------------------------------------------
    def _lookups(self, p: np.ndarray, arch: str, cache: dict | None) -> tuple[np.ndarray, np.ndarray]:
        if cache is not None and arch in cache:
            return cache[arch]
        out = (self.dist[arch](p[:, :2]), self.gum_level[arch](p[:, :2]))
        if cache is not None:
            cache[arch] = out
        return out

    def gingiva_sdf(self, p: np.ndarray, arch: str, cache: dict | None = None) -> np.ndarray:
        dist, level = self._lookups(p, arch, cache)
        d = dist - self.gum_half_width
        dz = (level - p[:, 2]) if arch == "upper" else (p[:, 2] + level)
        r = 1.2
        qx = d + r
        qz = dz + r
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qz, 0))
        return outside + np.minimum(np.maximum(qx, qz), 0) - r

    def bone_sdf(self, p: np.ndarray, arch: str, cache: dict | None = None) -> np.ndarray:
        dist, level = self._lookups(p, arch, cache)
        bhw = self.bone_half_width + (0.5 if arch == "lower" else 0.0)
        d = dist - bhw
        crest = level + GUM_COVER_MM + CREST_BELOW_CEJ_MM
        dz = (crest - p[:, 2]) if arch == "upper" else (p[:, 2] + crest)
        r = 1.0
        qx = d + r
        qz = dz + r
        band = np.hypot(np.maximum(qx, 0), np.maximum(qz, 0)) + np.minimum(np.maximum(qx, qz), 0) - r
        if arch == "upper":
            zc = float(np.median(self.gum_level["upper"].values)) + 12.0
            plate = np.maximum(self.palate(p[:, :2]), np.abs(p[:, 2] - zc) - 2.5)
            band = np.minimum(band, plate)
        return band

    def mouth_sdf(self, p: np.ndarray) -> np.ndarray:
        lo = -float(self.gum_level["lower"].values.max()) - 4.0
        hi = float(self.gum_level["upper"].values.max()) + 4.0
        zc, hz = (lo + hi) / 2, (hi - lo) / 2
        return np.maximum(self.mouth(p[:, :2]), np.abs(p[:, 2] - zc) - hz)

    def face_sdf(self, p: np.ndarray) -> np.ndarray:
        radii = np.array([62.0, 60.0, 90.0]) * self.scale
        centre = np.array([0.0, 12.0, 5.0])
        k = np.linalg.norm((p - centre) / radii, axis=1)
        return (k - 1.0) * radii.min()

    def texture(self, p: np.ndarray) -> np.ndarray:
        w = self.texture_waves
        acc = np.zeros(len(p), dtype=np.float64)
        for kx, ky, kz, ph in w:
            acc += np.cos(p[:, 0] * kx + p[:, 1] * ky + p[:, 2] * kz + ph)
        return acc / math.sqrt(len(w) / 2)

    def tooth_by_name(self, name: str) -> Tooth:
        for t in self.teeth:
            if t.name == name:
                return t
        raise KeyError(name)

    # -- rendering -----------------------------------------------------------------
    def paint(self, p: np.ndarray, h: float, mat: Materials, metal: bool = False) -> np.ndarray:
        """Material value of each point (N, 3) for voxels of size h (partial volume mix)."""
        v = np.full(len(p), mat.air, dtype=np.float64)

        def put(sdf: np.ndarray, value) -> None:
            f = occupancy(sdf, h)
            v[:] = v * (1 - f) + value * f

        cache: dict = {}
        put(self.face_sdf(p), mat.soft)
        put(self.mouth_sdf(p), mat.air)
        for arch in ("upper", "lower"):
            put(self.gingiva_sdf(p, arch, cache), mat.soft)
        f_bone = np.maximum(occupancy(self.bone_sdf(p, "upper", cache), h),
                            occupancy(self.bone_sdf(p, "lower", cache), h))
        ib = np.nonzero(f_bone > 0)[0]
        fb = f_bone[ib]
        v[ib] = v[ib] * (1 - fb) + (mat.bone + mat.bone_texture * self.texture(p[ib])) * fb
        for t, idx in self._teeth_near(p):
            q = t.to_local(p[idx])
            tooth, core, pulp = t.layers(q)
            ft, fc, fp = occupancy(tooth, h), occupancy(core, h), occupancy(pulp, h)
            shell = mat.metal if (metal and t.name == self.metal_tooth) else mat.enamel
            content = shell * (ft - fc) + mat.dentin * (fc - fp) + mat.pulp * fp
            v[idx] = v[idx] * (1 - ft) + content
        return v

    def tooth_sdf(self, p: np.ndarray, arch: str | None = None) -> np.ndarray:
        """Outer surface SDF of all teeth (of one arch) at points p (far points get +10)."""
        d = np.full(len(p), 10.0)
        for t, idx in self._teeth_near(p):
            if arch is None or t.arch == arch:
                d[idx] = np.minimum(d[idx], t.layers(t.to_local(p[idx]))[0])
        return d

    def _teeth_near(self, p: np.ndarray):
        """Yield (tooth, indices of the points inside its bounding box)."""
        if len(p) == 0:
            return
        x = np.ascontiguousarray(p[:, 0])
        order = np.argsort(x, kind="stable")
        xs = x[order]
        for t in self.teeth:
            lo, hi = self._tooth_bounds(t)
            a, b = np.searchsorted(xs, lo[0], "left"), np.searchsorted(xs, hi[0], "right")
            if a >= b:
                continue
            cand = order[a:b]
            pc = p[cand]
            m = (pc[:, 1] >= lo[1]) & (pc[:, 1] <= hi[1]) & (pc[:, 2] >= lo[2]) & (pc[:, 2] <= hi[2])
            if m.any():
                yield t, np.sort(cand[m])

    def _tooth_bounds(self, t: Tooth) -> tuple[np.ndarray, np.ndarray]:
        b = self._bounds.get(t.name)
        if b is None:
            lo, hi = t.bbox_local
            corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
            c = t.to_anatomy(corners)
            b = (c.min(axis=0), c.max(axis=0))
            self._bounds[t.name] = b
        return b


def _signed_distance_2d(mask: np.ndarray, step: float) -> np.ndarray:
    inside = ndimage.distance_transform_edt(mask) * step
    outside = ndimage.distance_transform_edt(~mask) * step
    return (outside - inside + np.where(mask, step / 2, -step / 2)).astype(np.float32)


def build_anatomy(seed: int, patient: str) -> Anatomy:
    """Build the anatomy of one patient; all variation comes from (seed, patient)."""
    rng = rng_for(seed, patient, "anatomy")
    scale = float(rng.uniform(0.94, 1.06))
    depth_ratio = {"upper": float(rng.uniform(0.78, 0.92)), "lower": 0.0}
    depth_ratio["lower"] = depth_ratio["upper"] * float(rng.uniform(0.95, 1.02))
    gap = 0.25
    teeth: list[Tooth] = []
    arches: dict[str, ArchCurve] = {}
    z_lo, z_hi = 0.0, 0.0
    for arch, table in (("upper", UPPER), ("lower", LOWER)):
        widths = np.array(table["width"]) * scale * rng.uniform(0.97, 1.03, 7)
        half_len = float(widths.sum() + 7 * gap) + 4.0  # curve continues behind the last molar
        y_front = -28.0 * scale if arch == "upper" else -25.5 * scale
        curve = _arch_curve(half_len, depth_ratio[arch], y_front)
        arches[arch] = curve
        sign = 1.0 if arch == "upper" else -1.0  # +z is apical for upper teeth
        for side, sgn in (("R", -1.0), ("L", 1.0)):
            s_pos = 0.0
            for i in range(7):
                kind = i + 1
                w = float(widths[i])
                s_c = sgn * (s_pos + w / 2 + gap / 2)
                s_pos += w + gap
                xy, tangent = curve.at(s_c)
                u2 = tangent * sgn  # distal
                v2 = np.array([u2[1], -u2[0]]) * sgn  # buccal: outward
                crown = table["crown"][i] * scale * float(rng.uniform(0.96, 1.04))
                root = table["root"][i] * scale * float(rng.uniform(0.93, 1.07))
                depth = table["depth"][i] * scale * float(rng.uniform(0.97, 1.03))
                w_axis = np.array([0.0, 0.0, -sign])  # occlusal direction
                u = np.array([u2[0], u2[1], 0.0])
                v = np.array([v2[0], v2[1], 0.0])
                # CEJ centre: crowns reach the occlusal plane (+-bite/2)
                z_cej = sign * (BITE_OPENING_MM / 2 + crown)
                origin = np.array([xy[0], xy[1], z_cej])
                axes = np.stack([u, v, w_axis], axis=1)
                # small inclinations: buccolingual (about u) and mesiodistal (about v)
                tilt = Rotation.from_rotvec(u * math.radians(rng.uniform(-5, 5))) * \
                    Rotation.from_rotvec(v * math.radians(rng.uniform(-3, 3)))
                axes = tilt.as_matrix() @ axes
                # keep the cusp tip on the occlusal plane after tilting
                name = f"{'U' if arch == 'upper' else 'L'}{side}{kind}"
                t = _make_tooth(name, arch, kind, origin, axes, w, depth, crown, root,
                                rng_for(seed, patient, "tooth", name))
                tip_z = t.to_anatomy(t.cusp_local)[0][2]
                origin = origin + np.array([0.0, 0.0, sign * BITE_OPENING_MM / 2 - tip_z])
                t = _make_tooth(name, arch, kind, origin, axes, w, depth, crown, root,
                                rng_for(seed, patient, "tooth", name))
                teeth.append(t)
                apex_z = t.to_anatomy(t.apex_local)[0][2]
                for a, b, _, r2 in t.roots:
                    for zz in t.to_anatomy(np.array([b]))[:, 2]:
                        z_lo, z_hi = min(z_lo, zz - r2, apex_z), max(z_hi, zz + r2, apex_z)
    # 2D fields in the xy plane
    step = 0.2
    x0, x1 = -65.0, 65.0
    y0, y1 = -60.0, 55.0
    nx = int(round((x1 - x0) / step)) + 1
    ny = int(round((y1 - y0) / step)) + 1
    gx = x0 + step * np.arange(nx)
    gy = y0 + step * np.arange(ny)
    grid = np.stack(np.meshgrid(gx, gy, indexing="xy"), axis=-1).reshape(-1, 2)
    dist: dict[str, Field2D] = {}
    gum: dict[str, Field2D] = {}
    gum_half_width = 7.0 * scale
    bone_half_width = 5.8 * scale
    for arch, curve in arches.items():
        tree = cKDTree(curve.points)
        d, i = tree.query(grid, distance_upper_bound=30.0)
        far = ~np.isfinite(d)
        d[far] = 30.0
        i[far] = 0
        dist[arch] = Field2D(d.reshape(ny, nx).astype(np.float32), x0, y0, step)
        # gum margin level follows the crowns: |z| = |CEJ| - cover, interpolated along s
        arch_teeth = [t for t in teeth if t.arch == arch]
        s_t, lvl = [], []
        for t in arch_teeth:
            o = t.origin
            k = tree.query(o[:2])[1]
            s_t.append(curve.s[k])
            lvl.append(abs(o[2]) - GUM_COVER_MM)
        order = np.argsort(s_t)
        level = np.interp(curve.s[i], np.array(s_t)[order], np.array(lvl)[order])
        gum[arch] = Field2D(level.reshape(ny, nx).astype(np.float32), x0, y0, step)
    # oral cavity: inside the upper arch's outer offset, closed at the back
    up = arches["upper"].points
    inner_mask = np.zeros((ny, nx), dtype=bool)
    rr, cc = draw_polygon((up[::8, 1] - y0) / step, (up[::8, 0] - x0) / step, shape=(ny, nx))
    inner_mask[rr, cc] = True
    palate = _signed_distance_2d(inner_mask, step)
    mouth_mask = inner_mask | (dist["upper"].values < gum_half_width + 5.0) | (dist["lower"].values < gum_half_width + 5.0)
    mouth = _signed_distance_2d(mouth_mask, step)
    waves = []
    for _ in range(8):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * math.pi / rng.uniform(2.5, 7.0)
        waves.append([*(direction * k), rng.uniform(0, 2 * math.pi)])
    upper_molars = [t.name for t in teeth if t.arch == "upper" and t.kind == 6]
    metal = upper_molars[int(rng.integers(len(upper_molars)))]
    return Anatomy(patient=patient, teeth=teeth, arches=arches, dist=dist, gum_level=gum,
                   mouth=Field2D(mouth, x0, y0, step), palate=Field2D(palate.astype(np.float32), x0, y0, step),
                   gum_half_width=gum_half_width, bone_half_width=bone_half_width,
                   z_extent=(z_lo, z_hi), texture_waves=np.array(waves), metal_tooth=metal, scale=scale)

"""The synthetic pelvic anatomy: one axial slice of a T2-like male pelvis, its tissue map and MR intensities.

synthetic.py writes these slices as a data set. Each patient (case) has its own size, organ geometry,
tissue contrast and scanner gain (`case_anatomy`); each weekly scan its own bladder and rectal filling,
position and coil shading (`week_state`). A slice at scan position t (0 top, 1 bottom) is a tissue map drawn
from superellipses (bones, muscles, bladder, rectum, prostate and its surroundings), rendered with texture,
partial-volume blur, a bias field and Rician noise. Labels: 0 background, 1 body, 2 bone, 3 bladder,
4 rectum, 5 prostate; the prostate differs from the tissue around it by only ~10-20% in intensity.

Arrays: axis 0 (256) runs from the patient's left to right (toward R), axis 1 (128/144) from posterior to anterior
(toward A), as the affine that synthetic.py writes with them says (nibabel's aff2axcodes: R, A, S).
Every random draw comes from a generator seeded by (seed, case[, week[, split, slice]]).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

# Tissue: (label, T2 intensity before gain, fine texture, coarse texture). Labels come from this table.
TISSUES = {
    "air": (0, 0, 0, 0), "subcut_fat": (1, 1150, .04, .05), "pelvic_fat": (1, 1020, .05, .08),
    "muscle": (1, 420, .07, .05), "vessel": (1, 160, .05, 0), "bowel": (1, 780, .12, .2),
    "bowel_gas": (1, 70, .1, 0), "seminal": (1, 1100, .12, .08), "nv_bundle": (1, 950, .05, 0),
    "periprostatic": (1, 600, .05, .08),  # its intensity is set per patient relative to the prostate
    "cortex": (2, 110, .08, 0), "marrow": (2, 860, .12, .08), "cartilage": (2, 520, .05, 0),
    "bladder_wall": (3, 430, .05, 0), "urine": (3, 1750, .01, .01),
    "rectal_wall": (4, 360, .06, .03), "rectal_gas": (4, 70, .1, 0), "feces": (4, 640, .12, .2),
    "capsule": (5, 560, .05, 0), "prostate_tz": (5, 650, .1, .1), "prostate_pz": (5, 740, .08, .06),
}
T = {name: i for i, name in enumerate(TISSUES)}
LABEL_LUT, INTENSITY_LUT, FINE_LUT, COARSE_LUT = (np.array(c, np.float32) for c in zip(*TISSUES.values()))


def case_anatomy(seed: int, case: int) -> dict:
    """Per-patient size, shape, organ geometry, tissue contrast and scanner gain."""
    r = np.random.default_rng([seed, 1000 + case])
    u = r.uniform
    s = u(0.92, 1.08)
    return {
        "s": s, "a": u(124, 144), "b": u(58, 66), "p": u(2.2, 2.9), "fat": u(4, 13),
        "dx": r.normal(0, 3), "dy": r.normal(0, 2), "rot": r.normal(0, 0.05), "bone": u(0.97, 1.14),
        "head_r": u(17, 21) * s, "head_x": u(70, 78) * s,
        "pro_s": u(0.8, 1.25), "pro_x": r.normal(0, 1.5), "pro_y": r.normal(-6, 1.5),
        "pro_t0": u(0.44, 0.5), "pro_h": u(0.2, 0.27), "pro_round": u(2.0, 2.6),
        "ring_ratio": u(0.8, 0.9), "ring_w": u(3, 7), "rec_r": u(7, 9.5),
        "rec_t0": u(0.33, 0.4), "rec_t1": u(0.82, 0.9), "sv_len": u(8, 13),
        "contrast": np.exp(r.normal(0, 0.06, len(TISSUES))).astype(np.float32),
        "gain": math.exp(u(math.log(0.6), math.log(1.6))), "offset": u(0, 150), "sigma": u(20, 32),
        "warp": [(u(1, 4), u(90, 220), u(90, 220), u(0, 6.3), u(0, 6.3)) for _ in range(2)],
    }


def week_state(seed: int, case: int, week: int) -> dict:
    """What changes between weekly scans of one patient: bladder, rectum, position, coil, bowel."""
    r = np.random.default_rng([seed, 2000 + case, week])
    u = r.uniform
    bowel = [(u(-45, 45), u(-5, 40), u(6, 14), u(-0.1, 0.25), u(0.1, 0.3), u(0, 1)) for _ in range(r.integers(4, 9))]
    return {
        "fill": u(0.3, 1.3), "distend": u(0, 1), "gas": u(0, 0.5), "dx": r.normal(0, 2), "dy": r.normal(0, 1.5),
        "rot": r.normal(0, 0.025), "t0": u(-0.03, 0.03), "span": u(0.96, 1.04), "gain": u(0.95, 1.05),
        "bias": r.normal(0, [0.12, 0.12, 0.08, 0.08, 0.06, 0.1]), "bowel": bowel,
    }


def volume_grid(anat: dict, wk: dict, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient coordinates (mm from the pelvis centre, y anterior) of every pixel, rotated and warped."""
    X, Y = np.meshgrid(np.arange(256, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    x, y = X - 127.5 - anat["dx"] - wk["dx"], Y - (width - 1) / 2 - anat["dy"] - wk["dy"]
    c, s = math.cos(anat["rot"] + wk["rot"]), math.sin(anat["rot"] + wk["rot"])
    x, y = c * x + s * y, -s * x + c * y
    for amp, lx, ly, px, py in anat["warp"]:  # smooth warp: organs are not perfect ellipses
        x, y = x + amp * np.sin(x / lx * 6.28 + px) * np.cos(y / ly * 6.28 + py), y + amp * np.sin(y / ly * 6.28 + px)
    return x.astype(np.float32), y.astype(np.float32)


def level(x, y, cx, cy, rx, ry, angle=0.0, p=2.0) -> np.ndarray:
    """Superellipse 'radius' of every pixel: < 1 inside the shape, 1 on its outline."""
    c, s = math.cos(angle), math.sin(angle)
    u, v = ((x - cx) * c + (y - cy) * s) / rx, (-(x - cx) * s + (y - cy) * c) / ry
    if p == 2.0:
        return np.sqrt(u * u + v * v)
    return (np.abs(u) ** p + np.abs(v) ** p) ** (1.0 / p)


def profile(t: float, t0: float, t1: float) -> float:
    """Cross-section scale of an ellipsoid spanning t0..t1 along the scan (0 outside)."""
    q = (2 * t - t0 - t1) / (t1 - t0)
    return math.sqrt(1 - q * q) if abs(q) < 1 else 0.0


def draw_bones(tis, x, y, t, anat) -> None:
    """Pelvic ring and femora: dark cortex around marrow, unioned before the marrow is filled."""
    k, hr = anat["bone"] * anat["s"], anat["head_r"]
    shapes = []  # (level map, smallest radius)
    for side in (-1.0, 1.0):
        xs = side * x
        q = t / 0.42
        if q < 1:  # iliac wing, running from the sacroiliac joint forward and outward
            shapes.append((level(xs, y, (60 + 10 * q) * k, (-18 + 16 * q) * k, (50 - 20 * q) * k, (6 + 9 * q) * k,
                                 0.62 - 0.3 * q), (6 + 9 * q) * k))
        if (f := profile(t, 0.28, 0.58)) > 0.2:  # acetabulum cupping the femoral head
            shapes.append((level(xs, y, anat["head_x"] - 5, 0, (hr + 7) * f, (hr + 6) * f), (hr + 6) * f))
        if (f := profile(t, 0.45, 0.72)) > 0.2:  # femoral neck and greater trochanter
            shapes.append((level(xs, y, anat["head_x"] + 22 * k, -2, 22 * k * f, 14 * k * f, -0.3), 14 * k * f))
        if t > 0.64:  # femoral shaft
            shapes.append((level(xs, y, (94 - 8 * (t - 0.64)) * k, -6, 14 * k, 14 * k), 14 * k))
        if (f := profile(t, 0.48, 0.66)) > 0.2:  # superior pubic ramus
            shapes.append((level(xs, y, 40 * k, 26 * k, 30 * k * f, 7 * k, -0.45), 7 * k))
        if (f := profile(t, 0.56, 0.8)) > 0.2:  # body of the pubis at the symphysis
            shapes.append((level(xs, y, 14 * k, 36 * k, 12 * k * f, 9 * k * f, -0.35), 9 * k * f))
        if (f := profile(t, 0.74, 0.97)) > 0.2:  # inferior pubic / ischial ramus
            shapes.append((level(xs, y, 40 * k, 12 * k, 24 * k * f, 6 * k, -1.0), 6 * k))
        if (f := profile(t, 0.48, 0.9)) > 0.2:  # ischium and its tuberosity
            shapes.append((level(xs, y, 50 * k, -28 * k, 13 * k * f, 18 * k * f, 0.35), 13 * k * f))
    if t < 0.46:  # sacrum, narrowing downwards
        q = t / 0.46
        r = (11 - 3 * q) * k
        shapes.append((level(x, y, 0, (-50 + 4 * q) * k, (36 - 22 * q) * k, r, 0, 2.4), r))
    if shapes:
        tis[np.any([lv < 1 for lv, _ in shapes], axis=0)] = T["cortex"]
        tis[np.any([lv < 1 - 2.5 / max(r, 3.0) for lv, r in shapes], axis=0)] = T["marrow"]
    if (f := profile(t, 0.33, 0.56)) > 0.15:  # femoral heads in their joint space
        for side in (-1.0, 1.0):
            lv = level(side * x, y, anat["head_x"], 2, hr * f, hr * f)
            tis[(lv < 1 + 2.5 / (hr * f)) & (lv >= 1)] = T["cartilage"]
            tis[lv < 1] = T["cortex"]
            tis[lv < 1 - 2.0 / (hr * f)] = T["marrow"]


def draw_labels(anat: dict, wk: dict, t: float, x, y, rng) -> np.ndarray:
    """Tissue map (indices into TISSUES) of one slice at scan position t (0 top, 1 bottom)."""
    k, a, b = anat["s"], anat["a"], anat["b"]
    tis = np.full(x.shape, T["air"], np.uint8)
    body = level(x, y, 0, 0, a, b, 0, anat["p"]) < 1
    if t > 0.8:  # thighs part below the perineum: notches front and back
        g = (t - 0.8) / 0.2
        body &= level(x, y, 0, b + 4, 8 + 20 * g, 6 + 18 * g) >= 1
        body &= level(x, y, 0, -b - 2, 4 + 8 * g, 6 + 12 * g) >= 1
    inner = level(x, y, 0, 0, a - 1.3 * anat["fat"], b - anat["fat"], 0, anat["p"]) < 1
    tis[body] = T["subcut_fat"]
    tis[inner] = T["pelvic_fat"]
    muscles = [(75, -40, 46, 18, 0.5, 0.0, 0.95),  # gluteus maximus
               (102, -4, 22, 30, 0.2, 0.0, 0.5),  # gluteus medius / minimus
               (56 + 10 * t, 14 + 18 * t, 17, 12, 0.3, 0.0, 0.66),  # iliopsoas
               (18, 54, 16, 5, 0.0, 0.0, 0.55),  # rectus abdominis
               (44, -8, 6, 20, 0.15, 0.45, 0.8),  # obturator internus
               (88 + 8 * t, 8, 32 + 12 * t, 34, -0.2, 0.7, 1.2),  # quadriceps around the femur
               (46, 12, 22 + 14 * t, 26, 0.4, 0.72, 1.2),  # adductors
               (70, -36, 26, 18, 0.3, 0.8, 1.2)]  # hamstrings
    for side in (-1.0, 1.0):
        for mx, my, rx, ry, ang, t0, t1 in muscles:
            if t0 <= t <= t1:
                tis[inner & (level(side * x, y, mx * k, my * k, rx * k, ry * k, ang) < 1)] = T["muscle"]
        if 0.15 < t < 0.62:  # external iliac vessels
            tis[level(side * x, y, 54 * k, 24 * k, 4, 4) < 1] = T["vessel"]
    planes = cv2.GaussianBlur(rng.standard_normal(x.shape).astype(np.float32), (0, 0), 5)
    septa = np.abs(planes) < 0.05 * planes.std()  # curvy fat planes between muscle bundles
    tis[septa & (tis == T["muscle"])] = T["pelvic_fat"]
    for bx, by, br, b0, b1, gas in wk["bowel"]:  # small bowel and sigmoid loops above the bladder
        if (f := profile(t, b0, b1)) > 0.3:
            lv = level(x, y, bx * k, by * k, br * f, 0.8 * br * f)
            tis[lv < 1] = T["bowel"]
            if gas > 0.6:
                tis[lv < 0.45] = T["bowel_gas"]
    draw_bones(tis, x, y, t, anat)
    draw_pelvic_organs(tis, x, y, t, anat, wk, rng)
    tis[~body] = T["air"]
    return tis


def soft_tissue(tis: np.ndarray) -> np.ndarray:
    """Pixels not (yet) bone, which muscles and fat drawn later must not overwrite."""
    return (tis != T["cortex"]) & (tis != T["marrow"]) & (tis != T["cartilage"])


def draw_pelvic_organs(tis, x, y, t, anat, wk, rng) -> None:
    """Bladder, seminal vesicles, prostate with its capsule and surround, and the rectum."""
    k, f = anat["s"], wk["fill"]
    p0, p1 = anat["pro_t0"], anat["pro_t0"] + anat["pro_h"]
    b1 = p0 + 0.03  # the bladder base rests on the prostate base
    b0 = b1 - (0.16 + 0.22 * f)  # a fuller bladder domes higher
    if (g := profile(t, b0, b1)) > 0.1:
        rx, ry = (22 + 14 * f) * k * g, (12 + 12 * f) * k * g
        lv = level(x, y, 0, (12 + 8 * f) * k, rx, ry, 0, 2.3)
        tis[lv < 1] = T["bladder_wall"]
        tis[lv < 1 - 1.8 / ry] = T["urine"]
    if (g := profile(t, p0 - 0.1, p0 + 0.03)) > 0.2:
        for side in (-1.0, 1.0):
            tis[level(side * x, y, 12 * k, -15 * k, anat["sv_len"] * g, 4 * g, 0.25) < 1] = T["seminal"]
    cx, cy = anat["pro_x"], anat["pro_y"] * k
    rec = profile(t, anat["rec_t0"], anat["rec_t1"])
    if (g := profile(t, p0, p1)) > 0:
        g = min(1.0, 1.25 * g) * (1.15 - 0.3 * (t - p0) / (p1 - p0))  # broad base, narrow apex
        rx, ry = 17 * anat["pro_s"] * k * g, 13 * anat["pro_s"] * k * g
        if rec > 0:  # levator ani slings around prostate and rectum
            sling = level(x, y, cx, cy - 14 * k, rx + 14, ry + 22, 0, 2.2)
            tis[(sling < 1) & (sling > 0.9) & (y < cy - 4) & soft_tissue(tis)] = T["muscle"]
        lv = level(x, y, cx, cy, rx, ry, 0, anat["pro_round"])
        angle = np.arctan2(y - cy, x - cx)
        wobble = 0.7 + 0.5 * np.sin(2 * angle + wk["rot"] * 40) + 0.3 * np.sin(5 * angle)
        ring = (lv < 1 + 2 * anat["ring_w"] * np.clip(wobble, 0.2, None) / (rx + ry)) & soft_tissue(tis)
        tis[ring] = T["periprostatic"]  # uneven surround, so its outline does not give the prostate away
        for side in (-1.0, 1.0):
            tis[ring & (level(side * (x - cx), y, 0.85 * rx, cy - 0.8 * ry, 2.5, 2.5) < 1)] = T["nv_bundle"]
        tis[lv < 1] = T["prostate_pz"]
        tis[level(x, y, cx, cy + 0.3 * ry, 0.72 * rx, 0.62 * ry) < 1] = T["prostate_tz"]
        rim = (lv < 1) & (lv > 1 - 1.6 / ry) & (np.sin(angle * 3 + 10 * anat["pro_s"]) > -0.3)
        tis[rim] = T["capsule"]  # faint and incomplete, as on real T2
    if rec > 0:
        r = anat["rec_r"] * (0.8 + 0.45 * wk["distend"]) * (0.75 + 0.35 * rec) * k
        ry = r * (0.75 + 0.2 * wk["distend"])
        lv = level(x, y, cx + 3 * math.sin(7 * t), -(29 + 4 * (1 - t)) * k - ry + 9, 1.25 * r, ry)
        tis[lv < 1] = T["rectal_wall"]
        lumen = lv < 1 - 2.5 / ry
        blobs = cv2.GaussianBlur(rng.standard_normal(x.shape).astype(np.float32), (0, 0), 2.5)
        gas = blobs > np.quantile(blobs[lumen], 1 - wk["gas"]) if lumen.any() and wk["gas"] > 0.02 else False
        tis[lumen] = T["feces"]
        tis[lumen & gas] = T["rectal_gas"]


def render_intensity(tis: np.ndarray, anat: dict, rng) -> np.ndarray:
    """Noise-free T2 intensity: tissue values with texture, blurred for partial volume at borders."""
    def field(sigma):
        f = cv2.GaussianBlur(rng.standard_normal(tis.shape).astype(np.float32), (0, 0), sigma)
        return f / (f.std() + 1e-6)
    base = (INTENSITY_LUT * anat["contrast"])[tis]
    pro = INTENSITY_LUT[T["prostate_pz"]] * anat["contrast"][T["prostate_pz"]]
    base[tis == T["periprostatic"]] = anat["ring_ratio"] * pro  # low prostate contrast, per patient
    img = base * (1 + FINE_LUT[tis] * field(0.7) + COARSE_LUT[tis] * field(2.5))
    return cv2.GaussianBlur(img, (0, 0), 0.8)


def bias_field(x: np.ndarray, y: np.ndarray, t: float, coef: np.ndarray) -> np.ndarray:
    """Smooth multiplicative coil shading, brighter towards the body surface."""
    u, v = x / 128, y / 64
    terms = coef[0] * u + coef[1] * v + coef[2] * u * u + coef[3] * v * v + coef[4] * u * v + coef[5] * (t - 0.5)
    return np.exp(terms + 0.12 * (u * u + v * v)).astype(np.float32)


def rician_noise(signal: np.ndarray, sigma: float, rng) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise (Rician; Rayleigh where there is no signal)."""
    re = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.sqrt(re * re + im * im)


def render_slice(anat, wk, vol, z, grid=None) -> tuple[np.ndarray, np.ndarray]:
    """One (image, mask) pair, both float32 (256, width)."""
    rng = np.random.default_rng([anat["seed"], vol["split_index"], vol["case"], vol["week"], z])
    x, y = grid if grid is not None else volume_grid(anat, wk, vol["width"])
    t = wk["t0"] + wk["span"] * (z + 0.5) / vol["slices"]
    tis = draw_labels(anat, wk, t, x, y, rng)
    gain = anat["gain"] * wk["gain"]
    img = render_intensity(tis, anat, rng) * bias_field(x, y, t, wk["bias"]) * gain
    img = rician_noise(img, anat["sigma"] * gain, rng) + anat["offset"]
    # Steps of 1/16 lie far below the noise (sigma ~20-50) and make the files 30% smaller.
    return (np.round(img * 16) / 16).astype(np.float32), LABEL_LUT[tis]


def volume_state(seed: int, vol: dict) -> tuple[dict, dict]:
    """Patient anatomy and weekly state of one volume."""
    anat = case_anatomy(seed, vol["case"])
    anat["seed"] = seed
    return anat, week_state(seed, vol["case"], vol["week"])

"""Box geometry and the detection/grounding answer text format: the one place that turns
object polygons into the text a model is trained on (render_answer) and a model's text back
into polygons (parse_answer), so training and evaluation can never disagree about coordinates.

Polygons are flat lists of 8 floats [x1, y1, ..., x4, y4] in pixels of the record's own image
(x right, y down). Three box kinds can be written:
    poly  x1,y1,x2,y2,x3,y3,x4,y4   vertices from the top-most (then left-most), clockwise on screen
    hbox  x1,y1,x2,y2               horizontal box (min corner, max corner)
    rbox  cx,cy,w,h,a               rotated box, le90: w >= h, a in [-90, 90) integer degrees
in the model's coordinate frame (coord_scale): "abs" = pixels of the resized image the model sees
(Qwen2.5-VL), "norm1000" = 0..1000 (Qwen3-VL). model coordinate = pixel * s.

Decisions (documented because eval numbers depend on them):
  * Rendered numbers are integers, rounded half up (floor(v + 0.5)).
  * Model coordinates are clipped to the continuous frame [0, resized_w] x [0, resized_h]
    (or [0, 1000]); a vertex on the right image border stays on it after a round trip.
  * Parsed coordinates map back with pixel = model / s, then are clipped to [0, width] x [0, height].
  * rbox is fitted in model space (anisotropic resizing changes angles), so a rotated
    rectangle comes back as a parallelogram when sx != sy; that is the shape the text describes.

Example:
    >>> objs = [{"poly": [10, 10, 50, 10, 50, 30, 10, 30], "label": "large-vehicle"}]
    >>> render_answer(objs, 100, 100, resized_hw=(200, 200))
    '20,20,100,20,100,60,20,60 large vehicle'
    >>> parse_answer('20,20,100,20,100,60,20,60 large vehicle', 100, 100, resized_hw=(200, 200),
    ...              classes=["large-vehicle"])[0]
    [{'poly': [10.0, 10.0, 50.0, 10.0, 50.0, 30.0, 10.0, 30.0], 'label': 'large-vehicle'}]
"""
import difflib
import json
import math
import re
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
from shapely.geometry import MultiPoint, Polygon, box as shapely_box

from common import UserError


BOX_FORMATS = {"poly": 8, "hbox": 4, "rbox": 5}  # numbers per box
NONE_ANSWER = "There are none."
MIN_AREA = 1e-6  # px^2; anything smaller counts as zero-area
JSON_KEYS = {"bbox_2d": "hbox", "bbox": "hbox", "poly": "poly", "rbox": "rbox",
             "quadrant bbox": "poly", "oriented bbox": "rbox"}  # the last two: RSCoVLM's JSON answers


# -----------------------------------------------------------------------------
# Geometry

def canonical_poly(poly):
    """Same quadrilateral, starting at the top-most (then left-most) vertex, clockwise on screen.

    >>> canonical_poly([0, 10, 10, 10, 10, 0, 0, 0])  # bottom-left, counter-clockwise on screen
    [0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]
    """
    pts = np.asarray(poly, dtype=np.float64).reshape(4, 2)
    x, y = pts[:, 0], pts[:, 1]
    # shoelace with y down: positive = clockwise on screen; degenerate (0) keeps its order
    if float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)) < 0:
        pts = pts[::-1]
    start = min(range(4), key=lambda i: (pts[i, 1], pts[i, 0]))
    return np.roll(pts, -start, axis=0).reshape(-1).tolist()


def fix_poly(poly):
    """Make a predicted quadrilateral usable: None if non-finite or zero-area, the convex hull
    for a self-intersecting ("bow-tie") one, otherwise the polygon unchanged.

    >>> fix_poly([0, 0, 10, 10, 10, 0, 0, 10])  # bow-tie -> its hull, the 10x10 square
    [0.0, 0.0, 10.0, 0.0, 10.0, 10.0, 0.0, 10.0]
    >>> fix_poly([0, 0, 5, 5, 10, 10, 0, 0]) is None  # collinear
    True
    """
    try:
        vals = [float(v) for v in poly]
    except (TypeError, ValueError):
        return None
    if len(vals) != 8 or not all(math.isfinite(v) for v in vals):
        return None
    pairs = list(zip(vals[0::2], vals[1::2]))
    shape = Polygon(pairs)
    if shape.is_valid:
        return vals if shape.area > MIN_AREA else None
    hull = MultiPoint(pairs).convex_hull
    if hull.geom_type != "Polygon" or hull.area <= MIN_AREA:
        return None
    corners = list(hull.exterior.coords)[:-1]  # 3 or 4 points (the ring repeats its first)
    if len(corners) == 3:
        corners.append(corners[-1])  # a triangle stays a quadrilateral: repeat one vertex
    return canonical_poly([c for p in corners for c in p])


def poly_to_hbox(poly):
    """[xmin, ymin, xmax, ymax] of a polygon.

    >>> poly_to_hbox([5, 0, 10, 5, 5, 10, 0, 5])
    [0.0, 0.0, 10.0, 10.0]
    """
    xs, ys = [float(v) for v in poly[0::2]], [float(v) for v in poly[1::2]]
    return [min(xs), min(ys), max(xs), max(ys)]


def hbox_to_poly(b):
    """Polygon of a horizontal box (corners in either order), canonical vertex order.

    >>> hbox_to_poly([10, 20, 0, 5])
    [0.0, 5.0, 10.0, 5.0, 10.0, 20.0, 0.0, 20.0]
    """
    x1, x2 = sorted((float(b[0]), float(b[2])))
    y1, y2 = sorted((float(b[1]), float(b[3])))
    return [x1, y1, x2, y1, x2, y2, x1, y2]


def le90(cx, cy, w, h, a):
    """Normalise a rotated box to le90: w >= h, angle in [-90, 90) degrees. A square is
    ambiguous modulo 90 degrees, so its angle is put in [-45, 45).

    >>> le90(0, 0, 2, 4, 30)      # w < h: swap and turn by 90
    [0, 0, 4, 2, -60]
    >>> le90(0, 0, 4, 2, 90)      # 90 is the same rectangle as -90
    [0, 0, 4, 2, -90]
    """
    if w < h:
        w, h, a = h, w, a + 90
    a = (a + 90) % 180 - 90
    if w == h:
        a = (a + 45) % 90 - 45
    return [cx, cy, w, h, a]


def _hull(pts):
    """Convex hull of a few 2-D points (Andrew's monotone chain), 1 to n points."""
    pts = sorted(set(pts))
    if len(pts) <= 2:
        return pts

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return half(pts) + half(pts[::-1])


def poly_to_rbox(poly):
    """Minimum-area rectangle around a polygon as [cx, cy, w, h, angle_deg] (le90, floats).
    Angles are clockwise on screen (y down): the w side points along (cos a, sin a).

    >>> poly_to_rbox([0, 0, 4, 0, 4, 2, 0, 2])
    [2.0, 1.0, 4.0, 2.0, 0.0]
    >>> [round(v, 6) for v in poly_to_rbox([1, 0, 2, 1, 1, 2, 0, 1])]  # diamond = square at 45
    [1.0, 1.0, 1.414214, 1.414214, -45.0]
    """
    pts = [(float(x), float(y)) for x, y in zip(poly[0::2], poly[1::2])]
    hull = _hull(pts)
    if len(hull) == 1:
        return le90(hull[0][0], hull[0][1], 0.0, 0.0, 0.0)
    best = None
    for i in range(len(hull)):  # the min-area rectangle has a side on a hull edge
        (x0, y0), (x1, y1) = hull[i], hull[(i + 1) % len(hull)]
        norm = math.hypot(x1 - x0, y1 - y0)
        if norm == 0:
            continue
        ux, uy = (x1 - x0) / norm, (y1 - y0) / norm
        us = [px * ux + py * uy for px, py in pts]    # along the edge
        vs = [-px * uy + py * ux for px, py in pts]   # perpendicular, (-uy, ux)
        w, h = max(us) - min(us), max(vs) - min(vs)
        if best is None or w * h < best[0] - 1e-9:
            mu, mv = (max(us) + min(us)) / 2, (max(vs) + min(vs)) / 2
            best = (w * h, mu * ux - mv * uy, mu * uy + mv * ux, w, h, math.degrees(math.atan2(uy, ux)))
    return le90(*best[1:])


def rbox_to_poly(r):
    """Corners of a rotated box [cx, cy, w, h, angle_deg], canonical vertex order:
    centre +- (w/2)(cos a, sin a) +- (h/2)(-sin a, cos a).

    >>> [round(v, 6) for v in rbox_to_poly([2, 1, 4, 2, 0])]
    [0.0, 0.0, 4.0, 0.0, 4.0, 2.0, 0.0, 2.0]
    """
    cx, cy, w, h, a = (float(v) for v in r[:5])
    c, s = math.cos(math.radians(a)), math.sin(math.radians(a))
    ux, uy, vx, vy = w / 2 * c, w / 2 * s, -h / 2 * s, h / 2 * c
    corners = [(cx - ux - vx, cy - uy - vy), (cx + ux - vx, cy + uy - vy),
               (cx + ux + vx, cy + uy + vy), (cx - ux + vx, cy - uy + vy)]
    return canonical_poly([v for p in corners for v in p])


# -----------------------------------------------------------------------------
# Labels

def class_to_text(name):
    """Class name as written in prompts and answers.

    >>> class_to_text("large-vehicle"), class_to_text("Expressway_Service-area")
    ('large vehicle', 'expressway service area')
    """
    return re.sub(r"[\s_-]+", " ", str(name)).strip().lower()


def match_label(text, classes):
    """(canonical class name | None, exact) for a label the model wrote: exact after class_to_text
    normalisation, else the closest class by difflib (cutoff 0.6), else None.

    >>> match_label("Large Vehicle", ["large-vehicle", "ship"]), match_label("ships", ["ship"])
    (('large-vehicle', True), ('ship', False))
    """
    norm = class_to_text(text)[:200]  # cap: difflib is quadratic and junk can be long
    by_text = {class_to_text(c): c for c in classes}
    if norm in by_text:
        return by_text[norm], True
    close = difflib.get_close_matches(norm, list(by_text), n=1, cutoff=0.6)
    return (by_text[close[0]], False) if close else (None, False)


# -----------------------------------------------------------------------------
# Class lists and label files: DOTA labelTxt, FAIR1M, DIOR-R and DIOR-RSVG XML, each read to [{"poly", "label",
# "difficult"}] (canonical class names: lower case, hyphenated)

DOTA_CLASSES = {
    "1.0": ["plane", "baseball-diamond", "bridge", "ground-track-field", "small-vehicle", "large-vehicle", "ship",
            "tennis-court", "basketball-court", "storage-tank", "soccer-ball-field", "roundabout", "harbor",
            "swimming-pool", "helicopter"],
}
DOTA_CLASSES["1.5"] = DOTA_CLASSES["1.0"] + ["container-crane"]
DOTA_CLASSES["2.0"] = DOTA_CLASSES["1.5"] + ["airport", "helipad"]

DIOR_CLASSES = ["airplane", "airport", "baseballfield", "basketballcourt", "bridge", "chimney",
                "expressway-service-area", "expressway-toll-station", "dam", "golffield", "groundtrackfield",
                "harbor", "overpass", "ship", "stadium", "storagetank", "tenniscourt", "trainstation", "vehicle",
                "windmill"]
# FAIR1M-1.0's 37 class names as its XML files and its benchmark's submission spell them; the canonical names
# (FAIR1M_CLASSES) are these lower-cased with spaces -> hyphens ("Liquid Cargo Ship" -> "liquid-cargo-ship").
FAIR1M_NAMES = ["Boeing737", "Boeing747", "Boeing777", "Boeing787", "C919", "A220", "A321", "A330", "A350", "ARJ21",
                "other-airplane", "Passenger Ship", "Motorboat", "Fishing Boat", "Tugboat", "Engineering Ship",
                "Liquid Cargo Ship", "Dry Cargo Ship", "Warship", "other-ship", "Small Car", "Bus", "Cargo Truck",
                "Dump Truck", "Van", "Trailer", "Tractor", "Excavator", "Truck Tractor", "other-vehicle",
                "Basketball Court", "Tennis Court", "Football Field", "Baseball Field", "Intersection", "Roundabout",
                "Bridge"]
FAIR1M_CLASSES = [n.lower().replace(" ", "-") for n in FAIR1M_NAMES]


def check_numbers(tokens, where, n=8):
    """n finite numbers (8 = a 4-point polygon) -> list of floats, else UserError naming `where`."""
    if len(tokens) != n:
        raise UserError(f"{where}: polygon has {len(tokens) // 2} points, expected 4" if n == 8
                        else f"{where}: expected {n} numbers, got {len(tokens)}")
    out = []
    for tok in tokens:
        try:
            v = float(tok)
        except (TypeError, ValueError):
            raise UserError(f"{where}: coordinate {tok!r} is not a number") from None
        if not math.isfinite(v):
            raise UserError(f"{where}: coordinate {tok!r} is not finite")
        out.append(v)
    return out


def _is_number(tok):
    try:
        float(tok)
        return True
    except ValueError:
        return False


def read_text(path):
    """A text file's content; a file that is not UTF-8 text (an image, a zip) raises UserError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def read_dota_labels(path, classes=None):
    """One DOTA labelTxt file -> [{"poly", "label", "difficult"}], the reader of data_prep.py and eval_det.py.
    `imagesource:` / `gsd:` headers and blank lines are skipped; every other line must be `x1 y1 ... x4 y4
    class [difficult]` with 8 finite numbers and an integer difficult flag (missing = 0; kept as written, 2 =
    cut by a patch border), else UserError naming the file and line. The DOTA devkit's parse_gt reads valid
    files the same; it differs where it would go wrong quietly or crash: it splits on single spaces, takes any
    line of fewer than 9 tokens for a header (an object line cut short is lost) and accepts NaN corners.
    classes: when given, a label outside it is an error too (eval_det counts unknown labels itself, with a
    hint about the class list)."""
    objects = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        parts = line.split()
        where = f"bad label line {lineno} in {path}"
        if not parts or (len(parts) < 9 and ":" in line):  # blank or a header
            continue
        n_num = next((i for i, t in enumerate(parts) if not _is_number(t)), len(parts))
        if n_num < 8 and len(parts) - n_num <= 2:  # the numbers stop early, then class [difficult]
            raise UserError(f"{where}: polygon has fewer than 4 points ({n_num} numbers before the class)")
        if len(parts) not in (9, 10):
            raise UserError(f"{where}: expected 9 or 10 fields (x1 y1 .. x4 y4 class [difficult]), got {len(parts)}")
        poly = check_numbers(parts[:8], where)
        label = parts[8]
        if classes is not None and label not in classes:
            raise UserError(f"{where}: unknown class {label!r}")
        try:
            difficult = int(parts[9]) if len(parts) == 10 else 0
        except ValueError:
            raise UserError(f"{where}: difficult flag {parts[9]!r} is not an integer") from None
        objects.append({"poly": poly, "label": label, "difficult": difficult})
    return objects


def read_xml(path):
    """The root element of an XML file; a file that is not XML raises UserError naming it."""
    try:
        return ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None


def read_fair1m_xml(path, classes=None):
    """A FAIR1M XML, label file or submission: <object><possibleresult><name>Liquid Cargo Ship</name>
    [<probability>0.9</probability>]</possibleresult><points><point>x,y</point> x5</points> (the fifth point
    repeats the first) -> [{"poly", "label" ('liquid-cargo-ship'), "difficult": 0, + "score" in a submission}].
    classes: when given, a label outside it is an error (eval_det counts unknown labels itself)."""
    objects = []
    for k, obj in enumerate(read_xml(path).iter("object"), 1):
        where = f"bad object {k} in {path}"
        name = obj.findtext("possibleresult/name")
        if not name or not name.strip():
            raise UserError(f"{where}: no possibleresult/name")
        label = "-".join(name.strip().lower().split())
        if classes is not None and label not in classes:
            raise UserError(f"{where}: unknown class {name!r}")
        pts = [p.text.split(",") for p in obj.findall("points/point") if p.text]
        if any(len(p) != 2 for p in pts):
            raise UserError(f"{where}: a point is not 'x,y'")
        xy = check_numbers([v for p in pts for v in p], where, n=2 * len(pts))
        # the closing point repeats the first, written as "1.0,2.0" or "1.000000,2" alike: compare numbers
        if len(pts) == 5 and math.dist(xy[:2], xy[8:]) <= 1e-3:
            xy = xy[:8]
        if len(xy) != 8:
            raise UserError(f"{where}: polygon has {len(pts)} points, expected 4 (+ the first repeated)")
        objects.append({"poly": xy, "label": label, "difficult": 0})
        if obj.findtext("possibleresult/probability"):  # a submission's detection
            objects[-1]["score"] = check_numbers([obj.findtext("possibleresult/probability")], f"{where}: probability", 1)[0]
    return objects


DIOR_CORNERS = ["x_left_top", "y_left_top", "x_right_top", "y_right_top", "x_right_bottom", "y_right_bottom",
                "x_left_bottom", "y_left_bottom"]


def read_dior_xml(path, classes):
    """DIOR-R: VOC XML, <object><name>, <difficult>, <robndbox> with the four corners. Also returns the size."""
    root = read_xml(path)
    objects = []
    for k, obj in enumerate(root.iter("object"), 1):
        where = f"bad object {k} in {path}"
        label = (obj.findtext("name") or "").strip().lower()
        if label not in classes:
            raise UserError(f"{where}: unknown class {obj.findtext('name')!r}")
        rb = obj.find("robndbox")
        if rb is None:
            raise UserError(f"{where}: no <robndbox>")
        poly = check_numbers([rb.findtext(t) for t in DIOR_CORNERS if rb.findtext(t) is not None], where)
        diff = (obj.findtext("difficult") or "0").strip()
        objects.append({"poly": poly, "label": label, "difficult": int(diff) if diff.isdigit() else 0})
    size = (int(root.findtext("size/width") or 0), int(root.findtext("size/height") or 0))
    return objects, size


def read_rsvg_object(obj, where):
    """One DIOR-RSVG <object> (an XML element): {"poly" (its <bndbox>), "label", "difficult": 0, "expression"
    (its <description>)}, else UserError starting with `where`."""
    b = obj.find("bndbox")
    if b is None:
        raise UserError(f"{where}: no <bndbox>")
    x0, y0, x1, y1 = check_numbers([b.findtext(t) for t in ("xmin", "ymin", "xmax", "ymax")], where, n=4)
    if not (x1 > x0 and y1 > y0):
        raise UserError(f"{where}: empty box {x0},{y0},{x1},{y1}")
    text = (obj.findtext("description") or "").strip()
    if not text:
        raise UserError(f"{where}: no <description>")
    label = (obj.findtext("name") or "").strip().lower()
    return {"poly": hbox_to_poly([x0, y0, x1, y1]), "label": label, "difficult": 0, "expression": text}


# -----------------------------------------------------------------------------
# Windows of a large image (DOTA tiling: MMRotate's img_split rule, docs/data.md "Tiling"; data_prep.py cuts
# the patches)

def window_starts(length, patch, step):
    """Window starts along one side: every `step` px, the last one shifted to end at the border."""
    if length <= patch:
        return [0]
    n = math.ceil((length - patch) / step + 1)
    starts = [step * i for i in range(n)]
    if starts[-1] + patch > length:
        starts[-1] = length - patch  # last window ends at the border
    return starts


def sliding_windows(width, height, patch, gap, img_rate_thr=0.6):
    """[(x0, y0, x1, y1)], x-major order like MMRotate."""
    assert patch > gap, f"--patch {patch} must be larger than --gap {gap}"
    step = patch - gap
    wins = [(x, y, x + patch, y + patch) for x in window_starts(width, patch, step)
            for y in window_starts(height, patch, step)]
    rates = [(min(x1, width) - x0) * (min(y1, height) - y0) / (patch * patch) for x0, y0, x1, y1 in wins]
    if not any(r > img_rate_thr for r in rates):
        rates = [1.0 if abs(r - max(rates)) < 0.01 else r for r in rates]
    return [w for w, r in zip(wins, rates) if r > img_rate_thr]


def object_shapes(objects):
    """(hbox, shapely polygon, area) per object; a self-intersecting label polygon is measured by its hull."""
    out = []
    for o in objects:
        pts = list(zip(o["poly"][0::2], o["poly"][1::2]))
        poly = Polygon(pts)
        if not poly.is_valid:
            poly = MultiPoint(pts).convex_hull
        xs, ys = o["poly"][0::2], o["poly"][1::2]
        out.append(((min(xs), min(ys), max(xs), max(ys)), poly, poly.area))
    return out


def objects_in_window(objects, shapes, win, iof_thr):
    """Objects kept in window (x0, y0, x1, y1), shifted into it; truncated ones (iof < 1) get difficult 2."""
    x0, y0, x1, y1 = win
    wbox, kept = None, []
    for o, ((bx0, by0, bx1, by1), poly, area) in zip(objects, shapes):
        if bx1 < x0 or bx0 > x1 or by1 < y0 or by0 > y1 or area <= 0:
            continue
        inside = bx0 >= x0 and by0 >= y0 and bx1 <= x1 and by1 <= y1
        if not inside:
            wbox = wbox or shapely_box(x0, y0, x1, y1)
            if poly.intersection(wbox).area / area < iof_thr:
                continue
        shifted = [v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(o["poly"])]
        kept.append({"poly": [round(v, 3) for v in shifted], "label": o["label"],
                     "difficult": o["difficult"] if inside else 2})
    return kept


# -----------------------------------------------------------------------------
# Coordinate frames

def coord_scale(width, height, coords, resized_hw=None):
    """(sx, sy) with model coordinate = pixel * s.

    >>> coord_scale(1000, 500, "abs", resized_hw=(252, 504)), coord_scale(1000, 500, "norm1000")
    ((0.504, 0.504), (1.0, 2.0))
    """
    return _frame(width, height, coords, resized_hw)[:2]


def _frame(width, height, coords, resized_hw):
    """(sx, sy, frame_w, frame_h): scales and the extent model coordinates are clipped to."""
    if coords == "abs":
        fh, fw = (height, width) if resized_hw is None else resized_hw
    elif coords == "norm1000":
        fh, fw = 1000, 1000
    else:
        raise ValueError(f"unknown coords {coords!r}: expected 'abs' or 'norm1000'")
    return fw / width, fh / height, fw, fh


# -----------------------------------------------------------------------------
# Rendering: objects -> answer text

def _round(v):
    return int(math.floor(v + 0.5))  # half up; for clipped (non-negative) coords = half away from 0


def _model_numbers(poly, box_format, sx, sy, fw, fh):
    """Integers written for one polygon (original pixels) in the model frame."""
    xs = [min(max(float(x) * sx, 0.0), fw) for x in poly[0::2]]
    ys = [min(max(float(y) * sy, 0.0), fh) for y in poly[1::2]]
    mpoly = [v for p in zip(xs, ys) for v in p]
    if box_format == "poly":
        return [int(v) for v in canonical_poly([_round(v) for v in mpoly])]
    if box_format == "hbox":
        return [_round(v) for v in poly_to_hbox(mpoly)]
    cx, cy, w, h, a = poly_to_rbox(mpoly)
    return le90(_round(cx), _round(cy), _round(w), _round(h), _round(a))


def render_answer(objects, width, height, *, coords="abs", resized_hw=None, box_format="poly",
                  style="plain", with_label=True):
    """Answer text for objects [{"poly": 8 floats (pixels), "label": str}, ...].

    plain: one object per line `numbers label`; json: Qwen's fenced list of {"bbox_2d"|"poly"|
    "rbox": [...], "label": ...}. Sorted by label then top-left (y, x) in model coordinates;
    with_label=False (grounding) writes only the numbers and sorts by position. Identical lines
    are written once. No object -> "There are none." (plain) or an empty list (json).

    style "rscovlm" / "rscovlm-json": RSCoVLM's own text, plain or JSON form (render_rscovlm); with_label=False
    there means grounding, whose lines end with the object's expression, as RSCoVLM's are.

    >>> render_answer([{"poly": [0, 0, 4, 0, 4, 2, 0, 2], "label": "ship"}], 10, 10, box_format="rbox")
    '2,1,4,2,0 ship'
    """
    if style in ("rscovlm", "rscovlm-json") and box_format in BOX_FORMATS:
        return render_rscovlm(objects, width, height, coords=coords, resized_hw=resized_hw, box_format=box_format,
                              task="det" if with_label else "ground", form="json" if style == "rscovlm-json" else "plain")
    if box_format not in BOX_FORMATS or style not in ("plain", "json"):
        raise ValueError(f"bad box_format {box_format!r} or style {style!r}")
    sx, sy, fw, fh = _frame(width, height, coords, resized_hw)
    rows = []
    for i, obj in enumerate(objects):
        poly = obj["poly"]
        if len(poly) != 8 or not all(math.isfinite(float(v)) for v in poly):
            raise ValueError(f"object {i} (label {obj.get('label')!r}): poly must be 8 finite numbers, got {poly}")
        nums = _model_numbers(poly, box_format, sx, sy, fw, fh)
        label = class_to_text(obj["label"]) if with_label else ""
        corner = poly_to_hbox(nums if box_format != "rbox" else rbox_to_poly(nums))
        rows.append(((label, _round(corner[1]), _round(corner[0]), nums), nums, label))
    rows.sort(key=lambda r: r[0])
    lines, seen = [], set()
    for _, nums, label in rows:
        if style == "plain":
            line = ",".join(str(v) for v in nums) + (f" {label}" if with_label else "")
        else:
            item = {("bbox_2d" if box_format == "hbox" else box_format): nums}
            if with_label:
                item["label"] = label
            line = json.dumps(item, ensure_ascii=False)
        if line not in seen:
            seen.add(line)
            lines.append(line)
    if style == "plain":
        return "\n".join(lines) if lines else NONE_ANSWER
    return "```json\n[\n" + ",\n".join("\t" + line for line in lines) + ("\n" if lines else "") + "]\n```"


# -----------------------------------------------------------------------------
# RSCoVLM's answer text (meta.answer_style "rscovlm"), so its released checkpoints are trained and scored on
# the text they were trained on. As VisionXLab/RSCoVLM's rscovlm/training/data/dense_det_dataset.py (det)
# and refgeo_dataset.py (grounding) write it, plain form:
#   * a coordinate is int(v * resized / original): truncated toward zero, never clipped (objects cut by a patch
#     border keep corners outside it). Grounding truncates the original pixels first, int(int(v) * r / o), as
#     does the far corner x2, y2 of a detection hbox (its COCO x + w is int()ed before scaling).
#   * poly: the 4 truncated corners ordered by their angle around the corners' mean, from the top-most (then
#     left-most): clockwise on screen for detection, counter-clockwise for grounding.
#   * rbox: cv2.minAreaRect of the truncated corners; w < h swapped (angle + 90); angle wrapped into [-90, 90);
#     then int() of cx, cy, w, h, angle (cv_min_area_rect below: OpenCV's float32 arithmetic, no OpenCV).
#   * det label: the class name with '-' as ' ', lower case; grounding: the expression as written.
#   * det lines sorted by class (its alphabetical rank), then the hbox's truncated y1, x1; ties keep the input
#     order; no de-duplication; every line ends with a line break; no object: "There are none.".
#   * JSON form (meta.answer_style "rscovlm-json", RSCoVLM's other half of its training text): the same numbers
#     and order in '```json\n[\n\t' + ',\n\t'.join(items) + '\n]\n```', items {"bbox_2d" | "oriented bbox" |
#     "quadrant bbox": [...], "label": ...}: json.dumps for detection, the expression pasted unescaped for
#     grounding (refgeo_dataset.py builds that string by hand); no object: "There are none.".
# RSCoVLM has no Qwen3-VL code: for Qwen3-VL the same rules run in 0..1000 (resized = 1000).

# OpenCV's minimum-area rectangle, re-derived: RSCoVLM writes cv2.minAreaRect results, which OpenCV computes in
# float32 over its own convex-hull order, so a float64 fit truncates differently on ~15% of boxes (a 107-px side
# measures 106.99998 there). These functions repeat OpenCV 4.5.4-4.12's steps (imgproc convhull.cpp: Sklansky
# scans of the x-sorted points, convexHull(clockwise=False) as minAreaRect calls it; rotcalipers.cpp: rotating
# calipers choosing the next edge by the sign of a dot product, the last smallest area wins, the corner from two
# line equations) with numpy float32 scalars in the same operation order, for the integer points RSCoVLM passes.
# Checked against opencv-python-headless 4.10 and 4.12: equal on 40,000 random point sets (the raw tuple) and on
# every box of the shared DOTA/DIOR samples (tests/test_rscovlm_parity.py; the live comparison runs when cv2 is
# installed). OpenCV 4.13 changed ~0.5% of tiny or near-square boxes; x86-64 builds (no fused multiply-add).

_F = np.float32


def _sign(v):
    return (v > 0) - (v < 0)


def _half_scan(p, start, end, nsign, sign2):
    """One Sklansky scan over the x-sorted points p[start..end] (inclusive, either direction): the kept indices,
    integer arithmetic. nsign: the sign of dy that needs no turn test; sign2: the turn sign that keeps a point."""
    step = 1 if end > start else -1
    if start == end or p[start] == p[end]:
        return [start]
    prev, cur, nxt = start, start + step, start + 2 * step
    stack = [prev, cur, nxt]
    while nxt != end + step:
        dy = p[nxt][1] - p[cur][1]
        if _sign(dy) == nsign:
            nxt += step
            stack[-1] = nxt
            continue
        ax, ay = p[cur][0] - p[prev][0], p[cur][1] - p[prev][1]
        turn = ay * (p[nxt][0] - p[cur][0]) - ax * dy
        if _sign(turn) == sign2 and (ax or ay):  # convex: advance
            prev, cur, nxt = cur, nxt, nxt + step
            stack.append(nxt)
        elif prev == start:  # the first point stays, the middle one goes
            cur, nxt = nxt, nxt + step
            stack[1:3] = [cur, nxt]
        else:  # back up one point
            stack[-2] = nxt
            cur, prev = prev, stack[-4]
            stack.pop()
    return stack[:-1]


def cv_hull(points):
    """Indices of the convex hull of integer points in OpenCV's order for convexHull(clockwise=False) (4.5-4.12):
    Sklansky scans of the x-sorted points, then a cyclic shift that makes the indices monotone when it can."""
    n = len(points)
    order = sorted(range(n), key=lambda i: (points[i][0], points[i][1], i))
    p = [tuple(points[i]) for i in order]
    ymin = ymax = 0
    for i in range(1, n):
        ymin = i if p[ymin][1] > p[i][1] else ymin
        ymax = i if p[ymax][1] < p[i][1] else ymax
    if p[0] == p[-1]:
        return [order[0]]
    tr, tl = _half_scan(p, 0, ymax, -1, 1), _half_scan(p, n - 1, ymax, -1, -1)  # swapped: counter-clockwise
    out = [order[i] for i in tl[:-1]] + [order[i] for i in tr[:0:-1]]
    stop = tr[1] if len(tr) > 2 else tl[-2] if len(tl) > 2 else -1
    bl, br = _half_scan(p, 0, ymin, 1, -1), _half_scan(p, n - 1, ymin, 1, 1)
    if stop >= 0:
        check = bl[1] if len(bl) > 2 else br[2 - len(bl)] if len(bl) + len(br) > 2 else -1
        if check >= 0 and p[check] == p[stop]:  # all points on one line: the lower half mirrors the upper
            bl, br = bl[:2], br[:2]
    out += [order[i] for i in bl[:-1]] + [order[i] for i in br[:0:-1]]
    return _monotone_shift(out)


def _monotone_shift(h):
    """OpenCV's last step: rotate the hull indices to an ascending (or descending) run when one exists."""
    m = len(h)
    if m < 3:
        return h
    lo = hi = rises = 0
    for i in range(1, m):
        rises += h[i - 1] < h[i]
        if 1 < rises <= i - 2:
            break
        lo, hi = (i if h[i] < h[lo] else lo), (i if h[i] > h[hi] else hi)
    if abs(hi - lo) not in (1, m - 1) or 1 < rises < m - 2:
        return h
    asc = (hi + 1) % m == lo
    i0 = lo if asc else hi
    seq = h[i0:] + h[:i0]
    return seq if i0 > 0 and all((a < b) == asc for a, b in zip(seq, seq[1:])) else h


def _calipers(H):
    """OpenCV's rotating calipers over hull points H (float32 pairs): (corner index, base a, width, base b, height,
    bottom index) of the smallest area seen last (area <= best)."""
    n = len(H)
    vx = [_F(float(H[(i + 1) % n][0] - H[i][0])) for i in range(n)]
    vy = [_F(float(H[(i + 1) % n][1] - H[i][1])) for i in range(n)]
    inv = [_F(1.0 / math.sqrt(float(x) * float(x) + float(y) * float(y))) for x, y in zip(vx, vy)]
    ext = [0, 0, 0, 0]  # bottom, right, top, left: first index of the extreme y / x
    for i in range(1, n):
        for k, (axis, better) in enumerate(((1, -1), (0, 1), (1, 1), (0, -1))):
            if (H[i][axis] - H[ext[k]][axis]) * better > 0:
                ext[k] = i
    turn = next((c for c in (float(vx[i - 1]) * float(vy[i]) - float(vy[i - 1]) * float(vx[i]) for i in range(n)) if c), 0)
    if not turn:
        raise ValueError("degenerate hull")
    a, b, seq, best, area_min = _F(1 if turn > 0 else -1), _F(0), ext, None, _F(np.finfo(np.float32).max)
    for _ in range(n):
        rv = [(vx[seq[0]], vy[seq[0]]), (vy[seq[1]], -vx[seq[1]]), (-vx[seq[2]], -vy[seq[2]]), (-vy[seq[3]], vx[seq[3]])]
        main = 0
        for j in (1, 2, 3):  # the caliper whose edge turns least: rv[j] to the right of rv[main]
            if rv[j][1] * rv[main][0] + (-rv[j][0]) * rv[main][1] < 0:
                main = j
        k = seq[main]
        lx, ly = vx[k] * inv[k], vy[k] * inv[k]
        a, b = ((lx, ly), (ly, -lx), (-lx, -ly), (-ly, lx))[main]
        seq[main] = (k + 1) % n
        width = (H[seq[1]][0] - H[seq[3]][0]) * a + (H[seq[1]][1] - H[seq[3]][1]) * b
        height = -(H[seq[2]][0] - H[seq[0]][0]) * b + (H[seq[2]][1] - H[seq[0]][1]) * a
        if width * height <= area_min:
            area_min, best = width * height, (seq[3], a, width, b, height, seq[0])
    return best


def cv_min_area_rect(points):
    """cv2.minAreaRect(int points) as OpenCV 4.5.4-4.12 computes it in float32: ((cx, cy), (w, h), angle deg)."""
    idx = cv_hull(points)
    H = [(_F(points[i][0]), _F(points[i][1])) for i in idx]
    if len(H) == 1:
        return (float(H[0][0]), float(H[0][1])), (0.0, 0.0), 0.0
    if len(H) == 2:
        dx, dy = float(H[1][0] - H[0][0]), float(H[1][1] - H[0][1])
        c = ((H[0][0] + H[1][0]) * _F(0.5), (H[0][1] + H[1][1]) * _F(0.5))
        return (float(c[0]), float(c[1])), (float(_F(math.sqrt(dx * dx + dy * dy))), 0.0), _degrees(math.atan2(dy, dx))
    left, a1, w, b1, h, bottom = _calipers(H)
    a2, b2 = -b1, a1
    c1 = a1 * H[left][0] + H[left][1] * b1
    c2 = a2 * H[bottom][0] + H[bottom][1] * b2
    idet = _F(1) / (a1 * b2 - a2 * b1)
    px, py = (c1 * b2 - c2 * b1) * idet, (a1 * c2 - a2 * c1) * idet
    o1, o2 = (a1 * w, b1 * w), (a2 * h, b2 * h)
    cx, cy = px + (o1[0] + o2[0]) * _F(0.5), py + (o1[1] + o2[1]) * _F(0.5)
    size = [float(_F(math.sqrt(float(x) * float(x) + float(y) * float(y)))) for x, y in (o1, o2)]
    return (float(cx), float(cy)), tuple(size), _degrees(math.atan2(float(o1[1]), float(o1[0])))


def _degrees(rad):
    """OpenCV's (float)((float)angle * 180 / CV_PI): a float32 product, then a double division."""
    return float(_F(float(_F(rad) * _F(180)) / math.pi))


def rscovlm_label(name):
    """A class name as RSCoVLM writes it (prompts and answers): only '-' becomes ' ', then lower case.

    >>> rscovlm_label("Expressway-Service-area")
    'expressway service area'
    """
    return str(name).replace("-", " ").lower()


def rscovlm_order(points, clockwise=True):
    """RSCoVLM's vertex order: by angle around the mean of the points (ascending = clockwise on screen),
    rotated to start at the top-most (then left-most) point.

    >>> rscovlm_order([(0, 2), (4, 2), (4, 0), (0, 0)])
    [0, 0, 4, 0, 4, 2, 0, 2]
    >>> rscovlm_order([(0, 2), (4, 2), (4, 0), (0, 0)], clockwise=False)
    [0, 0, 0, 2, 4, 2, 4, 0]
    """
    cx = sum(x for x, _ in points) / len(points)
    cy = sum(y for _, y in points) / len(points)
    pts = sorted(points, key=lambda p: math.atan2(p[1] - cy, p[0] - cx), reverse=not clockwise)
    start = pts.index(min(pts, key=lambda p: (p[1], p[0])))
    return [v for p in pts[start:] + pts[:start] for v in p]


def rscovlm_rbox(points):
    """[cx, cy, w, h, angle] integers, as RSCoVLM derives them from integer corners: cv2.minAreaRect (here
    cv_min_area_rect, the same float32 arithmetic), w < h swapped with angle + 90, the angle wrapped into
    [-90, 90), then int() of each value.

    >>> rscovlm_rbox([(0, 0), (5, 0), (5, 3), (0, 3)]), rscovlm_rbox([(10, 10), (117, 10), (117, 50), (10, 50)])
    ([2, 1, 5, 3, 0], [63, 29, 106, 39, 0])
    """
    (cx, cy), (w, h), a = cv_min_area_rect(points)
    if w < h:
        w, h, a = h, w, a + 90
    while not 90 > a >= -90:
        a += -180 if a >= 90 else 180
    return [int(cx), int(cy), int(w), int(h), int(a)]


RSCOVLM_JSON_KEYS = {"hbox": "bbox_2d", "rbox": "oriented bbox", "poly": "quadrant bbox"}


def render_rscovlm(objects, width, height, *, coords="abs", resized_hw=None, box_format="poly", task="det",
                   form="plain"):
    """RSCoVLM's answer for objects [{"poly": 8 numbers (pixels), "label", ground: "expression"}] (rules in the
    comment above). task "det" or "ground"; form "plain" or "json".

    >>> objs = [{"poly": [10, 10, 51, 10, 51, 31, 10, 31], "label": "small-vehicle"}]
    >>> render_rscovlm(objs, 100, 100, resized_hw=(50, 50), box_format="hbox")
    '5,5,25,15 small vehicle\\n'
    >>> render_rscovlm(objs, 100, 100, resized_hw=(50, 50), box_format="hbox", form="json")
    '```json\\n[\\n\\t{"bbox_2d": [5, 5, 25, 15], "label": "small vehicle"}\\n]\\n```'
    """
    if box_format not in BOX_FORMATS or task not in ("det", "ground") or form not in ("plain", "json"):
        raise ValueError(f"bad box_format {box_format!r}, task {task!r} or form {form!r}")
    _, _, fw, fh = _frame(width, height, coords, resized_hw)
    ground = task == "ground"
    rows = []
    for i, obj in enumerate(objects):
        poly = obj["poly"]
        if len(poly) != 8 or not all(math.isfinite(float(v)) for v in poly):
            raise ValueError(f"object {i} (label {obj.get('label')!r}): poly must be 8 finite numbers, got {poly}")
        poly = [int(v) if ground else float(v) for v in poly]
        xs = [int(x * fw / width) for x in poly[0::2]]  # (v * resized) / original, RSCoVLM's order of operations
        ys = [int(y * fh / height) for y in poly[1::2]]
        x1, y1 = min(xs), min(ys)  # = int(min * r / o): truncation is monotone
        if box_format == "hbox":
            nums = [x1, y1, int(int(max(poly[0::2])) * fw / width), int(int(max(poly[1::2])) * fh / height)]
        elif box_format == "poly":
            nums = rscovlm_order(list(zip(xs, ys)), clockwise=not ground)
        else:
            nums = rscovlm_rbox(list(zip(xs, ys)))
        label = (obj.get("expression") or obj.get("label", "")) if ground else rscovlm_label(obj["label"])
        rows.append((() if ground else (label, y1, x1), _rscovlm_item(nums, label, box_format, form, ground)))
    rows.sort(key=lambda r: r[0])  # stable: equal keys keep the input order, as Python's sort in RSCoVLM does
    if not rows:
        return NONE_ANSWER
    if form == "json":
        return "```json\n[\n\t" + ",\n\t".join(item for _, item in rows) + "\n]\n```"
    return "".join(line + "\n" for _, line in rows)


def _rscovlm_item(nums, label, box_format, form, ground):
    """One object of RSCoVLM's answer: 'n1,n2,... label' (plain); a JSON object (json): json.dumps for detection,
    the expression pasted in without escaping for grounding, as RSCoVLM builds each."""
    if form == "plain":
        return ",".join(map(str, nums)) + f" {label}"
    key = RSCOVLM_JSON_KEYS[box_format]
    if ground:
        return f'{{"{key}": [{", ".join(map(str, nums))}], "label": "{label}"}}'
    return json.dumps({key: nums, "label": label})


# -----------------------------------------------------------------------------
# Parsing: answer text -> objects (never raises on any str)

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUM_RE = re.compile(_NUM)
_SEP = r"[\s,;:()\[\]{}<>]*"
_PREFIX_RE = re.compile(rf"(?:[-*•]\s+)?{_SEP}(?:{_NUM}{_SEP})+")  # leading numbers (after a bullet)
_NONE_RE = re.compile(r"(there (is|are) (none|no\b|nothing)|none\b|no (objects?|targets?)\b|nothing\b)")
_JSON_HINT_RE = re.compile(r"""['"](bbox_2d|bbox|poly|rbox|quadrant bbox|oriented bbox|label)['"]\s*:""")
_CHUNK_RE = re.compile(r"\{[^{}]*\}")
_KEY_RE = re.compile(r"""['"](bbox_2d|bbox|poly|rbox|quadrant bbox|oriented bbox)['"]\s*:\s*\[((?:[^\[\]]|\[[^\[\]]*\])*)\]""")
_LABEL_RE = re.compile(r"""['"]label['"]\s*:\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)')""")


def _clean_label(text):
    """Label text after the numbers: no brackets/quotes/punctuation around it, single spaces."""
    text = re.sub(r"\s+", " ", text).strip(" \t.,;:!?'\"`*-)]}>([{<")
    return text[:200] or None


def _plain_items(text, stats):
    """(numbers, label text, None) per object line; junk and 'none' lines are counted/skipped."""
    items = []
    for line in text.splitlines():
        line = line.strip()
        if not re.search(r"\w", line) or line.startswith("```"):
            continue  # blank, a code fence, or only punctuation such as "[]"
        if _NONE_RE.match(line.lower()):
            continue
        stats["lines"] += 1
        m = _PREFIX_RE.match(line)
        if not m:
            stats["junk_lines"] += 1
            continue
        nums = [float(v) for v in _NUM_RE.findall(m.group())]
        items.append((nums, _clean_label(line[m.end():]), None))
    return items


def _json_items(text, stats):
    """(numbers, label text, kind hint) per {...} object; a truncated trailing object counts invalid."""
    items, end = [], 0
    for m in _CHUNK_RE.finditer(text):
        end = m.end()
        stats["lines"] += 1
        key = _KEY_RE.search(m.group())
        if not key:
            stats["junk_lines"] += 1
            continue
        lab = _LABEL_RE.search(m.group())
        label = None
        if lab and lab.group(1) is not None:
            try:
                label = json.loads(f'"{lab.group(1)}"')
            except ValueError:
                label = lab.group(1)
        elif lab:
            label = lab.group(2)
        nums = [float(v) for v in _NUM_RE.findall(key.group(2))]
        items.append((nums, _clean_label(label or ""), JSON_KEYS[key.group(1)]))
    if "{" in text[end:]:  # cut off mid-object (max_new_tokens)
        stats["lines"] += 1
        stats["invalid_boxes"] += 1
    return items


def _item_poly(nums, kind, sx, sy, width, height):
    """Polygon in original pixels from model-frame numbers, clipped and fixed; None if invalid."""
    if not all(abs(v) < 1e9 for v in nums):  # also rejects nan/inf; nothing real is this far out
        return None
    if kind == "rbox":
        if nums[2] <= 0 or nums[3] <= 0:
            return None
        mpoly = rbox_to_poly(nums)
    elif kind == "hbox":
        mpoly = hbox_to_poly(nums)
    else:
        mpoly = nums
    poly = []
    for i, v in enumerate(mpoly):
        v = v / (sx if i % 2 == 0 else sy)
        if not math.isfinite(v):
            return None
        poly.append(min(max(v, 0.0), float(width if i % 2 == 0 else height)))
    return fix_poly(poly)


def parse_answer(text, width, height, *, coords="abs", resized_hw=None, box_format=None, classes=None):
    """Objects and counts from a model's answer. Never raises on any str.

    Returns (objects, stats): objects = [{"poly": 8 floats in original-image pixels (valid,
    inside the image), "label": class name | None}] in answer order. With classes, labels are
    matched by match_label (fuzzy matches kept and counted, unknown ones dropped and counted);
    without, the raw label text is kept. A JSON object's key gives its kind, box_format or not
    (bbox_2d hbox, poly, rbox; RSCoVLM's "quadrant bbox" poly, "oriented bbox" rbox); plain answers
    take box_format, else the kind of the most common count of numbers among their lines (8 poly,
    5 rbox, 4 hbox; else the largest that fits some line) for every line. A box with too few numbers is invalid; extra numbers are dropped (counted).
    Every counted line ends up in exactly one of boxes, junk_lines, invalid_boxes,
    unknown_labels, duplicates.

    >>> objs, st = parse_answer("1,1,5,5 ship\\n1,1,5,5 ship\\nhello", 10, 10, classes=["ship"])
    >>> objs, st["duplicates"], st["junk_lines"]
    ([{'poly': [1.0, 1.0, 5.0, 1.0, 5.0, 5.0, 1.0, 5.0], 'label': 'ship'}], 1, 1)
    """
    if box_format is not None and box_format not in BOX_FORMATS:
        raise ValueError(f"unknown box_format {box_format!r}: expected one of {list(BOX_FORMATS)}")
    sx, sy, _, _ = _frame(width, height, coords, resized_hw)
    stats = dict.fromkeys(["lines", "boxes", "junk_lines", "unknown_labels", "mapped_labels",
                           "invalid_boxes", "duplicates", "extra_numbers"], 0)
    text = text if isinstance(text, str) else str(text)
    is_json = "{" in text and _JSON_HINT_RE.search(text)
    items = _json_items(text, stats) if is_json else _plain_items(text, stats)

    # One format per answer (a record has one box_format): a truncated 8-number line that kept
    # 5 or 4 numbers must not pass as an rbox or hbox.
    exact = {n: k for k, n in BOX_FORMATS.items()}
    kinds = Counter(exact[len(nums)] for nums, _, _ in items if len(nums) in exact)
    answer_kind = kinds.most_common(1)[0][0] if kinds else next(
        (k for k in ("poly", "rbox", "hbox") if any(len(n) >= BOX_FORMATS[k] for n, _, _ in items)), None)
    objects, seen = [], set()
    for nums, label, hint in items:
        kind = hint or box_format or answer_kind
        if kind is None or len(nums) < BOX_FORMATS[kind]:
            stats["invalid_boxes"] += 1
            continue
        if len(nums) > BOX_FORMATS[kind]:
            stats["extra_numbers"] += 1
            nums = nums[:BOX_FORMATS[kind]]
        poly = _item_poly(nums, kind, sx, sy, width, height)
        if poly is None:
            stats["invalid_boxes"] += 1
            continue
        mapped = False
        if classes is not None and label is not None:
            name, is_exact = match_label(label, classes)
            if name is None:
                stats["unknown_labels"] += 1
                continue
            label, mapped = name, not is_exact
        key = (tuple(poly), label)
        if key in seen:
            stats["duplicates"] += 1
            continue
        seen.add(key)
        stats["mapped_labels"] += mapped
        objects.append({"poly": poly, "label": label})
    stats["boxes"] = len(objects)
    return objects, stats

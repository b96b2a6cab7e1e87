"""Tests for boxes.py: geometry against hand-computed cases, render/parse round trips at several
pixel budgets and aspect ratios, stats on a hand-written messy answer, and a fuzz test that the
parser never raises and only returns valid polygons inside the image."""
import math
import random

import numpy as np
import pytest
from shapely.geometry import Polygon, box

import boxes


# -----------------------------------------------------------------------------
# helpers


def smart_resize(h, w, factor=28, min_pixels=4 * 28 * 28, max_pixels=1280 * 28 * 28):
    """Qwen-VL style resize: multiples of factor, pixel count within [min_pixels, max_pixels]."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


# (width, height, coords, resized_hw): sizes x pixel budgets, plus original pixels and norm1000
FRAMES = []
for _w, _h in [(800, 800), (1024, 512), (712, 557)]:
    FRAMES.append((_w, _h, "abs", None))
    FRAMES.append((_w, _h, "norm1000", None))
    for _budget in (256, 1024, 4096):
        FRAMES.append((_w, _h, "abs", smart_resize(_h, _w, max_pixels=_budget * 28 * 28)))


def cyclic_err(a, b):
    """Max per-coordinate difference of two quads, over the 4 cyclic vertex shifts (same direction)."""
    a, b = np.reshape(a, (4, 2)), np.reshape(b, (4, 2))
    return min(np.abs(np.roll(a, k, axis=0) - b).max() for k in range(4))


def iou(p, q):
    p, q = Polygon(np.reshape(p, (4, 2))), Polygon(np.reshape(q, (4, 2)))
    return p.intersection(q).area / p.union(q).area


def random_quad(rng, w, h):
    """Convex quadrilateral of 40..200 px well inside a w x h image."""
    r = rng.uniform(20, 100)
    cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
    gaps = rng.uniform(0.8, 1.2, 4)  # angular gaps < pi and radii near r: a convex quad
    angles = rng.uniform(0, 2 * np.pi) + np.cumsum(gaps * 2 * np.pi / gaps.sum())
    radii = rng.uniform(0.8, 1.0, 4) * r
    return np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).reshape(-1).tolist()


def random_rect(rng, w, h):
    """Rotated rectangle (as a poly) of 40..200 px x 20..w, fully inside the image."""
    rw, rh = rng.uniform(40, 200), rng.uniform(20, 100)
    half = math.hypot(rw, rh) / 2
    cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
    return boxes.rbox_to_poly([cx, cy, rw, rh, rng.uniform(-180, 180)])


def objects_for(kind, rng, w, h, n=12):
    make = random_rect if kind == "rbox" else random_quad
    return [{"poly": make(rng, w, h), "label": f"class-{i:02d}"} for i in range(n)]


# -----------------------------------------------------------------------------
# geometry


def test_canonical_poly_order():
    square = [0, 0, 10, 0, 10, 10, 0, 10]  # clockwise on screen from top-left
    for k in range(4):
        rolled = square[2 * k:] + square[:2 * k]
        assert boxes.canonical_poly(rolled) == square
        ccw = [v for i in (0, 3, 2, 1) for v in rolled[2 * i:2 * i + 2]]
        assert boxes.canonical_poly(ccw) == square
    # diamond: top-most vertex first, then right (clockwise on screen)
    assert boxes.canonical_poly([0, 5, 5, 10, 10, 5, 5, 0]) == [5, 0, 10, 5, 5, 10, 0, 5]
    # tie on the top edge: the left-most of the top-most vertices starts
    assert boxes.canonical_poly([9, 0, 3, 0, 0, 7, 12, 7])[:2] == [3, 0]


def test_le90_hand_cases():
    assert boxes.le90(0, 0, 4, 2, 0) == [0, 0, 4, 2, 0]
    assert boxes.le90(0, 0, 2, 4, 0) == [0, 0, 4, 2, 90 - 180]  # swap: +90 -> 90 == -90
    assert boxes.le90(0, 0, 4, 2, 90) == [0, 0, 4, 2, -90]
    assert boxes.le90(0, 0, 4, 2, 135) == [0, 0, 4, 2, -45]
    assert boxes.le90(0, 0, 2, 4, 30) == [0, 0, 4, 2, -60]
    assert boxes.le90(0, 0, 4, 2, -270) == [0, 0, 4, 2, -90]
    assert boxes.le90(0, 0, 3, 3, 60) == [0, 0, 3, 3, -30]  # square: [-45, 45)


def test_poly_to_rbox_hand_cases():
    # 4 x 2 axis-aligned rectangle, any vertex order
    assert boxes.poly_to_rbox([4, 2, 0, 2, 0, 0, 4, 0]) == [2, 1, 4, 2, 0]
    # vertical 2 x 6 rectangle: w is the long side, along y -> angle -90
    cx, cy, w, h, a = boxes.poly_to_rbox([0, 0, 2, 0, 2, 6, 0, 6])
    assert (cx, cy, w, h) == pytest.approx((1, 3, 6, 2)) and a == pytest.approx(-90)
    # 30-degree rectangle 10 x 4 (clockwise on screen, y down), corners computed by hand
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    corners = [(-5 * c + 2 * s, -5 * s - 2 * c), (5 * c + 2 * s, 5 * s - 2 * c),
               (5 * c - 2 * s, 5 * s + 2 * c), (-5 * c - 2 * s, -5 * s + 2 * c)]
    poly = [v + 100 for p in corners for v in p]
    assert boxes.poly_to_rbox(poly) == pytest.approx([100, 100, 10, 4, 30])
    assert cyclic_err(boxes.rbox_to_poly([100, 100, 10, 4, 30]), poly) < 1e-9
    # parallelogram (area 40): the rectangle on its base edge is 12 x 4 = 48; on the slanted edge 80
    r = boxes.poly_to_rbox([0, 0, 10, 0, 12, 4, 2, 4])
    assert r[2] * r[3] == pytest.approx(48) and r[4] == pytest.approx(0)


def test_rbox_poly_inverse_random():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = sorted(rng.uniform(1, 100, 2))[::-1]
        r = [rng.uniform(0, 500), rng.uniform(0, 500), w, h, rng.uniform(-90, 90)]
        back = boxes.poly_to_rbox(boxes.rbox_to_poly(r))
        assert back[:4] == pytest.approx(r[:4], abs=1e-6)
        assert -90 <= back[4] < 90 and (back[4] - r[4] + 1e-6) % 180 < 2e-6


def test_hbox_helpers():
    assert boxes.poly_to_hbox([5, 0, 10, 5, 5, 10, 0, 5]) == [0, 0, 10, 10]
    assert boxes.hbox_to_poly([10, 20, 0, 5]) == [0, 5, 10, 5, 10, 20, 0, 20]


def test_fix_poly():
    # bow-tie (0,0)-(10,10)-(10,0)-(0,10): hull is the 10x10 square, area 100
    fixed = boxes.fix_poly([0, 0, 10, 10, 10, 0, 0, 10])
    assert fixed == [0, 0, 10, 0, 10, 10, 0, 10] and Polygon(np.reshape(fixed, (4, 2))).area == 100
    # bow-tie whose hull is the triangle (0,0),(8,0),(0,8): area 32, one vertex repeated
    fixed = boxes.fix_poly([0, 0, 4, 4, 8, 0, 0, 8])
    shape = Polygon(np.reshape(fixed, (4, 2)))
    assert shape.is_valid and shape.area == pytest.approx(32) and len(set(map(tuple, np.reshape(fixed, (4, 2))))) == 3
    # valid quads are returned unchanged (also non-convex ones), degenerate ones are None
    assert boxes.fix_poly([0, 0, 10, 0, 3, 3, 0, 10]) == [0, 0, 10, 0, 3, 3, 0, 10]
    assert boxes.fix_poly([10, 0, 0, 0, 0, 10, 10, 10]) == [10, 0, 0, 0, 0, 10, 10, 10]
    assert boxes.fix_poly([0, 0, 5, 5, 10, 10, 2, 2]) is None
    assert boxes.fix_poly([1, 1] * 4) is None
    assert boxes.fix_poly([0, 0, 10, 0, 10, float("nan"), 0, 10]) is None
    assert boxes.fix_poly([0, 0, 10, 0, 10, float("inf"), 0, 10]) is None


def test_labels():
    classes = ["large-vehicle", "small-vehicle", "ship", "harbor", "Expressway-Service-area"]
    assert boxes.class_to_text("Expressway-Service-area") == "expressway service area"
    assert boxes.class_to_text("ground_track_field") == "ground track field"
    assert boxes.match_label("large vehicle", classes) == ("large-vehicle", True)
    assert boxes.match_label("  Large  Vehicle ", classes) == ("large-vehicle", True)
    assert boxes.match_label("expressway service area", classes) == ("Expressway-Service-area", True)
    assert boxes.match_label("small vehicles", classes) == ("small-vehicle", False)
    assert boxes.match_label("harbour", classes) == ("harbor", False)
    assert boxes.match_label("airplane", classes) == (None, False)
    assert boxes.match_label("", classes) == (None, False)


def test_coord_scale():
    assert boxes.coord_scale(1024, 512, "abs") == (1.0, 1.0)
    assert boxes.coord_scale(1024, 512, "abs", resized_hw=(252, 504)) == (504 / 1024, 252 / 512)
    assert boxes.coord_scale(1024, 512, "norm1000") == (1000 / 1024, 1000 / 512)
    with pytest.raises(ValueError):
        boxes.coord_scale(10, 10, "relative")


# -----------------------------------------------------------------------------
# render / parse round trips


def test_render_format_hand_case():
    objs = [{"poly": [60, 10, 80, 10, 80, 20, 60, 20], "label": "ship"},
            {"poly": [10, 50, 30, 50, 30, 60, 10, 60], "label": "small-vehicle"},
            {"poly": [12.5, 40, 30, 40, 30, 49.6, 12.5, 49.6], "label": "ship"}]
    # resized 50x100 for a 100x200 (w x h) image: s = 0.5; 12.5*0.5 = 6.25 -> 6, 49.6*0.5 = 24.8 -> 25
    text = boxes.render_answer(objs, 100, 200, resized_hw=(100, 50))
    assert text == ("30,5,40,5,40,10,30,10 ship\n"
                    "6,20,15,20,15,25,6,25 ship\n"
                    "5,25,15,25,15,30,5,30 small vehicle")
    assert boxes.render_answer(objs[:1], 100, 200, box_format="hbox", with_label=False) == "60,10,80,20"
    assert boxes.render_answer([], 100, 200) == "There are none."
    # rounding is half up: 2.5 -> 3 (Python's round would give 2)
    assert boxes.render_answer([{"poly": [2.5, 0, 9, 0, 9, 9, 2.5, 9], "label": "a"}], 10, 10,
                               box_format="hbox") == "3,0,9,9 a"
    # model coordinates are clipped to the model frame [0, 1000]
    assert boxes.render_answer([{"poly": [-5, 0, 12, 0, 12, 5, -5, 5], "label": "a"}], 10, 10,
                               coords="norm1000", box_format="hbox") == "0,0,1000,500 a"


@pytest.mark.parametrize("width,height,coords,resized_hw", FRAMES)
@pytest.mark.parametrize("kind", ["poly", "hbox", "rbox"])
def test_round_trip(kind, width, height, coords, resized_hw):
    rng = np.random.default_rng(hash((kind, width, height, coords, resized_hw)) % 2**32)
    objs = objects_for(kind, rng, width, height)
    classes = [o["label"] for o in objs]
    kw = dict(coords=coords, resized_hw=resized_hw)
    sx, sy = boxes.coord_scale(width, height, **kw)
    text = boxes.render_answer(objs, width, height, box_format=kind, **kw)
    parsed, stats = boxes.parse_answer(text, width, height, classes=classes, **kw)
    assert stats["boxes"] == len(objs) == stats["lines"] and stats["mapped_labels"] == 0
    got = {o["label"]: o["poly"] for o in parsed}
    # integer rounding in the model frame: 0.5 / s px (<= 1 px for these budgets, and half a
    # 1000th of the image side for norm1000)
    tol = 0.5 / min(sx, sy) + 1e-6
    for o in objs:
        poly = got[o["label"]]
        if kind == "poly":
            assert cyclic_err(poly, o["poly"]) <= tol
        elif kind == "hbox":
            assert np.abs(np.subtract(boxes.poly_to_hbox(poly), boxes.poly_to_hbox(o["poly"]))).max() <= tol
        else:
            # the rbox is fitted in model space; the reference is that rectangle mapped back.
            # Rounding moves a corner by <= |d centre| + |d w|/2 + |d h|/2 + (w + h)/2 * 0.5 deg (model px)
            mpoly = [v * (sx if i % 2 == 0 else sy) for i, v in enumerate(o["poly"])]
            r = boxes.poly_to_rbox(mpoly)
            ref = [v / (sx if i % 2 == 0 else sy) for i, v in enumerate(boxes.rbox_to_poly(r))]
            ref = np.clip(np.reshape(ref, (4, 2)), 0, [width, height]).reshape(-1)
            bound = (math.sqrt(0.5) + 0.5 + (r[2] + r[3]) / 2 * math.radians(0.5)) / min(sx, sy)
            assert cyclic_err(poly, ref) <= bound + 1e-6
            if abs(sx / sy - 1) < 0.03:  # nearly isotropic: the original rectangle comes back
                assert iou(poly, o["poly"]) > 0.9


def test_rbox_render_hand_cases():
    # 89.7 degrees rounds to 90, which le90 writes as -90; a 40 x 10 box at -30 degrees stays put
    objs = [{"poly": boxes.rbox_to_poly([50, 50, 40, 10, 89.7]), "label": "a"},
            {"poly": boxes.rbox_to_poly([150.2, 50, 10, 40.4, 60]), "label": "b"}]
    assert boxes.render_answer(objs, 200, 200, box_format="rbox") == "50,50,40,10,-90 a\n150,50,40,10,-30 b"


def test_rbox_rendered_le90():
    rng = np.random.default_rng(1)
    objs = objects_for("rbox", rng, 712, 557, n=50)
    text = boxes.render_answer(objs, 712, 557, coords="norm1000", box_format="rbox", with_label=False)
    for line in text.splitlines():
        cx, cy, w, h, a = map(int, line.split(","))
        assert w >= h and -90 <= a < 90


@pytest.mark.parametrize("kind", ["poly", "hbox", "rbox"])
def test_json_round_trip(kind):
    rng = np.random.default_rng(2)
    objs = objects_for(kind, rng, 1024, 512, n=5)
    kw = dict(coords="abs", resized_hw=smart_resize(512, 1024, max_pixels=1024 * 28 * 28))
    text = boxes.render_answer(objs, 1024, 512, box_format=kind, style="json", **kw)
    assert text.startswith("```json\n[") and ('"bbox_2d"' if kind == "hbox" else f'"{kind}"') in text
    plain = boxes.render_answer(objs, 1024, 512, box_format=kind, **kw)
    from_json, stats = boxes.parse_answer(text, 1024, 512, classes=[o["label"] for o in objs], **kw)
    from_plain, _ = boxes.parse_answer(plain, 1024, 512, classes=[o["label"] for o in objs], **kw)
    assert from_json == from_plain and stats["boxes"] == 5 and stats["lines"] == 5
    # truncated mid-object: the complete objects are salvaged, the cut one counts as invalid
    cut = text[:text.rindex("{") + 15]
    salvaged, stats = boxes.parse_answer(cut, 1024, 512, **kw)
    assert [o["poly"] for o in salvaged] == [o["poly"] for o in from_json[:4]]
    assert salvaged[0]["label"] == "class 00"  # classes=None keeps the raw label text
    assert stats["invalid_boxes"] == 1 and stats["lines"] == 5
    assert boxes.parse_answer(boxes.render_answer([], 10, 10, style="json"), 10, 10)[0] == []


def test_grounding_numbers_only():
    objs = [{"poly": [10, 20, 40, 20, 40, 60, 10, 60], "label": "ship"}]
    text = boxes.render_answer(objs, 100, 100, box_format="hbox", with_label=False)
    parsed, stats = boxes.parse_answer(text, 100, 100, classes=["ship"])
    assert text == "10,20,40,60" and parsed == [{"poly": [10, 20, 40, 20, 40, 60, 10, 60], "label": None}]
    assert boxes.parse_answer("[10, 20, 40, 60]", 100, 100)[0] == parsed


@pytest.mark.parametrize("text", ["There are none.", "there are none", "None.", "There are no objects.",
                                  "There is no ship in the image.", "```\nThere are none.\n```", ""])
def test_none_answers(text):
    objects, stats = boxes.parse_answer(text, 100, 100, classes=["ship"])
    assert objects == [] and all(v == 0 for v in stats.values())


def test_messy_answer_stats():
    classes = ["large-vehicle", "small-vehicle", "ship", "harbor"]
    text = "\n".join([
        "Here are the objects:",                                     # junk
        "10,10,50,10,50,30,10,30 large vehicle",                     # box 1
        "10,10,50,10,50,30,10,30 large vehicle",                     # duplicate
        "(100, 100), (150, 100), (150, 140), (100, 140) ship.",      # box 2: brackets, spaces, period
        "200,200,260,200,260,240,200,240,1 small vehicles",          # box 3: extra number, fuzzy label
        "300,300,340,300,340,330,300,330 airplane",                  # unknown label, dropped
        "400,400,440,440,440,400,400,440 harbour",                   # box 4: bow-tie -> hull, fuzzy
        "500,500,500,500,500,500,500,500 ship",                      # invalid: zero area
        "-50,-50,-10,-50,-10,-10,-50,-10 ship",                      # invalid: outside -> zero area
        "",
        "1,2,3",                                                     # invalid: too few numbers
        "[900, 900, 950, 900, 950, 950, 9",                          # truncated: invalid
    ])
    objects, stats = boxes.parse_answer(text, 1000, 1000, classes=classes)
    assert stats == {"lines": 11, "boxes": 4, "junk_lines": 1, "unknown_labels": 1, "mapped_labels": 2,
                     "invalid_boxes": 4, "duplicates": 1, "extra_numbers": 1}
    assert [o["label"] for o in objects] == ["large-vehicle", "ship", "small-vehicle", "harbor"]
    assert objects[1]["poly"] == [100, 100, 150, 100, 150, 140, 100, 140]
    assert objects[2]["poly"] == [200, 200, 260, 200, 260, 240, 200, 240]
    assert objects[3]["poly"] == [400, 400, 440, 400, 440, 440, 400, 440]
    # classes=None keeps raw label text
    raw, _ = boxes.parse_answer(text, 1000, 1000)
    assert [o["label"] for o in raw][:4] == ["large vehicle", "ship", "small vehicles", "airplane"]


def test_format_inferred_per_answer():
    # a poly line cut after 5 or 4 numbers must not pass as an rbox or hbox
    text = "10,10,50,10,50,30,10,30 ship\n60,60,90,60,90,80,60,80 ship\n60,60,90,60,90\n5,5,20,8"
    objects, stats = boxes.parse_answer(text, 100, 100)
    assert len(objects) == 2 and stats["invalid_boxes"] == 2
    assert len(boxes.parse_answer("60,60,90,60,90", 100, 100)[0]) == 1  # alone it is an rbox
    for bad in ("1,1,5,0,0 ship", "5,5,4,-3,0 ship"):  # rbox with h = 0 or h < 0
        assert boxes.parse_answer(bad, 10, 10)[1]["invalid_boxes"] == 1


def test_parse_maps_back_and_clips():
    # norm1000 on a 2000 x 500 image: x / 1000 * 2000, y / 1000 * 500; 1200 is clipped to the border
    objects, _ = boxes.parse_answer("100,200,1200,400 ship", 2000, 500, coords="norm1000")
    assert objects[0]["poly"] == [200, 100, 2000, 100, 2000, 200, 200, 200]
    # rbox in model space (s = 0.5): 20 x 10 model px -> 40 x 20 px
    objects, _ = boxes.parse_answer("50,50,20,10,0 ship", 200, 200, resized_hw=(100, 100), box_format="rbox")
    assert objects[0]["poly"] == pytest.approx([80, 90, 120, 90, 120, 110, 80, 110])


# -----------------------------------------------------------------------------
# fuzz: never raises, only valid polygons inside the image


JUNK = ["nan", "inf", "-inf", "1e400", "-7", "99999999999999999999", "1e-320", "é", "🛰️", "\u2028", "{",
        "}", "[", "]", '"bbox_2d": [', '"label": "', "```json", "\n", ",", ".", "-", "  ", "\x00", "0x1F",
        "There are none.", '{"poly": [1,2,3]}', "\t", "\\", "1,2,3,4,5,6,7,8", "--5", "+.5e3"]


def mutate(rng, text):
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        pos = rng.randint(0, len(text))
        if op == 0:
            text = text[:pos]
        elif op == 1:
            text = text[:pos] + rng.choice(JUNK) + text[pos:]
        elif op == 2:
            chars = list(text[pos:pos + rng.randint(2, 40)])
            rng.shuffle(chars)
            text = text[:pos] + "".join(chars) + text[pos + len(chars):]
        elif op == 3:
            text = text.replace(str(rng.randint(0, 9)), rng.choice(JUNK), rng.randint(1, 3))
        elif op == 4:
            lines = text.split("\n")
            text = "\n".join(lines + lines[:rng.randint(0, len(lines))])
        else:
            text = "".join(rng.choice("0123456789,.-e []{}\":abcx_\n") for _ in range(rng.randint(0, 80)))
    return text


def test_fuzz_parser_never_raises():
    rng = random.Random(1234)
    nrng = np.random.default_rng(1234)
    classes = ["large-vehicle", "small-vehicle", "ship", "harbor"]
    bases = []
    for kind in ("poly", "hbox", "rbox"):
        objs = [{"poly": random_quad(nrng, 1024, 512), "label": rng.choice(classes)} for _ in range(4)]
        for style in ("plain", "json"):
            bases.append(boxes.render_answer(objs, 1024, 512, coords="norm1000", box_format=kind, style=style))
    for i in range(10_000):
        text = mutate(rng, rng.choice(bases))
        w, h = rng.choice([(1024, 512), (37, 800), (1, 1)])
        coords = rng.choice(["abs", "norm1000"])
        objects, stats = boxes.parse_answer(
            text, w, h, coords=coords, resized_hw=rng.choice([None, (56, 28)]) if coords == "abs" else None,
            box_format=rng.choice([None, "poly", "hbox", "rbox"]), classes=rng.choice([None, classes]))
        assert stats["boxes"] == len(objects)
        assert stats["lines"] == sum(stats[k] for k in ("boxes", "junk_lines", "invalid_boxes",
                                                        "unknown_labels", "duplicates")), text
        frame = box(0, 0, w, h)
        for o in objects:
            assert len(o["poly"]) == 8 and all(math.isfinite(v) for v in o["poly"]), text
            shape = Polygon(np.reshape(o["poly"], (4, 2)))
            assert shape.is_valid and shape.area > 0 and frame.covers(shape), text
            assert o["label"] is None or isinstance(o["label"], str)

"""data_prep.py: tiling rules on the real DOTA samples, the DIOR sample, small fixtures for every other format,
real layouts (DIOR-R without trainval.txt, two dataset.json caption sets, FAIR1M's closing point), the DOTA label
reader against the devkit's rules, progress lines in a log file, bad input and wrong folders (through run_cli and
as a process: one line naming the right folder, exit code 2, nothing written), and synth (deterministic,
round-trips through model.tokenize)."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import Polygon, box

import boxes
import common
import data_prep
import model
import prompts
import synth
from cli_helpers import one_error_line, run_main
from common import UserError, read_records


REPO = Path(__file__).resolve().parents[1]


def run_synth(*argv):
    return synth.main(["data"] + [str(a) for a in argv])


def run(*argv):
    return data_prep.main([str(a) for a in argv])


def start_cli(*argv):
    """data_prep.py as a user runs it, in a subprocess (started, not waited for: the CLI cases run together)."""
    env = {k: v for k, v in os.environ.items() if k != "RSCOVLM_DEBUG"}
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.Popen([sys.executable, "data_prep.py", *map(str, argv)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def dota_labels(path):
    """Reference reader, the DOTA devkit's parse_gt rules (docs/reference.md): each line split on single spaces,
    fewer than 9 tokens is a header, the 10th token an integer difficult (0 when absent). [(poly, label, difficult)]"""
    out = []
    for line in Path(path).read_text().splitlines():
        p = line.strip().split(" ")
        if len(p) >= 9:
            out.append(([float(v) for v in p[:8]], p[8], int(p[9]) if len(p) == 10 else 0))
    return out


def write_png(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return arr


# -----------------------------------------------------------------------------
# Window rules (hand-computed from MMRotate's img_split: step = patch - gap, last window shifted to the border)


def test_sliding_windows_match_hand_computed():
    # P0706 is 1111 x 1182: x = 0, then 824 shifted back to 1111 - 1024 = 87; y = 0, 1182 - 1024 = 158
    assert boxes.sliding_windows(1111, 1182, 1024, 200) == [
        (0, 0, 1024, 1024), (0, 158, 1024, 1182), (87, 0, 1111, 1024), (87, 158, 1111, 1182)]
    # 512 / 200 (step 312): 0, 312, 624 -> 1111 - 512 = 599
    assert boxes.window_starts(1111, 512, 312) == [0, 312, 599]
    assert boxes.window_starts(1024, 1024, 824) == [0]  # exactly one window
    assert boxes.window_starts(1848, 1024, 824) == [0, 824]  # last window ends exactly at the border
    assert boxes.sliding_windows(712, 557, 1024, 200) == [(0, 0, 1024, 1024)]  # small image: one padded window


# -----------------------------------------------------------------------------
# Real DOTA samples


@pytest.fixture(scope="module")
def dota_val(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dota_val")
    summary = run("dota", "--root", shared_data / "dota", "--split", "val", "--out", out, "--workers", "1")
    return out, {r["id"]: r for r in read_jsonl(out / "dota_val.jsonl")}, summary


def test_dota_real_samples_tile_as_the_rules_say(shared_data, dota_val):
    out, recs, _ = dota_val
    assert set(recs) == {"P0706__1024__0___0", "P0706__1024__0___158", "P0706__1024__87___0",
                         "P0706__1024__87___158", "P1888__1024__0___0"}
    for name, (W, H) in {"P0706": (1111, 1182), "P1888": (712, 557)}.items():
        src = np.asarray(Image.open(shared_data / "dota" / "images" / f"{name}.png").convert("RGB"))
        gt = dota_labels(shared_data / "dota" / "labelTxt" / f"{name}.txt")
        for rid, r in recs.items():
            if r["meta"]["source"] != name:
                continue
            x0, y0 = r["meta"]["offset"]
            assert rid == f"{name}__1024__{x0}___{y0}"
            assert r["meta"]["width"] == r["meta"]["height"] == 1024
            assert r["meta"]["source_size"] == [W, H] and r["meta"]["rate"] == 1.0
            patch = np.asarray(Image.open(out / r["images"][0]))
            assert patch.shape == (1024, 1024, 3)
            h, w = min(1024, H - y0), min(1024, W - x0)
            assert np.array_equal(patch[:h, :w], src[y0:y0 + h, x0:x0 + w])
            assert not patch[h:].any() and not patch[:, w:].any()  # padding is 0
            # expected objects, computed here independently with shapely
            win = box(x0, y0, x0 + 1024, y0 + 1024)
            expected = []
            for poly, label, diff in gt:
                pg = Polygon(list(zip(poly[0::2], poly[1::2])))
                inside = all(x0 <= x <= x0 + 1024 for x in poly[0::2]) and all(y0 <= y <= y0 + 1024 for y in poly[1::2])
                if inside or pg.intersection(win).area / pg.area >= 0.7:
                    shifted = [v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(poly)]
                    expected.append((tuple(shifted), label, diff if inside else 2))
            got = [(tuple(o["poly"]), o["label"], o["difficult"]) for o in r["meta"]["objects"]]
            assert sorted(got) == sorted(expected)  # exact shifts, same labels, truncated -> 2
    # the P1888 scene fits one window: all 64 objects, unchanged
    assert len(recs["P1888__1024__0___0"]["meta"]["objects"]) == 64


def test_dota_every_inside_object_is_in_its_window_and_truncated_are_difficult_2(shared_data, dota_val):
    _, recs, summary = dota_val
    gt = dota_labels(shared_data / "dota" / "labelTxt" / "P0706.txt")
    assert len(gt) == 536  # 531 ships (6 difficult) + 5 harbors
    n_inside = 0
    for poly, label, diff in gt:
        for r in recs.values():
            if r["meta"]["source"] != "P0706":
                continue
            x0, y0 = r["meta"]["offset"]
            xs, ys = poly[0::2], poly[1::2]
            if diff == 0 and min(xs) >= x0 and max(xs) <= x0 + 1024 and min(ys) >= y0 and max(ys) <= y0 + 1024:
                n_inside += 1
                want = [v - (x0 if i % 2 == 0 else y0) for i, v in enumerate(poly)]
                assert {"poly": want, "label": label, "difficult": 0} in r["meta"]["objects"]
    assert n_inside > 1000  # objects in the overlaps count once per window
    truncated = [o for r in recs.values() for o in r["meta"]["objects"] if o["difficult"] == 2]
    assert truncated and summary["counts"]["objects truncated (difficult 2)"] == len(truncated)
    for o in truncated:  # unclipped corners (MMRotate keeps them): some corner lies outside the patch
        assert min(o["poly"]) < 0 or max(o["poly"]) > 1024
    # the rendered (human-readable) answer is boxes' rendering of meta in patch pixels
    r = recs["P1888__1024__0___0"]
    assert r["messages"][-1]["content"] == boxes.render_answer(r["meta"]["objects"], 1024, 1024)
    assert "large vehicle, plane" in r["messages"][0]["content"]  # categories as text, alphabetical


def _dota_root(shared_data, tmp_path, names):
    root = tmp_path / "root"
    for n in names:
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labelTxt").mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / "dota" / "images" / f"{n}.png", root / "images")
        shutil.copy(shared_data / "dota" / "labelTxt" / f"{n}.txt", root / "labelTxt")
    return root


def test_dota_512_train_drops_empty_patches_and_resume_skips_written(shared_data, tmp_path):
    root = _dota_root(shared_data, tmp_path, ["P1888"])
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / ".P1888__512__0___0.png.123.tmp").write_bytes(b"half")  # an interrupted write
    s1 = run("dota", "--root", root, "--split", "train", "--patch", "512", "--out", out, "--workers", "2")
    recs = read_jsonl(out / "dota_train_512.jsonl")
    # 712 x 557 at 512/200 (step 312): x 0, 200; y 0, 45 -> 4 windows, all with vehicles
    assert sorted(r["id"] for r in recs) == ["P1888__512__0___0", "P1888__512__0___45", "P1888__512__200___0",
                                            "P1888__512__200___45"]
    assert not list((out / "images").glob(".*.tmp"))
    assert s1["counts"]["patches written"] == 4
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    s2 = run("dota", "--root", root, "--split", "train", "--patch", "512", "--out", out, "--workers", "1")
    assert s2["counts"]["patches reused"] == 4 and s2["counts"]["patches written"] == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert read_jsonl(out / "dota_train_512.jsonl") == recs
    # other settings into the same output are refused (the old patches would be trusted)
    with pytest.raises(UserError, match="other settings"):
        run("dota", "--root", root, "--split", "train", "--patch", "512", "--gap", "100", "--out", out)

    # an empty window: a label file with one object far from the first window, 1024/200 on P0706
    root2 = _dota_root(shared_data, tmp_path / "b", ["P0706"])
    (root2 / "labelTxt" / "P0706.txt").write_text("1100 1170 1105 1170 1105 1175 1100 1175 ship 0\n")
    out2 = tmp_path / "out2"
    s3 = run("dota", "--root", root2, "--split", "train", "--out", out2, "--workers", "1")
    assert [r["id"] for r in read_jsonl(out2 / "dota_train.jsonl")] == ["P0706__1024__87___158"]
    assert s3["counts"]["empty patches dropped"] == 3


def test_dota_test_split_and_multiscale(shared_data, tmp_path):
    root = _dota_root(shared_data, tmp_path, ["P1888"])
    shutil.rmtree(root / "labelTxt")  # test split needs no labels
    run("dota", "--root", root, "--split", "test", "--out", tmp_path / "t", "--workers", "1")
    (r,) = read_jsonl(tmp_path / "t" / "dota_test.jsonl")
    assert "objects" not in r["meta"] and [m["role"] for m in r["messages"]] == ["user"]
    assert r["meta"]["source"] == "P1888" and r["meta"]["offset"] == [0, 0]

    root = _dota_root(shared_data, tmp_path / "ms", ["P1888"])
    run("dota", "--root", root, "--split", "val", "--rates", "0.5,1.0", "--out", tmp_path / "ms", "--workers", "1")
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "ms" / "dota_val_ms.jsonl")}
    assert set(recs) == {"P1888__0.5__0___0", "P1888__1024__0___0"}
    half = recs["P1888__0.5__0___0"]
    assert Image.open(tmp_path / "ms" / half["images"][0]).size == (1024, 1024)
    gt = sorted(tuple(p) for p, _, _ in dota_labels(root / "labelTxt" / "P1888.txt"))
    back = sorted(tuple((v + half["meta"]["offset"][i % 2]) / half["meta"]["rate"] for i, v in enumerate(o["poly"]))
                  for o in half["meta"]["objects"])
    assert np.allclose(back, gt, atol=1e-3)  # (patch + offset) / rate = original pixels


# -----------------------------------------------------------------------------
# Bad input


def _bad_root(tmp_path):
    root = tmp_path / "bad"
    write_png(root / "images" / "A.png", 100, 80)
    (root / "labelTxt").mkdir()
    (root / "labelTxt" / "A.txt").write_text("imagesource:x\ngsd:null\n10 10 30 10 30 20 10 20 plane 0\n")
    return root


@pytest.mark.parametrize("line, why", [
    ("10 10 30 10 30 20 10 plane 0", "fewer than 4 points"),
    ("10 10 30 10 30 nan 10 20 plane 0", "not finite"),
    ("10 10 30 10 30 20 10 20 zeppelin 0", "unknown class 'zeppelin'"),
    ("10 10 30 10 30 20 10 20 plane 0 extra", "expected 9 or 10 fields"),
    ("10 10 3O 10 30 20 10 20 plane 0", "coordinate '3O' is not a number"),
    ("10 10 30 10 30 20 10 20 plane x", "difficult flag 'x' is not an integer"),
])
def test_bad_label_line_names_file_and_line_or_is_skipped(tmp_path, line, why):
    root = _bad_root(tmp_path)
    write_png(root / "images" / "B.png", 100, 80)
    (root / "labelTxt" / "B.txt").write_text("10 10 30 10 30 20 10 20 plane 0\n" + line + "\n")
    with pytest.raises(UserError, match=rf"line 2 in .*B\.txt: .*{why}"):
        run("dota", "--root", root, "--split", "val", "--out", tmp_path / "o", "--workers", "1")
    s = run("dota", "--root", root, "--split", "val", "--out", tmp_path / "o2", "--workers", "1", "--skip-bad")
    assert s["counts"]["skipped"] == 1 and "B.txt" in s["skipped"][0]["reason"]
    assert [r["meta"]["source"] for r in read_jsonl(tmp_path / "o2" / "dota_val.jsonl")] == ["A"]


def test_corrupt_or_missing_image_is_an_error_or_counted_skip(tmp_path):
    root = _bad_root(tmp_path)
    good = (root / "images" / "A.png").read_bytes()
    (root / "images" / "C.png").write_bytes(good[: len(good) // 2])  # truncated file
    (root / "labelTxt" / "C.txt").write_text("10 10 30 10 30 20 10 20 plane 0\n")
    with pytest.raises(UserError, match=r"cannot read image .*C\.png"):
        run("dota", "--root", root, "--split", "val", "--out", tmp_path / "o", "--workers", "1")
    s = run("dota", "--root", root, "--split", "val", "--out", tmp_path / "o2", "--workers", "2", "--skip-bad")
    assert s["counts"]["skipped"] == 1 and "C.png" in s["skipped"][0]["reason"]
    assert not (tmp_path / "o2" / "images" / "C__1024__0___0.png").exists()
    # no label file for an image of a labelled split
    (root / "images" / "C.png").write_bytes(good)
    (root / "labelTxt" / "C.txt").unlink()
    with pytest.raises(UserError, match=r"no label file .*C\.txt"):
        run("dota", "--root", root, "--split", "train", "--out", tmp_path / "o3", "--workers", "1")


# -----------------------------------------------------------------------------
# The one DOTA label reader (boxes.read_dota_labels, eval_det's too) and the devkit's parse_gt rules


def test_dota_reader_agrees_with_the_devkit_rules_on_every_real_label_file(shared_data):
    files = sorted(shared_data.glob("dota*/labelTxt/*.txt"))
    assert len(files) == 8  # headers, CRLF line ends (P1234), difficult 0 and 1, a patch file without headers
    for f in files:
        got = [(o["poly"], o["label"], o["difficult"]) for o in boxes.read_dota_labels(f, boxes.DOTA_CLASSES["1.0"])]
        assert got == dota_labels(f) and got, f


@pytest.mark.parametrize("text, want", [
    # as the devkit: headers skipped, 9 fields -> difficult 0, 10 -> the integer as written (2 = cut by a patch)
    ("imagesource:GoogleEarth\ngsd:0.146\n1 2 3 2 3 4 1 4 plane 0\n1 2 3 2 3 4 1 4 ship\n1 2 3 2 3 4 1 4 ship 2\n",
     [("plane", 0), ("ship", 0), ("ship", 2)]),
    ("\ufeffimagesource:GF\r\ngsd:null\r\n\r\n1 2 3 2 3 4 1 4 plane 1\r\n", [("plane", 1)]),  # BOM, CRLF, blank
    # where the devkit differs: it splits on single spaces (an empty token: float('') crashes)
    ("1  2 3 2 3 4 1 4\tplane 0\n", [("plane", 0)]),
    # it takes a short line for a header: a line cut before its class would lose the object without a word
    ("1 2 3 2 3 4 1 4\n", "line 1 in .*: expected 9 or 10 fields"),
    ("1 2 3 2 3 4 1 plane 0\n", "line 1 in .*: polygon has fewer than 4 points"),  # devkit: float('plane')
    ("1 2 3 2 3 4 1 4 plane 0 x\n", "expected 9 or 10 fields"),  # devkit: no difficult, a KeyError in voc_eval
    ("1 2 3 2 3 4 1 4 plane 1.0\n", "difficult flag '1.0' is not an integer"),  # devkit: int('1.0') crashes
    ("1 2 3 2 3 nan 1 4 plane 0\n", "coordinate 'nan' is not finite"),  # devkit: kept, a NaN in its IoU
])
def test_dota_reader_where_the_devkit_differs(tmp_path, text, want):
    path = tmp_path / "P0001.txt"
    path.write_bytes(text.encode("utf-8"))
    if isinstance(want, str):
        with pytest.raises(UserError, match=want):
            boxes.read_dota_labels(path)
        return
    got = boxes.read_dota_labels(path)
    assert [(o["label"], o["difficult"]) for o in got] == want
    assert all(o["poly"] == [1, 2, 3, 2, 3, 4, 1, 4] for o in got)
    # a class outside the list: kept for eval_det (which counts it), an error for data_prep (--version)
    path.write_text("1 2 3 2 3 4 1 4 container-crane 0\n")
    assert boxes.read_dota_labels(path)[0]["label"] == "container-crane"
    with pytest.raises(UserError, match="line 1 in .*unknown class 'container-crane'"):
        boxes.read_dota_labels(path, boxes.DOTA_CLASSES["1.0"])


# -----------------------------------------------------------------------------
# Progress in a log file (stdout not a terminal): plain lines counted in the parent, also under the worker pool


def test_tiling_and_image_checks_print_progress_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data_prep, "Progress", partial(common.Progress, every=0.0))  # a line at every update
    root = _bad_root(tmp_path)
    write_png(root / "images" / "B.png", 100, 80)
    shutil.copy(root / "labelTxt" / "A.txt", root / "labelTxt" / "B.txt")
    capsys.readouterr()
    run("dota", "--root", root, "--split", "val", "--out", tmp_path / "o", "--workers", 2)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("tiling dota_val: ")]
    assert [ln.split(",")[0] for ln in lines] == ["tiling dota_val: 1/2 (50%)"] + ["tiling dota_val: 2/2 (100%)"] * 2
    assert re.fullmatch(r"tiling dota_val: 1/2 \(50%\), [\d.]+ img/s, \d+ s so far, ETA \d+ s", lines[0])
    run("dior", "--root", _dior_root(tmp_path, ["00001", "00002"]), "--split", "all", "--out", tmp_path / "d",
        "--workers", 2)
    assert "checking images: 1/2 (50%)" in capsys.readouterr().out


def test_pool_progress_speaks_while_nothing_finishes(monkeypatch, capsys):
    """One huge image keeps the workers busy for minutes: the parent still prints a line when one is due."""
    monkeypatch.setattr(data_prep, "Progress", partial(common.Progress, every=0.1))
    capsys.readouterr()
    assert list(data_prep.pool_map(time.sleep, [0.8, 0.0], 2, "slow")) == [None, None]
    lines = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith("slow: 0/2 (0%), 0.00 it/s") for ln in lines) >= 2, lines
    assert lines[-1].startswith("slow: 2/2 (100%)")


def test_help_is_one_line_per_flag(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    parser = data_prep.build_parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) == set(data_prep.RUNNERS)
    for name, sp in subcommands.items():
        options = sp.format_help().split("options:\n")[1].splitlines()
        assert len(options) == len(sp._actions), (name, options)  # no flag's help wraps or starts a line of its own


# -----------------------------------------------------------------------------
# DIOR-R (real sample) and small fixtures for every other format


def test_dior_sample_converts_with_its_golffield(shared_data, tmp_path):
    run("dior", "--root", shared_data / "dior", "--split", "all", "--out", tmp_path, "--workers", "1")
    (r,) = read_jsonl(tmp_path / "dior_all.jsonl")
    assert r["task"] == "det" and r["meta"]["width"] == r["meta"]["height"] == 800
    assert r["meta"]["objects"] == [{"poly": [133, 237, 684, 237, 684, 672, 133, 672], "label": "golffield",
                                     "difficult": 0}]
    assert r["messages"][-1]["content"] == "133,237,684,237,684,672,133,672 golffield"
    assert Path(r["images"][0]) == (shared_data / "dior" / "JPEGImages" / "00001.jpg").resolve()
    assert len(r["meta"]["classes"]) == 20


DIOR_OBJ = ("<object><name>{}</name><difficult>0</difficult><robndbox><x_left_top>1</x_left_top><y_left_top>2"
            "</y_left_top><x_right_top>11</x_right_top><y_right_top>2</y_right_top><x_right_bottom>11</x_right_bottom>"
            "<y_right_bottom>8</y_right_bottom><x_left_bottom>1</x_left_bottom><y_left_bottom>8</y_left_bottom>"
            "</robndbox></object>")


def _dior_root(tmp_path, ids):
    """DIOR-R layout: one 64x64 image + oriented XML (an expressway service area) per id, ImageSets/Main/ empty."""
    root = tmp_path / "DIOR-R"
    ann = root / "Annotations" / "Oriented Bounding Boxes"
    ann.mkdir(parents=True)
    for i in ids:
        write_png(root / "JPEGImages-trainval" / f"{i}.jpg", 64, 64)
        (ann / f"{i}.xml").write_text(f"<annotation><size><width>64</width><height>64</height></size>"
                                      f"{DIOR_OBJ.format('Expressway-Service-area')}</annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    return root


def test_dior_split_list_and_unknown_class(tmp_path):
    root = _dior_root(tmp_path, ["00002"])
    ann = root / "Annotations" / "Oriented Bounding Boxes"
    (root / "ImageSets" / "Main" / "train.txt").write_text("00002\n")
    run("dior", "--root", root, "--split", "train", "--out", tmp_path / "o", "--workers", "1")
    (r,) = read_jsonl(tmp_path / "o" / "dior_train.jsonl")
    assert r["meta"]["objects"][0]["label"] == "expressway-service-area"
    (ann / "00002.xml").write_text(f"<annotation>{DIOR_OBJ.format('volcano')}</annotation>")
    with pytest.raises(UserError, match=r"object 1 in .*00002\.xml: unknown class 'volcano'"):
        run("dior", "--root", root, "--split", "train", "--out", tmp_path / "o", "--workers", "1")


def test_fair1m_xml_tiles_like_dota(tmp_path):
    root = tmp_path / "fair1m"
    arr = write_png(root / "images" / "7.png", 300, 200)
    (root / "labelXml").mkdir()
    pts = "".join(f"<point>{x},{y}</point>" for x, y in [(10, 20), (60, 20), (60, 40), (10, 40), (10, 20)])
    cut = "".join(f"<point>{x},{y}</point>" for x, y in [(250, 20), (299, 20), (299, 40), (250, 40), (250, 20)])
    (root / "labelXml" / "7.xml").write_text(
        "<annotation><objects>"
        f"<object><possibleresult><name>Liquid Cargo Ship</name></possibleresult><points>{pts}</points></object>"
        f"<object><possibleresult><name>Boeing737</name></possibleresult><points>{cut}</points></object>"
        "</objects></annotation>")
    run("fair1m", "--root", root, "--split", "val", "--patch", "256", "--gap", "56", "--out", tmp_path / "o",
        "--workers", "1")
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "o" / "fair1m_val_256.jsonl")}
    assert set(recs) == {"7__256__0___0", "7__256__44___0"}  # 300 wide: 0 then 300 - 256; padded to 256 high
    first = recs["7__256__0___0"]["meta"]["objects"]
    # the plane (x 250..299) has 6/49 of its area in window 0 -> not there; whole in window 1
    assert first == [{"poly": [10, 20, 60, 20, 60, 40, 10, 40], "label": "liquid-cargo-ship", "difficult": 0}]
    second = recs["7__256__44___0"]["meta"]["objects"]
    assert {"poly": [206, 20, 255, 20, 255, 40, 206, 40], "label": "boeing737", "difficult": 0} in second
    assert "liquid cargo ship" in recs["7__256__0___0"]["messages"][0]["content"]
    patch = np.asarray(Image.open(tmp_path / "o" / "images" / "7__256__44___0.png"))
    assert np.array_equal(patch[:200], arr[:, 44:]) and not patch[200:].any()


def _rsvg_root(tmp_path):
    """3 objects: 00001.xml has objects 0 (ship) and 1 (dam), 00002.xml object 2 (vehicle)."""
    root = tmp_path / "DIOR-RSVG"
    for n in ("00001", "00002"):
        write_png(root / "JPEGImages" / f"{n}.jpg", 80, 60)
    (root / "Annotations").mkdir()

    def obj(name, b, text):
        return (f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                f"<ymax>{b[3]}</ymax></bndbox><description>{text}</description></object>")
    (root / "Annotations" / "00001.xml").write_text(
        f"<annotation><filename>00001.jpg</filename>{obj('ship', (1, 2, 11, 12), 'a ship')}"
        f"{obj('dam', (5, 5, 50, 40), 'the dam on the left')}</annotation>")
    (root / "Annotations" / "00002.xml").write_text(
        f"<annotation><filename>00002.jpg</filename>{obj('vehicle', (30, 10, 40, 20), 'a small white car')}</annotation>")
    return root


def test_rsvg_indices_count_objects_over_sorted_xmls(tmp_path):
    root = _rsvg_root(tmp_path)
    (root / "test.txt").write_text("1\n2\n")
    run("rsvg", "--root", root, "--split", "test", "--out", tmp_path / "o", "--workers", "1")
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "o" / "rsvg_test.jsonl")}
    assert set(recs) == {"rsvg_1", "rsvg_2"}
    r = recs["rsvg_2"]
    assert r["task"] == "ground" and r["images"][0].endswith("00002.jpg")
    assert r["meta"]["objects"][0]["poly"] == [30, 10, 40, 10, 40, 20, 30, 20]
    assert r["meta"]["objects"][0]["expression"] == "a small white car" and "a small white car" in r["messages"][0]["content"]
    assert r["messages"][-1]["content"] == "30,10,40,20"
    assert recs["rsvg_1"]["meta"]["objects"][0]["expression"] == "the dam on the left"


def _rsvqa_root(tmp_path):
    """RSVQA-LR test split: image 0 with 6 active questions (4 count, presence, rural_urban) + 1 inactive."""
    root = tmp_path / "RSVQA_LR"
    write_png(root / "Images_LR" / "0.tif", 32, 32)
    qs = [("count", "How many buildings are there?", "0"), ("count", "How many roads are there?", "7"),
          ("count", "How many houses?", "50"), ("count", "How many trees?", "5000"),
          ("presence", "Is there a road?", "yes"), ("rural_urban", "Is it a rural or an urban area?", "rural")]
    questions = [{"id": i, "img_id": 0, "type": t, "question": q, "answers_ids": [100 + i], "active": True}
                 for i, (t, q, _) in enumerate(qs)]
    questions.append({"id": 9, "img_id": 0, "type": "presence", "question": "Is there water?", "answers_ids": [109],
                      "active": False})
    answers = [{"id": 100 + i, "question_id": i, "answer": a, "active": True} for i, (_, _, a) in enumerate(qs)]
    answers.append({"id": 109, "question_id": 9, "answer": "no", "active": False})
    for k, v in {"questions": questions, "answers": answers,
                 "images": [{"id": 0, "questions_ids": list(range(6)) + [9], "active": True},
                            {"id": 1, "questions_ids": [], "active": False}]}.items():
        (root / f"LR_split_test_{k}.json").write_text(json.dumps({k: v}))
    return root


def test_rsvqa_types_buckets_and_suffix(tmp_path):
    root = _rsvqa_root(tmp_path)
    s = run("rsvqa", "--root", root, "--variant", "LR", "--split", "test", "--out", tmp_path / "o", "--workers", "1")
    recs = read_jsonl(tmp_path / "o" / "rsvqa_lr_test.jsonl")
    assert [r["meta"]["answer"] for r in recs] == ["0", "between 0 and 10", "between 10 and 100", "more than 1000",
                                                   "yes", "rural"]
    assert [r["meta"]["type"] for r in recs] == ["count"] * 4 + ["presence", "rural_urban"]
    assert s["counts"]["inactive questions"] == 1 and s["counts"]["inactive images"] == 1
    assert recs[4]["messages"][0]["content"] == "<image>\nIs there a road? " + prompts.VQA_SUFFIX
    assert recs[1]["messages"][-1]["content"] == "between 0 and 10"
    run("rsvqa", "--root", root, "--variant", "LR", "--split", "test", "--out", tmp_path / "o2", "--no-bucket",
        "--no-suffix", "--types", "count", "--workers", "1")
    recs = read_jsonl(tmp_path / "o2" / "rsvqa_lr_test.jsonl")
    assert [r["meta"]["answer"] for r in recs] == ["0", "7", "50", "5000"]
    assert recs[0]["messages"][0]["content"].endswith("there?")
    assert data_prep.rsvqa_answer("25m2", "area", "HR", True) == "between 10m2 and 100m2"
    assert data_prep.rsvqa_answer("25", "count", "HR", True) == "25"  # HR counts stay numbers


def _caption_set(folder, json_name="dataset.json", n=2):
    """A Karpathy-style caption set: folder/json_name + folder/imgs/{0..n-1}.tif, image 0 train, the rest test."""
    images = [{"filename": f"{i}.tif", "imgid": i, "split": "train" if i == 0 else "test",
               "sentences": [{"raw": f"caption {i} of {folder.name}"}]} for i in range(n)]
    for e in images:
        write_png(folder / "imgs" / e["filename"], 16, 16)
    (folder / json_name).write_text(json.dumps({"images": images, "dataset": "coco"}))  # a copied "dataset" key
    return folder / json_name


def test_captions_one_record_per_image_with_all_references(tmp_path):
    for n in ("a.tif", "b.tif", "c.tif"):
        write_png(tmp_path / "imgs" / n, 16, 16)
    data = {"images": [
        {"filename": "a.tif", "imgid": 0, "split": "train", "sentences": [{"raw": "A plane ."}, {"raw": "Two planes."}]},
        {"filename": "b.tif", "imgid": 1, "split": "test", "sentences": [{"raw": " Some trees. "}, {"raw": "Green."}]},
        {"filename": "c.tif", "imgid": 2, "split": "test", "sentences": []}]}
    (tmp_path / "dataset_rsicd.json").write_text(json.dumps(data))
    args = ["captions", "--json", tmp_path / "dataset_rsicd.json", "--images", tmp_path / "imgs", "--workers", "1"]
    with pytest.raises(UserError, match="c.tif.*no reference"):
        run(*args, "--split", "test", "--out", tmp_path / "o")
    run(*args, "--split", "test", "--out", tmp_path / "o", "--skip-bad")
    (r,) = read_jsonl(tmp_path / "o" / "rsicd_test.jsonl")
    assert r["id"] == "1" and r["dataset"] == "rsicd" and r["meta"]["references"] == ["Some trees.", "Green."]
    run(*args, "--split", "train", "--out", tmp_path / "o", "--per-reference")
    recs = read_jsonl(tmp_path / "o" / "rsicd_train.jsonl")
    assert [(r["id"], r["messages"][-1]["content"]) for r in recs] == [("0#0", "A plane ."), ("0#1", "Two planes.")]


def test_cls_seeded_per_class_split(tmp_path):
    root = tmp_path / "AID"
    for c in ("BareLand", "basketball_court"):
        for i in range(5):
            write_png(root / c / f"{c}_{i}.jpg", 8, 8, seed=i)

    def split(seed, out):
        run("cls", "--root", root, "--train-ratio", "0.4", "--seed", seed, "--out", out, "--workers", "1")
        return [r["id"] for r in read_jsonl(Path(out) / "aid_train.jsonl")], read_jsonl(Path(out) / "aid_test.jsonl")

    train, test = split(0, tmp_path / "a")
    assert len(train) == 4 and len(test) == 6  # 2 of 5 per class
    assert sorted(i.split("/")[0] for i in train) == ["BareLand"] * 2 + ["basketball_court"] * 2
    assert not set(train) & {r["id"] for r in test}
    assert test[0]["meta"]["classes"] == ["bare land", "basketball court"]
    assert {r["meta"]["label"] for r in test} == {"bare land", "basketball court"}
    assert "bare land, basketball court" in test[0]["messages"][0]["content"]
    assert split(0, tmp_path / "b")[0] == train  # same seed, same split
    assert any(split(s, tmp_path / f"s{s}")[0] != train for s in (1, 2, 3))


# -----------------------------------------------------------------------------
# Real layouts: DIOR-R without trainval.txt, two caption sets called dataset.json, FAIR1M's closing point


def test_dior_trainval_is_train_plus_val_when_there_is_no_trainval_list(tmp_path, capsys):
    root = _dior_root(tmp_path, ["00001", "00002", "00003", "00004"])
    lists = root / "ImageSets" / "Main"
    (lists / "train.txt").write_text("00001\n00002\n")
    (lists / "val.txt").write_text("00003\n")
    (lists / "test.txt").write_text("00004\n")
    s = run("dior", "--root", root, "--split", "trainval", "--out", tmp_path / "o", "--workers", "1")
    assert [r["id"] for r in read_jsonl(tmp_path / "o" / "dior_trainval.jsonl")] == ["00001", "00002", "00003"]
    note = f"no trainval.txt: trainval = {lists / 'train.txt'} + {lists / 'val.txt'}"
    assert s["notes"] == [note] and f"note: {note}" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "dior_trainval.info.json").read_text())["summary"]["notes"] == [note]
    # an existing trainval.txt is what --split trainval reads
    (lists / "trainval.txt").write_text("00002\n00004\n")
    s = run("dior", "--root", root, "--split", "trainval", "--out", tmp_path / "o2", "--workers", "1")
    assert [r["id"] for r in read_jsonl(tmp_path / "o2" / "dior_trainval.jsonl")] == ["00002", "00004"]
    assert s["notes"] == []
    # neither: the error says where it looked and which lists there are
    (lists / "trainval.txt").unlink()
    (lists / "val.txt").unlink()
    with pytest.raises(UserError, match=r"--split trainval: no trainval.txt among the split lists of .*DIOR-R "
                                         r"\(ImageSets/Main/test.txt, ImageSets/Main/train.txt\): give --split test "
                                         r"or --split train; --split all converts every annotated image \(4 in "):
        run("dior", "--root", root, "--split", "trainval", "--out", tmp_path / "o3", "--workers", "1")


def test_ucm_and_sydney_dataset_json_get_their_own_names(tmp_path):
    ucm = _caption_set(tmp_path / "UCM_captions", n=2)
    sydney = _caption_set(tmp_path / "Sydney_captions", n=3)
    for js in (ucm, sydney):
        run("captions", "--json", js, "--images", js.parent / "imgs", "--split", "test", "--out", tmp_path / "cap",
            "--workers", "1")
    ucm_recs = read_jsonl(tmp_path / "cap" / "ucm_captions_test.jsonl")
    sydney_recs = read_jsonl(tmp_path / "cap" / "sydney_captions_test.jsonl")
    assert [r["meta"]["references"] for r in ucm_recs] == [["caption 1 of UCM_captions"]]
    assert [r["meta"]["references"] for r in sydney_recs] == [["caption 1 of Sydney_captions"],
                                                             ["caption 2 of Sydney_captions"]]
    assert {r["dataset"] for r in ucm_recs} == {"ucm_captions"} and {r["dataset"] for r in sydney_recs} == {"sydney_captions"}
    assert data_prep.caption_dataset_name("RSICD/dataset_rsicd.json") == "rsicd"  # a named file keeps its name


@pytest.mark.parametrize("first, last", [("10,20", "10.0,20.0"), ("10.000000,20.000000", "10,20"),
                                         (" 10.5, 20", "10.5000001,20.0")])
def test_fair1m_closing_point_is_compared_as_numbers(tmp_path, first, last):
    def parse(points):
        xml = tmp_path / "1.xml"
        xml.write_text("<annotation><objects><object><possibleresult><name>Bus</name></possibleresult><points>"
                       + "".join(f"<point>{p}</point>" for p in points) + "</points></object></objects></annotation>")
        return boxes.read_fair1m_xml(xml, boxes.FAIR1M_CLASSES)

    (o,) = parse([first, "60,20", "60,40", "10,40", last])
    assert o["poly"] == [float(v) for v in first.split(",")] + [60, 20, 60, 40, 10, 40] and o["label"] == "bus"
    with pytest.raises(UserError, match=r"object 1 in .*1\.xml: polygon has 5 points"):
        parse([first, "60,20", "60,40", "10,40", "11,20"])  # a fifth corner, not the first again


# -----------------------------------------------------------------------------
# Answer length in tokens: the --answer-budget report of the det/ground subcommands


def ref_tokens(answer):
    """Reference count for plain box answers, written independently of data_prep: a digit, a run of
    punctuation, a word and a line break are one token each (how Qwen's pre-tokenizer cuts them), + <|im_end|>."""
    return len(re.findall(r"\d|[^\w\s]+|[A-Za-z]+|\n", answer)) + 1


def ref_report(records, budget, count=ref_tokens):
    tokens = {r["id"]: count(r["messages"][-1]["content"]) for r in records if r["messages"][-1]["role"] == "assistant"}
    lengths = sorted(tokens.values())
    return {"answers": len(tokens), "over_budget": sum(n > budget for n in lengths), "longest": max(lengths),
            "longest_id": max(tokens, key=tokens.get), "median": lengths[len(lengths) // 2]}


def test_estimate_counts_one_token_per_digit_punctuation_word_and_line_break(tiny_qwen25):
    import model

    assert data_prep.estimate_answer_tokens("12,40,80,40,80,70,12,70 ship") == 16 + 7 + 1 + 1
    assert data_prep.estimate_answer_tokens("1,2,3,4,5,6,7,8 large vehicle\n10,20,30,40,50,60,70,80 ship") == (
        8 + 7 + 2) + 1 + (16 + 7 + 1) + 1
    assert data_prep.estimate_answer_tokens("There are none.") == 4 + 1
    # against a tokenizer with Qwen's pre-tokenizer (the tiny checkpoint's): exact on digits, commas, line breaks
    tok = model.load_processor(tiny_qwen25).tokenizer
    numbers = "12,40,80,40,80,70,12,70\n1008,3,77,1000,9,0,5,61"
    assert data_prep.estimate_answer_tokens(numbers) == len(tok.encode(numbers, add_special_tokens=False)) + 1


def test_dota_budget_report_on_the_real_samples(shared_data, dota_val, tmp_path):
    out, recs, summary = dota_val
    want = ref_report(recs.values(), 2048)
    report = summary["answer_tokens"]
    assert report["budget"] == 2048 and "estimated" in report["method"] and report["splits"] == {"val": want}
    # the dense harbour: every P0706 patch holds ~500 ships, over 15k tokens
    assert want["longest_id"].startswith("P0706") and want["longest"] > 15000 and want["over_budget"] >= 4
    assert json.loads((out / "dota_val.info.json").read_text())["summary"]["answer_tokens"] == report
    # README: 512-px patches against 1024-px ones, --answer-budget 5700 (--max-length 6144 minus a 512-px
    # patch's 324 image tokens and ~120 prompt tokens at max_pixels 1016064)
    for patch, n, over, longest in ((512, 16, 1, 6123), (1024, 5, 4, 16465)):
        s = run("dota", "--root", shared_data / "dota", "--split", "train", "--patch", patch, "--answer-budget", 5700,
                "--out", tmp_path / str(patch), "--workers", "2")
        got = s["answer_tokens"]["splits"]["train"]
        assert (got["answers"], got["over_budget"], got["longest"]) == (n, over, longest)
        name = "dota_train" + ("_512" if patch == 512 else "")
        assert got == ref_report(read_jsonl(tmp_path / str(patch) / f"{name}.jsonl"), 5700)


def test_budget_report_exact_with_a_processor(shared_data, tmp_path, tiny_qwen25, capsys):
    """--processor: the answer rendered in the checkpoint's coordinates and tokenized; the reference is what
    model.tokenize supervises for the record (the answer's tokens + <|im_end|>)."""
    import model

    root = _dota_root(shared_data, tmp_path, ["P1888", "P0706"])
    s = run("dota", "--root", root, "--split", "val", "--patch", "512", "--out", tmp_path / "o", "--workers", "2",
            "--processor", tiny_qwen25, "--answer-budget", 3000)
    processor = model.load_processor(tiny_qwen25)
    records = read_records(tmp_path / "o" / "dota_val_512.jsonl")
    need = {r["id"]: int((model.tokenize(r, processor)["labels"] != -100).sum()) for r in records}
    got = s["answer_tokens"]
    assert got["method"].startswith(f"exact: {tiny_qwen25}'s tokenizer")
    assert got["splits"]["val"]["longest"] == max(need.values())
    assert got["splits"]["val"]["over_budget"] == sum(n > 3000 for n in need.values()) > 0
    printed = capsys.readouterr().out
    assert f"val: {got['splits']['val']['over_budget']} of {len(records)} answers over --answer-budget 3,000 tokens" in printed
    assert "note: val: " in printed and "--max-new-tokens" in printed and "--max-length" in printed


def test_budget_report_on_synth_and_rsvg_fixtures(tmp_path):
    s = run_synth("--out", tmp_path / "s", "--train", 6, "--val", 3, "--answer-budget", 40)
    for split in ("train", "val"):
        recs = read_jsonl(tmp_path / "s" / f"synth_det_{split}.jsonl") + read_jsonl(tmp_path / "s" / f"synth_ground_{split}.jsonl")
        assert s["answer_tokens"]["splits"][split] == ref_report(recs, 40)
    assert 0 < s["answer_tokens"]["splits"]["train"]["over_budget"] < s["answer_tokens"]["splits"]["train"]["answers"]
    root = _rsvg_root(tmp_path)
    (root / "test.txt").write_text("0\n1\n2\n")
    s = run("rsvg", "--root", root, "--split", "test", "--out", tmp_path / "r", "--workers", "1")
    assert s["answer_tokens"]["splits"] == {"test": ref_report(read_jsonl(tmp_path / "r" / "rsvg_test.jsonl"), 2048)}
    with pytest.raises(UserError, match="--answer-budget 0"):
        run("rsvg", "--root", root, "--split", "test", "--out", tmp_path / "r", "--answer-budget", 0)
    with pytest.raises(UserError, match=rf"--processor {tmp_path / 'nope'}: no such folder"):
        run("rsvg", "--root", root, "--split", "test", "--out", tmp_path / "r2", "--processor", tmp_path / "nope")
    assert not (tmp_path / "r2").exists()


# -----------------------------------------------------------------------------
# Bad input as a user meets it: one line `error: ...` on stderr, exit code 2, nothing written. What `python
# data_prep.py ...` runs (run_cli(main)) runs here in this process; two cases run as real processes, started
# together (each imports torch through model.py: ~2 s of CPU): --debug, and docs/data.md's DIOR command on the
# bundled sample.


CLI_CASES = ["dota_empty_root", "dota_no_labeltxt", "dota_train_all_patches_empty", "cls_ucmerced_unzipped_folder",
             "rsvg_index_past_the_last_object", "captions_second_dataset_json_same_name"]
SHARED_DIOR = REPO.parent / "shared" / "data" / "dior"


def _files(folder):
    return {p: p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory):
    """(folder, {case: (argv without --out, strings the error line must name)}); OUT is folder/out/CASE."""
    tmp = tmp_path_factory.mktemp("cli").resolve()
    cases = {}
    # dota on an empty root: images/ and labelTxt/ with nothing in them
    (tmp / "empty" / "images").mkdir(parents=True)
    (tmp / "empty" / "labelTxt").mkdir()
    cases["dota_empty_root"] = (["dota", "--root", tmp / "empty", "--split", "train"],
                                [f"{tmp / 'empty' / 'images'} has no images"])
    write_png(tmp / "nolabels" / "images" / "A.png", 32, 32)
    cases["dota_no_labeltxt"] = (["dota", "--root", tmp / "nolabels", "--split", "val"],
                                 [f"{tmp / 'nolabels' / 'labelTxt'} is not a folder", "--split test"])
    # every label file without objects: train drops every (empty) patch
    write_png(tmp / "noobjects" / "images" / "A.png", 32, 32)
    (tmp / "noobjects" / "labelTxt").mkdir()
    (tmp / "noobjects" / "labelTxt" / "A.txt").write_text("imagesource:x\ngsd:null\n")
    cases["dota_train_all_patches_empty"] = (["dota", "--root", tmp / "noobjects", "--split", "train"],
                                             ["no records for dota_train", str(tmp / "noobjects"), "--keep-empty"])
    # UCMerced_LandUse.zip unzips to UCMerced_LandUse/Images/<class>/*.tif
    for c in ("agricultural", "airplane"):
        write_png(tmp / "UCMerced_LandUse" / "Images" / c / f"{c}00.tif", 8, 8)
    cases["cls_ucmerced_unzipped_folder"] = (
        ["cls", "--root", tmp / "UCMerced_LandUse"],
        [f"{tmp / 'UCMerced_LandUse'} has no class folders with images",
         f"did you mean {tmp / 'UCMerced_LandUse' / 'Images'}?"])
    rsvg = _rsvg_root(tmp)  # objects 0, 1, 2
    (rsvg / "test.txt").write_text("1\n\n7\n2\n")
    cases["rsvg_index_past_the_last_object"] = (["rsvg", "--root", rsvg, "--split", "test"],
                                                [f"line 3 in {rsvg / 'test.txt'}", "object 7 does not exist",
                                                 "has 3 objects"])
    # two caption sets whose dataset.json sit in folders of the same name: the second must not overwrite the first
    first, second = _caption_set(tmp / "a" / "captions"), _caption_set(tmp / "b" / "captions", n=3)
    run("captions", "--json", first, "--images", first.parent / "imgs", "--split", "test",
        "--out", tmp / "out" / "captions_second_dataset_json_same_name", "--workers", "1")
    cases["captions_second_dataset_json_same_name"] = (
        ["captions", "--json", second, "--images", second.parent / "imgs", "--split", "test"],
        ["captions_test.* was made from " + str(first), f"this run reads {second}", "--name"])
    assert sorted(cases) == sorted(CLI_CASES)
    return tmp, cases


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_is_one_line_naming_it_exit_2_nothing_written(cli_cases, case, monkeypatch, capsys):
    tmp, cases = cli_cases
    argv, names = cases[case]
    out = tmp / "out" / case
    before = _files(out) if out.exists() else {}
    one_error_line(run_main("data_prep.py", data_prep.main, [*argv, "--out", out, "--workers", 1], monkeypatch, capsys),
                   names)
    after = _files(out) if out.exists() else {}
    # no JSONL written and an earlier output (captions_second_...) untouched; tiling leaves only its info.json
    assert {p: b for p, b in after.items() if p.suffix == ".jsonl"} == {p: b for p, b in before.items() if p.suffix == ".jsonl"}
    assert all(after.get(p) == b for p, b in before.items())


@pytest.fixture(scope="module")
def cli_processes(cli_cases):
    """{case: (exit code, non-empty stderr lines, OUT)} of data_prep.py run as a process: "debug" (the UCMerced case
    with --debug after the subcommand) and, where the bundled samples are, "dior_sample_default_split"."""
    tmp, cases = cli_cases
    argv = {"debug": cases["cls_ucmerced_unzipped_folder"][0] + ["--debug"]}
    if SHARED_DIOR.is_dir():
        argv["dior_sample_default_split"] = ["dior", "--root", SHARED_DIOR]
    procs = {case: start_cli(*a, "--out", tmp / "out" / case, "--workers", "1") for case, a in argv.items()}
    results = {}
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        results[case] = (proc.returncode, [line for line in err.splitlines() if line.strip()], tmp / "out" / case)
    return results


def test_cli_debug_flag_shows_the_traceback(cli_processes):
    code, err, _ = cli_processes["debug"]
    assert code == 1 and any(line.startswith("Traceback") for line in err) and err[-1].startswith("common.UserError: ")
    assert "did you mean" in err[-1]


def test_dior_sample_default_split_is_one_line_suggesting_split_all(cli_processes, shared_data):
    """The command of docs/data.md on the bundled sample (no split lists), as a process."""
    code, err, out = cli_processes["dior_sample_default_split"]
    assert code == 2 and err == [
        f"error: --split trainval: {shared_data / 'dior'} has no split lists (ImageSets/Main/*.txt): --split all converts "
        f"every annotated image (1 in {shared_data / 'dior' / 'Annotations'}, test images too), or give --split-file FILE"]
    assert not out.exists()
    run("dior", "--root", shared_data / "dior", "--split", "all", "--out", out, "--workers", 1)  # what it suggests
    assert [r["id"] for r in read_jsonl(out / "dior_all.jsonl")] == ["00001"]


def _wrong_folder_cases(tmp):
    """{case: (argv without --out, strings the one error line must name)}: the folders people give by mistake."""
    dota = tmp / "DOTA"
    for split in ("train", "val"):
        write_png(dota / split / "images" / "A.png", 32, 32)
        (dota / split / "labelTxt").mkdir()
    # DOTA's download: labels two levels down, beside the horizontal-box ones
    write_png(tmp / "dl" / "train" / "images" / "A.png", 32, 32)
    for sub in ("labelTxt", "trainset_reclabelTxt"):
        (tmp / "dl" / "train" / "labelTxt-v1.0" / sub).mkdir(parents=True)
        (tmp / "dl" / "train" / "labelTxt-v1.0" / sub / "A.txt").write_text("")
    dior = _dior_root(tmp / "unzipped", ["00001"])  # JPEGImages-trainval/, Annotations/Oriented Bounding Boxes/
    (tmp / "fair1m" / "images").mkdir(parents=True)
    (tmp / "fair1m" / "labelXml").mkdir()
    rsvqa = _rsvqa_root(tmp)
    hr = tmp / "RSVQA_HR"
    hr.mkdir()
    shutil.copy(rsvqa / "LR_split_test_questions.json", hr / "USGS_split_val_questions.json")
    captions = _caption_set(tmp / "UCM_captions")
    rsvg = _rsvg_root(tmp)
    return {
        "dota_root_at_images": (["dota", "--root", dota / "train" / "images", "--split", "train"],
                                [f"--root {dota / 'train' / 'images'} does not hold images/ and labelTxt/",
                                 f"did you mean --root {dota / 'train'}?"]),
        "dota_root_one_level_up": (["dota", "--root", dota, "--split", "val"],
                                   [f"did you mean --root {dota / 'train'} or {dota / 'val'}?"]),
        "dota_root_misspelt": (["dota", "--root", tmp / "dotaa", "--split", "train"],
                               [f"--root {tmp / 'dotaa'}: no such folder"]),
        "dota_labels_as_downloaded": (["dota", "--root", tmp / "dl" / "train", "--split", "train"],
                                      [f"{tmp / 'dl' / 'train' / 'labelTxt'} is not a folder", "--split test",
                                       f"label files are in {tmp / 'dl' / 'train' / 'labelTxt-v1.0' / 'labelTxt'}"]),
        "fair1m_root_at_labelxml": (["fair1m", "--root", tmp / "fair1m" / "labelXml", "--split", "train"],
                                    [f"did you mean --root {tmp / 'fair1m'}?"]),
        "dior_root_one_level_up": (["dior", "--root", dior.parent, "--split", "all"],
                                   [f"--root {dior.parent} does not hold Annotations/", f"did you mean --root {dior}?"]),
        "dior_root_at_jpegimages": (["dior", "--root", dior / "JPEGImages-trainval", "--split", "all"],
                                    [f"did you mean --root {dior}?"]),
        "dior_root_at_annotations": (["dior", "--root", dior / "Annotations" / "Oriented Bounding Boxes"],
                                     [f"did you mean --root {dior}?"]),
        "dior_missing_root": (["dior", "--root", tmp / "DIOR"], [f"--root {tmp / 'DIOR'}: no such folder"]),
        "rsvqa_root_at_images": (["rsvqa", "--root", rsvqa / "Images_LR", "--variant", "LR", "--split", "test"],
                                 [f"did you mean --root {rsvqa}?"]),
        "rsvqa_wrong_variant_or_split": (["rsvqa", "--root", hr, "--variant", "HR", "--split", "test"],
                                         ["USGS_split_test_{questions,answers,images}.json",
                                          "question files there: USGS_split_val_questions.json"]),
        "captions_images_one_level_up": (["captions", "--json", captions, "--images", captions.parent],
                                         [f"--images {captions.parent} does not hold the images the annotations "
                                          "name (e.g. 1.tif)", f"did you mean --images {captions.parent / 'imgs'}?"]),
        "captions_json_misspelt": (["captions", "--json", captions.parent / "datset.json", "--images", captions.parent],
                                   [f"--json {captions.parent / 'datset.json'}: no such file; did you mean {captions}?"]),
        "captions_json_a_folder": (["captions", "--json", captions.parent, "--images", captions.parent / "imgs"],
                                   [f"--json {captions.parent}: a folder; did you mean {captions}?"]),
        "rsvg_root_at_jpegimages": (["rsvg", "--root", rsvg / "JPEGImages"], [f"did you mean --root {rsvg}?"]),
    }


def test_wrong_folders_are_one_line_naming_the_right_one(tmp_path, monkeypatch, capsys):
    """What `python data_prep.py ...` runs (run_cli(main)), in this process: exit 2, one line naming the flag and
    the folder that looks right, no traceback, nothing written."""
    for case, (argv, names) in _wrong_folder_cases(tmp_path).items():
        out = tmp_path / "out" / case
        result = run_main("data_prep.py", data_prep.main, [*argv, "--out", out, "--workers", 1], monkeypatch, capsys)
        one_error_line(result, names)
        assert not out.exists(), case


def test_wrong_folders_in_process(tmp_path):
    write_png(tmp_path / "DOTA" / "train" / "images" / "A.png", 32, 32)
    with pytest.raises(UserError, match=rf"--root {tmp_path / 'DOTA'} does not hold images/; "
                                        rf"did you mean --root {tmp_path / 'DOTA' / 'train'}\?"):
        run("dota", "--root", tmp_path / "DOTA", "--split", "test", "--out", tmp_path / "o")
    (tmp_path / "fair1m" / "images").mkdir(parents=True)
    (tmp_path / "fair1m" / "labelXml").mkdir()
    with pytest.raises(UserError, match=rf"{tmp_path / 'fair1m' / 'images'} has no images"):
        run("fair1m", "--root", tmp_path / "fair1m", "--split", "train", "--out", tmp_path / "o")
    # RSVQA files one level down
    rsvqa = _rsvqa_root(tmp_path / "parent")
    with pytest.raises(UserError, match=rf"--root {tmp_path / 'parent'} does not hold "
                                        rf"LR_split_test_{{questions,answers,images}}.json; did you mean --root {rsvqa}\?"):
        run("rsvqa", "--root", tmp_path / "parent", "--variant", "LR", "--split", "test", "--out", tmp_path / "o")
    # a --split the caption JSON does not have
    js = _caption_set(tmp_path / "RSICD", "dataset_rsicd.json")
    with pytest.raises(UserError, match=r"no records for rsicd_val.*dataset_rsicd\.json has split 'val' "
                                                 r"\(splits there: test \(1\), train \(1\)\)"):
        run("captions", "--json", js, "--images", js.parent / "imgs", "--split", "val", "--out", tmp_path / "o")
    assert not list((tmp_path / "o").glob("*.jsonl"))


def test_rsvg_index_past_the_last_object_is_a_counted_skip_with_skip_bad(tmp_path):
    root = _rsvg_root(tmp_path)
    (root / "test.txt").write_text("1\n7\n2\n2\n")
    s = run("rsvg", "--root", root, "--split", "test", "--out", tmp_path / "o", "--workers", "1", "--skip-bad")
    assert [r["id"] for r in read_jsonl(tmp_path / "o" / "rsvg_test.jsonl")] == ["rsvg_1", "rsvg_2"]
    assert s["counts"]["skipped"] == 1 and "line 2 in" in s["skipped"][0]["reason"]
    assert s["counts"]["repeated indices, kept once"] == 1


def test_zero_record_runs_say_why(tmp_path):
    # rsvqa: --types that no question has
    root = _rsvqa_root(tmp_path)
    with pytest.raises(UserError, match=r"no question of --types presense \(types in .*: count, presence"):
        run("rsvqa", "--root", root, "--variant", "LR", "--split", "test", "--types", "presense",
            "--out", tmp_path / "o", "--workers", "1")
    assert not (tmp_path / "o" / "rsvqa_lr_test.jsonl").exists()
    # cls: a class folder given as --root; a folder without images is not a class (and is said so)
    for c in ("Airport", "Beach"):
        write_png(tmp_path / "AID" / c / f"{c}_1.jpg", 8, 8)
    with pytest.raises(UserError, match=r"Airport holds images itself: .*\(.*AID\?\)"):
        run("cls", "--root", tmp_path / "AID" / "Airport", "--out", tmp_path / "c", "--workers", "1")
    (tmp_path / "AID" / "__MACOSX").mkdir()
    (tmp_path / "AID" / "empty_folder").mkdir()
    s = run("cls", "--root", tmp_path / "AID", "--train-ratio", "0.0", "--out", tmp_path / "c", "--workers", "1")
    assert s["counts"]["classes"] == 2 and s["notes"] == ["folders without images, not classes: __MACOSX, empty_folder"]
    assert read_jsonl(tmp_path / "c" / "aid_train.jsonl") == [] and len(read_jsonl(tmp_path / "c" / "aid_test.jsonl")) == 2
    # cls: every image unreadable and skipped -> an error, not two empty files
    for c in ("Airport", "Beach"):
        (tmp_path / "AID" / c / f"{c}_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"no records for aid2.*2 skipped as bad input"):
        run("cls", "--root", tmp_path / "AID", "--name", "aid2", "--out", tmp_path / "c", "--workers", "1", "--skip-bad")
    assert not (tmp_path / "c" / "aid2_train.jsonl").exists()



# -----------------------------------------------------------------------------
# synth


def test_synth_is_deterministic_per_seed(tmp_path):
    def files(d):
        return {p.relative_to(d): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.suffix != ".json"}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_synth("--out", tmp_path / name, "--train", 6, "--val", 2, "--seed", seed)
    a, b, c = (files(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    names = {str(p) for p in a}
    for t in ("det", "ground", "vqa", "caption", "cls", "all"):
        assert {f"synth_{t}_train.jsonl", f"synth_{t}_val.jsonl"} <= names
    # val images do not depend on how many training images were asked for
    run_synth("--out", tmp_path / "d", "--train", 3, "--val", 2, "--seed", 0)
    assert (tmp_path / "d" / "images" / "val_00001.png").read_bytes() == a[Path("images/val_00001.png")]


@pytest.mark.parametrize("family", ["qwen2.5", "qwen3"])
def test_synth_round_trips_through_model_tokenize(tmp_path, family, request):
    import model

    tiny = request.getfixturevalue("tiny_qwen25" if family == "qwen2.5" else "tiny_qwen3")
    processor = model.load_processor(tiny)
    run_synth("--out", tmp_path, "--train", 4, "--val", 2, "--seed", 3)
    records = read_records(tmp_path / "synth_all_train.jsonl")  # also checks ids are unique
    assert {r["task"] for r in records} == {"det", "ground", "vqa", "caption", "cls"}
    tok = processor.tokenizer
    for r in records:
        t = model.tokenize(r, processor)
        grid = t["image_grid_thw"]
        n_pads = int((t["input_ids"] == processor.image_token_id).sum())
        assert n_pads == int(grid.prod(-1).sum()) // processor.merge_size ** 2 > 0
        sup = t["labels"][t["labels"] != -100]
        assert len(sup) > 0
        text = tok.decode(sup.tolist())
        assert text.endswith("<|im_end|>")
        text = text[: -len("<|im_end|>")]
        meta = r["meta"]
        if r["task"] in ("det", "ground"):
            w, h = meta["width"], meta["height"]
            kw = model.coord_kwargs(processor, w, h)
            fmt = meta["box_format"]
            assert text == boxes.render_answer(meta["objects"], w, h, **kw, box_format=fmt, with_label=r["task"] == "det")
            objs, stats = boxes.parse_answer(text, w, h, **kw, box_format=fmt,
                                             classes=synth.SYNTH_CLASSES if r["task"] == "det" else None)
            assert len(objs) == len(meta["objects"]) and stats["junk_lines"] == 0
            want = sorted(boxes.poly_to_hbox(o["poly"]) for o in meta["objects"])
            got = sorted(boxes.poly_to_hbox(o["poly"]) for o in objs)
            if r["task"] == "det":
                assert sorted(o["label"] for o in objs) == sorted(o["label"] for o in meta["objects"])
            tol = 1.0 if family == "qwen2.5" else 0.5 * w / 1000 + 1e-6  # integer rounding in the model frame
            assert np.allclose(got, want, atol=tol + 1e-6)
        else:
            assert text == r["messages"][-1]["content"]

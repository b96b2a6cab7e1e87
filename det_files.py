"""
det_files.py — the detection files of the field, read and written the way their tools do: the ground truth of a
folder of DOTA labelTxt or FAIR1M XML label files as arrays for scoring, DOTA Task1/Task2 detection files (what
the DOTA server takes and any detector writes), and FAIR1M's submission (one XML per image). eval_det.py scores
them; the label lines themselves are read by boxes.py.

Detection arrays: {"image" (N,) int64 index into the image names, "label" (N,) int64 index into the class list,
"score" (N,) float, "poly" (N, 8) float}; ground truth has "difficult" (N,) bool instead of "score".
"""

import sys
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

import boxes
from common import UserError


def read_class_list(spec):
    """--classes: dota1.0 | dota1.5 | dota2.0 | dior | fair1m, or a file with one class per line."""
    lists = {**{f"dota{v}": c for v, c in boxes.DOTA_CLASSES.items()}, "dior": boxes.DIOR_CLASSES,
             "fair1m": boxes.FAIR1M_CLASSES}
    if spec in lists:
        return list(lists[spec])
    path = Path(spec)
    if path.is_dir():
        raise UserError(f"--classes {spec} is a folder: give one of {', '.join(lists)} or a file with one class per line")
    if not path.is_file():
        raise UserError(f"--classes {spec}: neither one of {', '.join(lists)} nor an existing file")
    names = [ln.strip() for ln in boxes.read_text(path).splitlines() if ln.strip()]
    if not names:
        raise UserError(f"--classes {spec}: the file has no class names (one per line)")
    dup = sorted(n for n, k in Counter(names).items() if k > 1)
    if dup:
        raise UserError(f"--classes {spec}: duplicate class names {dup}")
    return names


def gt_from_labels(label_dir, classes, names=None):
    """Ground-truth arrays for score_det from a DOTA labelTxt folder (all *.txt, or the given image names), or a
    FAIR1M labelXml folder (*.xml, when it holds no .txt)."""
    label_dir = Path(label_dir)
    ext = ".txt" if any(label_dir.glob("*.txt")) or not any(label_dir.glob("*.xml")) else ".xml"
    if names is None:
        names = sorted(p.stem for p in label_dir.glob(f"*{ext}"))
        if not names:
            raise UserError(f"--gt {label_dir}: no label files (*.txt, or FAIR1M's *.xml) in it")
    cls_idx = {c: i for i, c in enumerate(classes)}
    img, lab, poly, diff, unknown = [], [], [], [], Counter()
    for i, name in enumerate(names):
        path = label_dir / f"{name}{ext}"
        if not path.is_file():
            raise UserError(f"--gt {label_dir}: no label file {path.name} for image '{name}'")
        for o in boxes.read_dota_labels(path) if ext == ".txt" else boxes.read_fair1m_xml(path):
            img.append(i)
            lab.append(cls_idx.get(o["label"], -1))
            unknown[o["label"]] += o["label"] not in cls_idx
            poly.append(o["poly"])
            diff.append(o["difficult"] != 0)
    unknown = {k: v for k, v in unknown.items() if v}
    check_classes_match(unknown, len(lab), classes, f"the label files of --gt {label_dir}")
    gt = {"image": np.array(img, np.int64), "label": np.array(lab, np.int64),
          "poly": np.array(poly, float).reshape(-1, 8), "difficult": np.array(diff, bool)}
    return gt, names


def check_classes_match(unknown, n_objects, classes, source):
    """unknown: {label: count} of ground-truth objects whose class is not in the class list. When that is every
    object, every AP would be 0 because of a wrong class list (or names spelt otherwise), not because of the
    detections: UserError. Some: a note, they are not scored."""
    if not unknown:
        return
    if sum(unknown.values()) == n_objects:
        show = lambda xs: ", ".join(xs[:6]) + (", ..." if len(xs) > 6 else "")  # noqa: E731
        raise UserError(f"none of the {n_objects} ground-truth objects in {source} has a class of the class list "
                              f"(ground truth: {show(sorted(unknown))}; class list: {show(list(classes))}): give "
                              f"--classes with the ground truth's class names")
    print(f"note: ground-truth classes not in the class list are not scored: {unknown}", file=sys.stderr)


def read_task_files(det_dir, task, classes, image_index):
    """Task1_{class}.txt (`img score x1 y1 ... x4 y4`) or Task2_{class}.txt (`img score xmin ymin xmax ymax`)
    -> detection arrays, rows in file order. A missing class file means no detections for that class. A folder
    of FAIR1M submission XMLs (no Task files) is read by read_fair1m_submission."""
    det_dir = Path(det_dir)
    if task == 1 and not any(det_dir.glob("Task*_*.txt")) and any(det_dir.glob("*.xml")):
        return read_fair1m_submission(det_dir, classes, image_index)
    found = sorted(p.name for p in det_dir.glob(f"Task{task}_*.txt"))
    if not found:
        other = sorted(p.name for p in det_dir.glob(f"Task{3 - task}_*.txt"))[:1]
        raise UserError(f"--dota-task1 {det_dir}: no Task{task}_*.txt files in it"
                              + (f" (it has {other[0]}...: use --task {3 - task})" if other else ""))
    if not any(f"Task{task}_{name}.txt" in found for name in classes):
        raise UserError(f"--dota-task1 {det_dir}: none of its files ({', '.join(found[:3])}...) is named after a "
                              f"class of the class list ({', '.join(classes[:3])}...): check --classes")
    nfields = 10 if task == 1 else 6
    img, lab, score, geo = [], [], [], []
    for c, name in enumerate(classes):
        path = det_dir / f"Task{task}_{name}.txt"
        if not path.is_file():
            continue
        for lineno, line in enumerate(boxes.read_text(path).splitlines(), 1):
            t = line.split()
            if not t:
                continue
            if len(t) != nfields:
                raise UserError(f"bad detection line {lineno} in {path}: expected {nfields} fields (image score "
                                      f"{'x1 y1 ... x4 y4' if task == 1 else 'xmin ymin xmax ymax'}), got {len(t)}")
            if t[0] not in image_index:
                raise UserError(f"bad detection line {lineno} in {path}: image '{t[0]}' has no label file "
                                      f"in --gt (or is not listed in --imageset)")
            try:
                vals = [float(v) for v in t[1:]]
            except ValueError:
                raise UserError(f"bad detection line {lineno} in {path}: non-numeric score or coordinate") from None
            img.append(image_index[t[0]])
            lab.append(c)
            score.append(vals[0])
            geo.append(vals[1:])
    unknown = sorted(p.name for p in det_dir.glob(f"Task{task}_*.txt") if p.stem[6:] not in classes)
    if unknown:
        print(f"note: detection files for classes not in the class list are ignored: {unknown}", file=sys.stderr)
    width = 8 if task == 1 else 4
    dets = {"image": np.array(img, np.int64), "label": np.array(lab, np.int64), "score": np.array(score, float)}
    dets["poly" if task == 1 else "hbox"] = np.array(geo, float).reshape(-1, width)
    if task == 2:
        dets["poly"] = None
    return dets


def write_task1(out_dir, classes, image_names, dets, zip_path=None):
    """Write Task1_{class}.txt for every class (empty file when none) and optionally zip them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = defaultdict(list)
    for i, c, s, p in zip(dets["image"].tolist(), dets["label"].tolist(), dets["score"].tolist(), dets["poly"].tolist()):
        lines[c].append(f"{image_names[i]} {s:.6g} " + " ".join(f"{v:.1f}" for v in p))
    paths = []
    for c, name in enumerate(classes):
        paths.append(out_dir / f"Task1_{name}.txt")
        paths[-1].write_text("".join(ln + "\n" for ln in lines[c]))
    if zip_path:
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
            for p in paths:
                z.write(p, p.name)
    return paths


# -----------------------------------------------------------------------------
# FAIR1M: the benchmark's submission, one XML per image in the schema of its own label files (the one every public
# FAIR1M / Gaofen submission writer produces): annotation / source (filename NAME.tif, origin GF2/GF3) / research /
# objects / object (coordinate pixel, type rectangle, description None, possibleresult (name as FAIR1M spells it,
# probability), points: 5 "x,y", the fifth repeating the first). Scored locally like DOTA Task1 (polygon IoU > 0.5,
# VOC AP over the 37 classes: what FAIR1M toolchains such as MMRotate's FAIR1M dataset compute); no official
# scorer is public.

FAIR1M_XML_HEAD = ('<?xml version="1.0" encoding="utf-8"?>\n<annotation>\n    <source>\n        <filename>{name}.tif'
                   '</filename>\n        <origin>GF2/GF3</origin>\n    </source>\n    <research>\n        <version>1.0'
                   '</version>\n        <provider>rscovlm</provider>\n        <author>rscovlm</author>\n        '
                   '<pluginname>FAIR1M</pluginname>\n        <pluginclass>object detection</pluginclass>\n        '
                   '<time>2021-03</time>\n    </research>\n    <objects>\n')
FAIR1M_XML_OBJECT = ('        <object>\n            <coordinate>pixel</coordinate>\n            <type>rectangle</type>\n'
                     '            <description>None</description>\n            <possibleresult>\n                '
                     '<name>{label}</name>\n                <probability>{score}</probability>\n            '
                     '</possibleresult>\n            <points>\n{points}            </points>\n        </object>\n')


def fair1m_xml(name, objects):
    """One image's submission XML for objects [(FAIR1M class name, score, poly 8)]."""
    body = ""
    for label, score, poly in objects:
        pts = list(zip(poly[0::2], poly[1::2]))
        points = "".join(f"                <point>{x:.6f},{y:.6f}</point>\n" for x, y in pts + pts[:1])
        body += FAIR1M_XML_OBJECT.format(label=label, score=f"{score:.6g}", points=points)
    return FAIR1M_XML_HEAD.format(name=name) + body + "    </objects>\n</annotation>\n"


def write_fair1m(out_dir, classes, image_names, dets, zip_path=None):
    """The FAIR1M submission of whole-image detections (merge_patches): OUT/{image}.xml for every image (no
    detection: no object), zipped when zip_path is given. classes: boxes.FAIR1M_CLASSES' names."""
    names = dict(zip(boxes.FAIR1M_CLASSES, boxes.FAIR1M_NAMES))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    per_image = defaultdict(list)
    for i, c, s, p in zip(dets["image"].tolist(), dets["label"].tolist(), dets["score"].tolist(), dets["poly"].tolist()):
        per_image[i].append((names[classes[c]], s, p))
    paths = []
    for i, name in enumerate(image_names):
        paths.append(out_dir / f"{name}.xml")
        paths[-1].write_text(fair1m_xml(name, per_image[i]))
    if zip_path:
        with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
            for p in paths:
                z.write(p, p.name)
    return paths


def read_fair1m_submission(det_dir, classes, image_index):
    """A folder of FAIR1M submission XMLs -> detection arrays (images by file stem, in file and object order)."""
    cls_idx = {c: i for i, c in enumerate(classes)}
    img, lab, score, poly, unknown = [], [], [], [], Counter()
    for path in sorted(Path(det_dir).glob("*.xml")):
        if path.stem not in image_index:
            raise UserError(f"{path}: image '{path.stem}' has no label file in --gt (or is not listed in --imageset)")
        for o in boxes.read_fair1m_xml(path):
            if o["label"] not in cls_idx:
                unknown[o["label"]] += 1
                continue
            img.append(image_index[path.stem]), lab.append(cls_idx[o["label"]]), score.append(o.get("score", 1.0))
            poly.append(o["poly"])
    if unknown:
        print(f"note: detections of classes not in the class list are ignored: {dict(unknown)}", file=sys.stderr)
    return {"image": np.array(img, np.int64), "label": np.array(lab, np.int64), "score": np.array(score, float),
            "poly": np.array(poly, float).reshape(-1, 8)}

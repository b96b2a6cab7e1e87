"""The localising CPU demo and what it is built from: the synth localisation level, make_tiny's head widths,
the grounding text prior, and demo.sh itself end to end on a shortened run (eval_suite.py --watch: test_suite.py)."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

import eval_det
import model
import synth
from cli_helpers import REPO, run_main
from common import UserError, read_records


# -----------------------------------------------------------------------------
# synth: the localisation level


def test_synth_localisation_level(tmp_path):
    synth.main(["data", "--out", str(tmp_path / "loc"), "--train", "30", "--val", "0", "--objects", "1,1",
                    "--object-size", "64,96", "--ground-expr", "class"])
    det = read_records(tmp_path / "loc" / "synth_det_train.jsonl")
    ground = {r["images"][0]: r for r in read_records(tmp_path / "loc" / "synth_ground_train.jsonl")}
    assert len(det) == len(ground) == 30  # one object per image: always alone of its class, always grounded
    for r in det:
        (obj,) = r["meta"]["objects"]
        p = obj["poly"]  # the oriented box's corners: sides 2*hl and 2*hw, hl the longer
        sides = [math.dist(p[0:2], p[2:4]), math.dist(p[2:4], p[4:6])]
        assert 64 - 0.05 <= max(sides) <= 96 + 0.05, sides
        g = ground[r["images"][0]]
        expr = g["meta"]["objects"][0]["expression"]
        assert expr == "the " + obj["label"].replace("-", " ")  # the class alone, no colour, no region
        assert f'"{expr}"' in g["messages"][0]["content"]
        # the grounding box is the horizontal box of the same object
        xs, ys = p[0::2], p[1::2]
        assert g["meta"]["objects"][0]["poly"] == pytest.approx([min(xs), min(ys), max(xs), min(ys), max(xs), max(ys),
                                                                 min(xs), max(ys)], abs=0.02)
    # the default level is unchanged: 1-4 objects, colour + class + region expressions
    synth.main(["data", "--out", str(tmp_path / "rich"), "--train", "30", "--val", "0"])
    counts = [len(r["meta"]["objects"]) for r in read_records(tmp_path / "rich" / "synth_det_train.jsonl")]
    assert max(counts) > 1 and min(counts) >= 1
    exprs = [r["meta"]["objects"][0]["expression"] for r in read_records(tmp_path / "rich" / "synth_ground_train.jsonl")]
    assert all(len(e.split()) >= 4 for e in exprs)


def test_synth_level_flags_refuse_bad_ranges(tmp_path, monkeypatch, capsys):
    for flag, value in (("--objects", "0,2"), ("--objects", "3,2"), ("--object-size", "64,200"), ("--objects", "a")):
        code, _, err = run_main("synth.py", synth.main, ["data", "--out", tmp_path, flag, value],
                                monkeypatch, capsys)
        assert code == 2 and flag in err and value in err, (flag, value, err)


# -----------------------------------------------------------------------------
# make_tiny: head widths and RoPE base


def test_make_tiny_head_widths_and_rope(tmp_path):
    ckpt = synth.make_tiny(tmp_path / "q3", "qwen3", hidden=64, layers=1, vision_hidden=64, vision_depth=1,
                           head_dim=32, vision_head_dim=32, rope_theta=1e4, vision_pos_std=0.5)
    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    assert cfg["vision_config"]["num_heads"] == 2 and cfg["text_config"]["num_attention_heads"] == 2
    rope = cfg["text_config"]["rope_parameters"]
    assert rope["rope_theta"] == 1e4 and rope["mrope_section"] == [6, 5, 5]  # Qwen3-VL's [24, 20, 20] at 32 wide
    net, processor = model.load(ckpt)  # loads and runs: the widths are consistent
    assert net.config.vision_config.num_heads == 2
    pos = net.model.visual.pos_embed.weight  # (64, 64): re-drawn at std 0.5, saved and loaded back
    assert 0.45 < pos.std().item() < 0.55
    with pytest.raises(UserError, match="only Qwen3-VL"):
        synth.make_tiny(tmp_path / "q25pos", "qwen2.5", vision_pos_std=0.5)
    cfg25 = json.loads((Path(synth.make_tiny(tmp_path / "q25", "qwen2.5", head_dim=32)) / "config.json").read_text())
    assert cfg25["text_config"]["rope_parameters"]["mrope_section"] == [4, 6, 6]  # Qwen2.5-VL's [16, 24, 24]
    with pytest.raises(UserError, match="--vision-head-dim"):
        synth.make_tiny(tmp_path / "bad", "qwen3", vision_hidden=64, vision_head_dim=48)


# -----------------------------------------------------------------------------
# the grounding text prior


def ground_record(rid, expr, box, size=200):
    x1, y1, x2, y2 = box
    return {"id": rid, "task": "ground", "dataset": "d", "images": [],
            "messages": [{"role": "user", "content": f"<image>\nLocate {expr}."}, {"role": "assistant", "content": ""}],
            "meta": {"width": size, "height": size, "box_format": "hbox",
                     "objects": [{"poly": [x1, y1, x2, y1, x2, y2, x1, y2], "label": "x", "expression": expr}]}}


def test_text_prior_hand_computed():
    train = [ground_record("t0", "the plane", (0, 0, 100, 100)), ground_record("t1", "the plane", (20, 20, 120, 120)),
             ground_record("t2", "the ship", (10, 10, 110, 110), size=400)]  # relative (0.025..0.275)
    # mean box of "the plane": (10, 10, 110, 110) in a 200-px image -> IoU 1 with this record
    # an unseen expression gets the mean of all three relative boxes: x1 = (0 + 0.1 + 0.025) / 3 = 0.041667,
    #   x2 = (0.5 + 0.6 + 0.275) / 3 = 0.458333, i.e. (8.33, 8.33, 91.67, 91.67) in a 200-px image, against
    #   (60, 60, 160, 160): inter 31.67^2, union 83.33^2 + 100^2 - 31.67^2
    val = [ground_record("v0", "the plane", (10, 10, 110, 110)), ground_record("v1", "the tank", (60, 60, 160, 160))]
    res = eval_det.score_text_prior(train, val)
    lo, hi = 200 * 0.125 / 3, 200 * 1.375 / 3
    inter = (hi - 60) ** 2
    iou1 = inter / ((hi - lo) ** 2 + 100 ** 2 - inter)
    assert res["Acc@0.5"] == 0.5 and res["meanIoU"] == pytest.approx((1 + iou1) / 2)
    assert res["expressions_seen_in_training"] == 1 and res["train_records"] == 3


# -----------------------------------------------------------------------------
# demo.sh end to end, shortened


@pytest.mark.slow  # the whole pipeline: data, two gloo ranks training, every export scored
def test_demo_short_run_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(["bash", "demo.sh", "STEPS=2", "LOCATE=24", "LOCATE_VAL=4", "SCENES=12", "SCENES_VAL=3",
                        f"OUT={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    tasks = {"det": "mAP", "ground": "Acc@0.5", "vqa": "OA", "cls": "accuracy", "caption": "CIDEr-D"}
    for when in ("untrained", "trained"):
        assert {t: list(m) for t, m in summary[when].items()} == {t: [m] for t, m in tasks.items()}
        assert list(summary[when]) == list(tasks)  # the table's row order
    # the numbers are the watcher's own: step 0 and the final step of metrics_by_step.jsonl, x100
    lines = [json.loads(x) for x in (out / "eval" / "metrics_by_step.jsonl").read_text().splitlines()]
    assert summary["trained"]["ground"]["Acc@0.5"] == pytest.approx(
        100 * lines[-1]["headline"]["locate/synth_ground_val: ground/synth: Acc@0.5"])
    assert summary["untrained"]["caption"]["CIDEr-D"] == pytest.approx(
        100 * lines[0]["headline"]["scenes/synth_caption_val: caption/synth: CIDEr-D"])
    assert summary["steps"] == 2 and summary["loss_last"] < summary["loss_first"]
    assert 0 <= summary["prior"]["ground"]["Acc@0.5"] <= 100 and summary["seconds"] > 0
    # the curve has the untrained model, each export and final: steps 0, 1, 2; the five benchmarks at each
    assert [line["step"] for line in lines] == [0, 1, 2] and all(len(line["headline"]) == 5 for line in lines)
    assert (out / "curves.png").stat().st_size > 0
    assert len(list(out.glob("pred_*.png"))) == 6  # 3 detection + 3 grounding images, boxes drawn
    table = (out / "summary.md").read_text()
    assert all(f"| {t} | {m} |" in table for t, m in tasks.items()) and "text prior" in table and table in p.stdout
    # where the time went: each stage's seconds, adding up to the total; the table says the steps and the scoring
    stages = summary["seconds_by_stage"]
    assert list(stages) == ["model (synth.py model)", "data (synth.py data)", "training (launch.sh -> train.py)",
                            "scoring (eval_suite.py --watch)", "this table", "total"]
    assert all(v >= 0 for v in stages.values()) and stages["training (launch.sh -> train.py)"] > 1
    assert sum(list(stages.values())[:-1]) == pytest.approx(stages["total"], abs=0.3)
    assert "| 2 steps at " in table and "step 0 " in table and f"| total | {stages['total']:.0f} |" in table

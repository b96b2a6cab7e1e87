"""model.py on the tiny checkpoints: loading, tokenization and label masking, image tokens, generation,
the resumable prediction loop."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import boxes
import model
import synth
from common import UserError, read_predictions, read_records


FAMILIES = ["qwen2.5", "qwen3"]


@pytest.fixture(scope="module")
def loaded(tiny_qwen25, tiny_qwen3):
    return {"qwen2.5": model.load(tiny_qwen25), "qwen3": model.load(tiny_qwen3)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (h, w) in {"wide": (100, 150), "tall": (130, 60), "square": (224, 224)}.items():
        paths[name] = str(d / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[name])
    return paths


def vqa(images, img="wide", answer="yes"):
    return {"id": "q", "task": "vqa", "images": [images[img]], "meta": {},
            "messages": [{"role": "user", "content": "<image>Is there a ship?"}, {"role": "assistant", "content": answer}]}


def supervised_text(sample, processor):
    return processor.tokenizer.decode(sample["input_ids"][sample["labels"] != -100])


# -----------------------------------------------------------------------------


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_family_and_offline_reload(fam, loaded, tiny_qwen25, tiny_qwen3, monkeypatch):
    from transformers import AutoModelForImageTextToText

    path = {"qwen2.5": tiny_qwen25, "qwen3": tiny_qwen3}[fam]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m, proc = loaded[fam]
    assert model.family(path) == model.family(m) == proc.family == fam
    hf = AutoModelForImageTextToText.from_pretrained(path)
    for (k, v), (k2, v2) in zip(m.state_dict().items(), hf.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    # Qwen's special tokens each map to one id, distinct from each other.
    ids = [proc.tokenizer.convert_tokens_to_ids(t) for t in synth.SPECIAL_TOKENS]
    assert len(set(ids)) == len(ids) and all(len(proc.tokenizer.encode(t, add_special_tokens=False)) == 1 for t in synth.SPECIAL_TOKENS)


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_labels_cover_exactly_assistant_turns(fam, loaded, images):
    _, proc = loaded[fam]
    rec = {"id": "m", "task": "chat", "images": [images["wide"], images["tall"]], "meta": {},
           "messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "<image>How many planes?"},
                        {"role": "assistant", "content": "3"},
                        {"role": "user", "content": "And here? <image>"},
                        {"role": "assistant", "content": "There are none."}]}
    s = model.tokenize(rec, proc)
    assert supervised_text(s, proc) == "3<|im_end|>There are none.<|im_end|>"
    # Supervised positions are two contiguous runs, each ending with the end-of-turn token.
    sup = (s["labels"] != -100).nonzero().flatten().tolist()
    runs = np.split(np.array(sup), np.where(np.diff(sup) != 1)[0] + 1)
    assert len(runs) == 2 and all(s["input_ids"][r[-1]] == proc.end_of_turn_id for r in runs)
    assert torch.equal(s["labels"][sup], s["input_ids"][sup])
    assert not (s["labels"] == proc.image_token_id).any()
    # Context keeps the template: user/system text is present but never supervised.
    text = proc.tokenizer.decode(s["input_ids"])
    assert "How many planes?" in text and "Be brief." in text and "How many" not in supervised_text(s, proc)


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_image_tokens_match_grid(fam, loaded, images):
    _, proc = loaded[fam]
    rec = {"id": "m", "task": "chat", "meta": {}, "images": [images["wide"], images["tall"], images["square"]],
           "messages": [{"role": "user", "content": "<image><image> compare with <image>"}, {"role": "assistant", "content": "ok"}]}
    s = model.tokenize(rec, proc)
    grid = s["image_grid_thw"]
    ids = s["input_ids"].tolist()
    assert grid.shape == (3, 3)
    # Each image: <|vision_start|> then exactly t*h*w/4 pads then <|vision_end|>, in order.
    starts = [i for i, t in enumerate(ids) if t == proc.vision_start_id]
    for st, thw in zip(starts, grid):
        n = int(thw.prod()) // 4
        assert ids[st + 1 : st + 1 + n] == [proc.image_token_id] * n and ids[st + 1 + n] == proc.vision_end_id
    assert s["mm_token_type_ids"].sum() == sum(int(g.prod()) // 4 for g in grid)
    assert torch.equal(s["mm_token_type_ids"].bool(), s["input_ids"] == proc.image_token_id)
    assert s["pixel_values"].shape[0] == int(grid.prod(-1).sum())


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_smart_resize_matches_processor(fam, loaded, tmp_path):
    _, proc = loaded[fam]
    factor = proc.patch_size * proc.merge_size
    for h, w in [(100, 150), (557, 712), (800, 800), (30, 500), (1111, 1182)]:
        p = tmp_path / f"{h}x{w}.png"
        Image.new("RGB", (w, h)).save(p)
        _, grid, _ = model.process_images(proc, [p])
        assert model.smart_resize(h, w, factor, proc.min_pixels, proc.max_pixels) == (
            int(grid[0, 1]) * proc.patch_size, int(grid[0, 2]) * proc.patch_size)


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_smart_resize_sweep_equals_the_image_processor(fam, loaded):
    """Every side from 1 px up through the factor boundaries (where the old formula clamped a side to one factor
    and the processor rounds it to 0 first), small and huge images, both budgets' edges: our size equals the
    grid the processor class the code uses produces; past aspect ratio 200 both refuse."""
    _, proc = loaded[fam]
    ip, factor = proc.image_processor, proc.patch_size * proc.merge_size
    sides = sorted({1, 2, 3, 5, 8, 13, 20, 50, 77, 100, 150, 301, 640, 1000, 1500, 4000}
                   | {k * factor + d for k in (1, 2, 3) for d in (-factor // 2 - 1, -factor // 2, -factor // 2 + 1, -1, 0, 1)})
    n = 0
    for h in sides:
        for w in sides:
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(UserError, match="aspect ratio"):
                    model.smart_resize(h, w, factor, proc.min_pixels, proc.max_pixels)
                with pytest.raises(ValueError):
                    ip(images=[Image.new("RGB", (w, h))], return_tensors="pt")
                continue
            grid = ip(images=[Image.new("RGB", (w, h))], return_tensors="pt")["image_grid_thw"][0]
            assert model.smart_resize(h, w, factor, proc.min_pixels, proc.max_pixels) == (
                int(grid[1]) * proc.patch_size, int(grid[2]) * proc.patch_size), (h, w)
            n += 1
    assert n > 500


def test_load_image_as_transformers_and_the_processor_read_it(tmp_path):
    """EXIF orientation applied as transformers' load_image does; transparency composited on white as the image
    processor's convert_to_rgb does (RGBA, LA, P with a transparent colour). Each check fails with a plain
    Image.open(...).convert("RGB")."""
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image as hf_load_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 64, 3), dtype=np.uint8)
    for orientation in (3, 6, 8):  # 180 degrees, 90 clockwise, 90 counter-clockwise (phone/drone JPEGs)
        path = tmp_path / f"exif{orientation}.jpg"
        exif = Image.Exif()
        exif[0x0112] = orientation
        Image.fromarray(pixels).save(path, exif=exif.tobytes(), quality=95)
        ours, ref = model.load_image(path), hf_load_image(str(path))
        assert ours.size == ref.size and np.array_equal(np.asarray(ours), np.asarray(ref))
        raw = Image.open(path).convert("RGB")
        assert ours.size != raw.size or not np.array_equal(np.asarray(ours), np.asarray(raw))
    alpha = rng.integers(0, 256, (40, 64), dtype=np.uint8)
    rgba = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    la = Image.fromarray(np.dstack([pixels[..., 0], alpha]), "LA")
    pal = Image.fromarray(pixels).convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    for name, im in (("rgba", rgba), ("la", la), ("p", pal)):
        path = tmp_path / f"{name}.png"
        im.save(path)
        ours = np.asarray(model.load_image(path))
        ref = convert_to_rgb(Image.open(path), return_numpy=True)
        assert ours.dtype == np.uint8 and np.array_equal(ours, ref), name
        assert not np.array_equal(ours, np.asarray(Image.open(path).convert("RGB"))), name
    with pytest.raises(UserError, match="cannot read image .*nothing.png"):
        model.load_image(tmp_path / "nothing.png")


def png_chunks(path):
    """[(type, whole chunk bytes)] of a PNG file after its signature"""
    data, chunks, i = Path(path).read_bytes(), [], 8
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        chunks.append((data[i + 4:i + 8], data[i:i + 12 + n]))
        i += 12 + n
    return chunks


def test_image_size_reads_headers_only_and_agrees_with_load_image(tmp_path, monkeypatch):
    """model.image_size (what train.py measures every record with) decodes no pixels of a JPEG or of a PNG without
    trailing metadata (PIL's PNG getexif decodes the whole image), and still sees an EXIF orientation that a PNG
    keeps after its pixel data: the size is always load_image's."""
    from PIL import ImageFile

    pixels = np.random.default_rng(0).integers(0, 255, (40, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # 90 degrees clockwise: load_image returns 40 wide, 64 high
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    Image.fromarray(pixels).save(tmp_path / "rot.jpg", exif=exif.tobytes())
    Image.fromarray(pixels).save(tmp_path / "rot_head.png", exif=exif.tobytes())
    chunks = png_chunks(tmp_path / "rot_head.png")  # the same file with its eXIf chunk moved after the pixels
    kinds = [k for k, _ in chunks]
    assert kinds.index(b"eXIf") < kinds.index(b"IDAT")
    moved = [c for c in chunks if c[0] != b"eXIf"]
    moved.insert(len(moved) - 1, next(c for c in chunks if c[0] == b"eXIf"))  # before IEND
    (tmp_path / "rot_tail.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"".join(b for _, b in moved))
    expected = {"plain.png": (40, 64), "rot.jpg": (64, 40), "rot_head.png": (64, 40), "rot_tail.png": (64, 40)}
    for name, hw in expected.items():
        assert model.load_image(tmp_path / name).size[::-1] == hw, name  # (w, h) -> (h, w)
        assert model.image_size(tmp_path / name) == hw, name
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.format) or real_load(im))
    for name in expected:
        model.image_size(tmp_path / name)
    assert decoded == ["PNG"]  # rot_tail.png alone: its orientation is after the pixels


@pytest.mark.parametrize("fam", FAMILIES)
def test_det_answer_rendered_in_family_coordinates(fam, loaded, images):
    _, proc = loaded[fam]
    objects = [{"poly": [10, 10, 60, 10, 60, 40, 10, 40], "label": "ship", "difficult": 0},
               {"poly": [100, 50, 140, 50, 140, 90, 100, 90], "label": "large-vehicle", "difficult": 0}]
    rec = {"id": "d", "task": "det", "images": [images["wide"]],
           "meta": {"width": 150, "height": 100, "objects": objects, "classes": ["ship", "large-vehicle"]},
           "messages": [{"role": "user", "content": "<image>Detect ships and large vehicles."},
                        {"role": "assistant", "content": "stale text that is re-rendered"}]}
    s = model.tokenize(rec, proc)
    kw = model.coord_kwargs(proc, 150, 100)
    expected = boxes.render_answer(objects, 150, 100, **kw)
    assert supervised_text(s, proc) == expected + "<|im_end|>"
    parsed, _ = boxes.parse_answer(expected, 150, 100, **kw, classes=["ship", "large-vehicle"])
    assert sorted(o["label"] for o in parsed) == ["large-vehicle", "ship"]
    if fam == "qwen3":
        assert kw["coords"] == "norm1000"
    else:
        assert kw == {"coords": "abs", "resized_hw": (int(s["image_grid_thw"][0, 1]) * 14, int(s["image_grid_thw"][0, 2]) * 14)}
    # A record whose meta size disagrees with its image is refused.
    with pytest.raises(ValueError, match="meta says 151x100"):
        model.tokenize({**rec, "meta": {**rec["meta"], "width": 151}}, proc)


def test_text_only_and_max_length(loaded, images):
    _, proc = loaded["qwen2.5"]
    s = model.tokenize({"id": "t", "task": "chat", "images": [], "meta": {},
                        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}, proc)
    assert s["pixel_values"] is None and s["image_grid_thw"] is None and s["mm_token_type_ids"].sum() == 0
    full = model.tokenize(vqa(images, answer="yes " * 20), proc)
    n = len(full["input_ids"])
    with pytest.raises(ValueError, match=f"record 'q': {n} tokens > max_length 40"):
        model.tokenize(vqa(images, answer="yes " * 20), proc, max_length=40)
    cut = model.tokenize(vqa(images, answer="yes " * 20), proc, max_length=n - 5, truncate=True)
    assert torch.equal(cut["input_ids"], full["input_ids"][: n - 5]) and cut["mm_token_type_ids"].sum() == full["mm_token_type_ids"].sum()
    first_pad = int((full["input_ids"] == proc.image_token_id).nonzero()[0])
    with pytest.raises(ValueError, match="cut image tokens"):
        model.tokenize(vqa(images), proc, max_length=first_pad + 3, truncate=True)


@pytest.mark.versions
def test_collate_and_loss_masks_padding(loaded, images):
    m, proc = loaded["qwen2.5"]
    a = model.tokenize(vqa(images), proc)
    b = model.tokenize({"id": "t", "task": "chat", "images": [], "meta": {},
                        "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "a much longer answer"}]}, proc)
    batch = model.collate([a, b], proc.pad_token_id)
    assert batch["input_ids"].shape == (2, max(len(a["input_ids"]), len(b["input_ids"])))
    with torch.no_grad():
        loss_batch = m(**batch).loss
        # The batched loss is the token-weighted mean of the per-sample losses: padding changes nothing.
        la, lb = (m(**model.collate([s], proc.pad_token_id)).loss for s in (a, b))
    na, nb = ((s["labels"][1:] != -100).sum() for s in (a, b))
    assert torch.allclose(loss_batch, (la * na + lb * nb) / (na + nb), atol=1e-5)


@pytest.mark.versions
@pytest.mark.parametrize("fam", FAMILIES)
def test_generate_batched_equals_one_by_one(fam, loaded, images):
    m, proc = loaded[fam]
    recs = [vqa(images, "wide"), {**vqa(images, "tall"), "id": "q2"},
            {"id": "t", "task": "chat", "images": [], "meta": {}, "messages": [{"role": "user", "content": "Describe the image."}]},
            {**vqa(images, "square"), "id": "q3"}]
    batched = model.generate(m, proc, recs, batch_size=3, max_new_tokens=6)
    single = [model.generate(m, proc, [r], batch_size=1, max_new_tokens=6)[0] for r in recs]
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_init_dist_binds_the_process_group_to_the_gpu(monkeypatch):
    """On a GPU, init_process_group gets device_id = this rank's GPU (torchrun and the one-process group alike);
    on CPU (gloo) none. CUDA and the process group are simulated."""
    calls = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key, value in (("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(key, value)
    assert model.init_dist() == torch.device("cuda:1")
    assert calls[-1][0] == "nccl" and calls[-1][1]["device_id"] == torch.device("cuda:1")
    monkeypatch.delenv("WORLD_SIZE")
    model.init_dist(single_process_group=True)
    assert calls[-1][1]["world_size"] == 1 and calls[-1][1]["device_id"] == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model.init_dist(single_process_group=True) == torch.device("cpu")
    assert calls[-1][0] == "gloo" and calls[-1][1]["device_id"] is None


def test_read_records_errors(tmp_path, images):
    good = {"id": "a", "task": "vqa", "images": ["img.png"], "meta": {}, "messages": [{"role": "user", "content": "<image>q"}]}
    p = tmp_path / "recs.jsonl"
    p.write_text(json.dumps(good) + "\n")
    assert read_records(p)[0]["images"] == [str(tmp_path / "img.png")]
    p.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"recs.jsonl:2"):
        read_records(p)
    p.write_text(json.dumps({**good, "images": []}) + "\n")
    with pytest.raises(ValueError, match=r"recs.jsonl:1: 1 '<image>' tags but 0 images"):
        read_records(p)
    p.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        read_records(p)
    p.write_text("\n")
    with pytest.raises(UserError, match=r"recs.jsonl has no records \(an empty file\)"):
        read_records(p)
    with pytest.raises(UserError, match=rf"{tmp_path} is a folder: give a record file \(.jsonl\), e.g. .*recs.jsonl"):
        read_records(tmp_path)
    with pytest.raises(UserError, match="record file .*nope.jsonl not found"):
        read_records(tmp_path / "nope.jsonl")


def test_read_predictions(tmp_path):
    p = tmp_path / "preds.jsonl"
    assert read_predictions(p) == {}  # nothing predicted yet
    # ids are strings; null text (an API's refusal) is ""; extra keys are kept; a blank line is skipped
    p.write_text('{"id": 7, "text": "a", "score": 1}\n\n{"id": "8", "text": null}\n')
    assert read_predictions(p) == {"7": {"id": "7", "text": "a", "score": 1}, "8": {"id": "8", "text": ""}}
    # a complete last line without newline is a line like any other (files written by hand often end so)
    p.write_text('{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}')
    assert set(read_predictions(p)) == {"a", "b"}
    # a cut-off last line is ignored; repair=True removes it from the file
    p.write_text('{"id": "a", "text": "x"}\n{"id": "b", "te')
    assert set(read_predictions(p)) == {"a"} and p.read_text().endswith("te")
    assert set(read_predictions(p, repair=True)) == {"a"} and p.read_text() == '{"id": "a", "text": "x"}\n'
    # every other problem names the file and line
    for text, error in [('{"id": "a", "text": "x"}\n{"id": "b", "te\n', r"bad JSON at .*preds\.jsonl:2"),
                        ('{"id": "a", "text": "x"}\n{"id": "b"}\n', r"preds\.jsonl:2: needs 'id' and 'text'"),
                        ('{"id": "a", "text": "x"}\n{"id": "b"}', r"preds\.jsonl:2: needs 'id' and 'text'"),
                        ('{"id": "a", "text": "x"}\n\n["b", "y"]\n', r"preds\.jsonl:3: needs 'id' and 'text'"),
                        ('{"id": "a", "text": 3}\n', r"preds\.jsonl:1: 'text' must be a string, got int"),
                        ('{"id": 1, "text": "x"}\n{"id": "2", "text": "y"}\n{"id": "1", "text": "z"}\n',
                         r"preds\.jsonl:3: duplicate id '1' \(first on line 1\)")]:
        p.write_text(text)
        with pytest.raises(ValueError, match=error):
            read_predictions(p, repair=True)


def test_predict_resumes_after_interruption(loaded, images, tmp_path):
    m, proc = loaded["qwen2.5"]
    recs = [{**vqa(images, k), "id": k} for k in ("wide", "tall", "square")]
    recs.append({"id": "t", "task": "chat", "images": [], "meta": {}, "messages": [{"role": "user", "content": "hello"}]})
    full = model.predict(m, proc, recs, tmp_path / "a" / "predictions.jsonl", batch_size=2, max_new_tokens=5,
                         postprocess=lambda r, t: {"n_chars": len(t)})
    assert set(full) == {r["id"] for r in recs} and all(v["n_chars"] == len(v["text"]) for v in full.values())
    # Interrupted run: one complete line and half of the next.
    lines = (tmp_path / "a" / "predictions.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "b" / "predictions.jsonl"
    out.parent.mkdir()
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    calls = []
    resumed = model.predict(m, proc, recs, out, batch_size=2, max_new_tokens=5,
                            postprocess=lambda r, t: (calls.append(r["id"]), {"n_chars": len(t)})[1])
    assert resumed == full
    assert len(calls) == 3 and json.loads(lines[0])["id"] not in calls  # the complete line was not redone
    assert len(out.read_text().splitlines()) == 4
    # Resuming with another generation setting is refused instead of mixing answers.
    with pytest.raises(ValueError, match="use another output directory"):
        model.predict(m, proc, recs, out, batch_size=2, max_new_tokens=9)
    # A bad line that is not a cut-off last line is an error naming the file and line.
    (tmp_path / "c.jsonl").write_text(lines[0] + "garbage\n" + lines[2])
    with pytest.raises(ValueError, match=r"c.jsonl:2"):
        read_predictions(tmp_path / "c.jsonl")

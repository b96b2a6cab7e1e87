"""
synth.py — rscovlm without downloads: a tiny random-init Qwen2.5-VL / Qwen3-VL checkpoint (the real
architecture at toy sizes, its own small tokenizer) and a seeded synthetic remote-sensing dataset (det, ground,
vqa, caption, cls records in the project's format). The tests and the CPU demo (demo.sh) run on these.

    python synth.py model ckpt/tiny --family qwen2.5          # seconds on a CPU
    python synth.py data --out data/synth --train 200 --val 50 --seed 0

synth data writes `synth_{det,ground,vqa,caption,cls,all}_{train,val}.jsonl` and `images/{split}_{i:05d}.png`.
"""

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import boxes
import data_prep
import model
import prompts
from common import UserError, add_debug_flag, run_cli, track


# -----------------------------------------------------------------------------
# A tiny random-init checkpoint (tests, the CPU demo): real Qwen-VL architecture, toy sizes, offline.

# Qwen's special tokens; each must map to exactly one id.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# The official templates' behaviour, trimmed to text + images: Qwen2.5-VL adds a default system prompt,
# Qwen3-VL does not.
CHAT_TEMPLATE = (  # no whitespace control: the only newlines are the ones Qwen writes
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' and DEFAULT_SYSTEM %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_CORPUS = (
    "You are a helpful assistant. Detect all objects of the following categories in the image and output "
    "one object per line as the corner points followed by the category. There are none. plane ship "
    "storage tank vehicle large small harbor bridge helicopter roundabout swimming pool tennis court "
    "basketball baseball diamond ground track field soccer ball airport golffield windmill dam chimney "
    "Where is the red plane in the top left corner? Is there a ship in the image? How many vehicles are "
    "there? Are there more ships than planes? Answer the question using a single word or phrase. yes no "
    "Describe the image. Classify the image from the following classes: forest farmland residential "
    "industrial desert river beach parking lot. A satellite image with several buildings near a road. "
    "bbox_2d label 0123456789 , . : ; ( ) [ ] { } \" ' - _ / \n"
)


def make_tiny(out_dir, family="qwen2.5", seed=0, hidden=64, layers=2, vision_hidden=64, vision_depth=2, head_dim=16,
              rope_theta=None, vision_head_dim=16, vision_pos_std=None):
    """Write a tiny random-init Qwen2.5-VL or Qwen3-VL checkpoint (config, safetensors, tokenizer trained here
    with `tokenizers`, chat template, image processor config) loadable by `load` and by
    transformers.AutoModelForImageTextToText offline. Returns the directory as a string.

    hidden / layers: width and depth of the language model; vision_hidden / vision_depth: the same for the
    vision tower. The defaults (64-wide, 2 layers each) are what the tests use: seconds per step on a CPU.
    head_dim: width of the language model's heads (a multiple of 16 dividing `hidden`; M-RoPE's sections are
    in Qwen's proportions, see below; vLLM's CPU kernels need >= 32). rope_theta: the text
    RoPE base (default Qwen's: 1e6 for Qwen2.5-VL, 5e6 for Qwen3-VL). vision_head_dim: width of the vision heads.
    What localises on a CPU in minutes (demo.sh, BENCHMARKS.md): Qwen3-VL, 128 x 4 with 32-wide heads and
    rope_theta 1e4, a 128 x 2 vision tower with 32-wide heads. With 16-wide heads and Qwen's theta, M-RoPE's
    width section gets no usable frequencies and the model cannot tell columns apart. vision_pos_std (Qwen3-VL):
    the std of the vision tower's learned absolute position embeddings at init (transformers': 0.02, ~1/20 of the
    patch features, so where a patch is reaches the language model only faintly until training grows it)."""
    if family not in model.COORDS:
        raise UserError(f"family must be one of {sorted(model.COORDS)}, got '{family}'")
    for name, v in (("hidden", hidden), ("vision_hidden", vision_hidden)):
        if v < 32 or v % 16:
            raise UserError(f"--{name.replace('_', '-')} must be a multiple of 16 and >= 32, got {v}")
    if head_dim < 16 or head_dim % 16 or hidden % head_dim:
        raise UserError(f"--head-dim must be a multiple of 16 that divides --hidden {hidden}, got {head_dim}")
    if vision_head_dim < 16 or vision_head_dim % 16 or vision_hidden % vision_head_dim:
        raise UserError(f"--vision-head-dim must be a multiple of 16 that divides --vision-hidden {vision_hidden}, "
                        f"got {vision_head_dim}")
    for name, v in (("layers", layers), ("vision_depth", vision_depth)):
        if v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, template = tiny_tokenizer(family)
    net, patch = tiny_model(family, tokenizer, seed, hidden, layers, vision_hidden, vision_depth, head_dim,
                            rope_theta, vision_head_dim, vision_pos_std)
    net.save_pretrained(out_dir)
    tiny_processor(tokenizer, template, family, patch).save_pretrained(out_dir)
    # Name the tokenizer class the real checkpoints use (it reads the same tokenizer.json), for other loaders.
    tc_path = out_dir / "tokenizer_config.json"
    tc_path.write_text(json.dumps({**json.loads(tc_path.read_text()), "tokenizer_class": "Qwen2Tokenizer"}, indent=2))
    return str(out_dir)


def tiny_tokenizer(family):
    """(tokenizer, chat template): byte-level BPE over a small corpus (the byte alphabet makes any text
    encodable) with Qwen's special tokens and pre-tokenizer split."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(model.QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_CORPUS] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=SPECIAL_TOKENS[1:], model_max_length=32768)
    template = CHAT_TEMPLATE.replace("DEFAULT_SYSTEM", "true" if family == "qwen2.5" else "false")
    tokenizer.chat_template = template
    return tokenizer, template


def tiny_model(family, tokenizer, seed, hidden, layers, vision_hidden, vision_depth, head_dim, rope_theta,
               vision_head_dim, vision_pos_std):
    """(random-init model, vision patch size): the real architecture at toy width and depth
    (docs/reference.md#qwen-vl-in-transformers)."""
    from transformers import AutoModelForImageTextToText

    vocab = len(tokenizer)
    special = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    ids = dict(image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
               vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"])
    # head_dim-wide text heads, 2 query heads per KV head; M-RoPE splits head_dim / 2 frequencies 2:3:3
    heads, vision_heads = hidden // head_dim, vision_hidden // vision_head_dim
    # M-RoPE sections (temporal, height, width frequencies) in Qwen's proportions: [16, 24, 24] of 64 for
    # Qwen2.5-VL, [24, 20, 20] for Qwen3-VL (where head_dim is a multiple of 32; else Qwen2.5-VL's)
    sections = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    if family == "qwen3" and head_dim % 32 == 0:
        sections = [3 * head_dim // 16, 5 * head_dim // 32, 5 * head_dim // 32]
    text = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=4096,
                bos_token_id=special["<|endoftext|>"], eos_token_id=special["<|im_end|>"],
                pad_token_id=special["<|endoftext|>"], tie_word_embeddings=True)
    if family == "qwen2.5":
        from transformers import Qwen2_5_VLConfig as Config

        text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta or 1e6, "mrope_section": sections}
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=vision_heads, out_hidden_size=hidden, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2, window_size=112, fullatt_block_indexes=[vision_depth - 1])
    else:
        from transformers import Qwen3VLConfig as Config

        text.update(head_dim=head_dim)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta or 5e6, "mrope_section": sections,
                                   "mrope_interleaved": True}
        vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                      num_heads=vision_heads, out_hidden_size=hidden, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Config(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    net = AutoModelForImageTextToText.from_config(config)
    if vision_pos_std is not None:
        if family != "qwen3":
            raise UserError("--vision-pos-std: only Qwen3-VL's vision tower has absolute position embeddings")
        with torch.no_grad():
            net.model.visual.pos_embed.weight.normal_(0.0, vision_pos_std)
    net.generation_config.eos_token_id = [special["<|im_end|>"], special["<|endoftext|>"]]
    net.generation_config.pad_token_id = special["<|endoftext|>"]
    return net, vision["patch_size"]


def tiny_processor(tokenizer, template, family, patch):
    """The PIL image processor with a small pixel budget (4..100 merged patches) so CPU steps stay fast."""
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as ipm

    factor = patch * 2
    image_processor = ipm.Qwen2VLImageProcessorPil(
        patch_size=patch, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 4 * factor * factor, "longest_edge": 100 * factor * factor})
    if family == "qwen3":  # Qwen3-VL normalises to [-1, 1]
        image_processor.image_mean, image_processor.image_std = [0.5] * 3, [0.5] * 3
    return model.Processor(tokenizer, image_processor, template, family)


# -----------------------------------------------------------------------------
# Synthetic data: a seeded, download-free remote-sensing-like dataset for the demo and the tests.
# 224 px images (8x8 tokens of 28 px for Qwen2.5-VL, 7x7 of 32 px for Qwen3-VL), textured ground of one of
# three scene types, 1-4 objects of four classes with distinct shapes and colours at random rotations.
# A localisation level for the CPU demo (--objects 1,1 --object-size 64,96 --ground-expr class): one large
# object per image and a prompt naming only its class, which a tiny model learns to find in minutes.

SYNTH_SIZE = 224
SYNTH_CLASSES = ["plane", "ship", "storage-tank", "vehicle"]
SYNTH_COLOURS = {"plane": ("white", (245, 245, 245)), "ship": ("red", (215, 35, 35)),
                 "storage-tank": ("purple", (150, 60, 210)), "vehicle": ("blue", (35, 75, 235))}
SYNTH_PLURAL = {"plane": "planes", "ship": "ships", "storage-tank": "storage tanks", "vehicle": "vehicles"}
SYNTH_GROUNDS = {"desert": ((196, 176, 128), "a desert"), "meadow": ((72, 128, 62), "a green meadow"),
                 "urban": ((118, 118, 124), "an urban area")}
SYNTH_SCENES = sorted(SYNTH_GROUNDS)
NUMBER_WORDS = ["no", "one", "two", "three", "four", "five", "six"]


def synth_ground(rng, scene):
    """(S, S, 3) uint8: base colour + coarse blotches + fine grain (+ roads for urban)."""
    S = SYNTH_SIZE
    coarse = Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32), mode="F").resize((S, S), Image.BILINEAR)
    img = np.array(SYNTH_GROUNDS[scene][0], np.float32) + 16 * np.asarray(coarse)[..., None] \
        + 6 * rng.normal(0, 1, (S, S, 1))
    if scene == "urban":  # a few darker roads
        for _ in range(2):
            p, w = int(rng.integers(20, S - 20)), int(rng.integers(6, 12))
            if rng.random() < 0.5:
                img[p:p + w] *= 0.6
            else:
                img[:, p:p + w] *= 0.6
    elif scene == "meadow":  # field stripes
        img[(np.arange(S) // 18) % 2 == 0] *= 0.9
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(pts, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def synth_shape(cls, rng):
    """(annotation half-extents (hl, hw), [(fill colour, local polygon or ('circle', r))], rotates)."""
    colour = SYNTH_COLOURS[cls][1]
    dark = tuple(int(v * 0.55) for v in colour)
    if cls == "plane":
        L = float(rng.uniform(44, 64))
        span = 0.9 * L
        parts = [(colour, _rect(-L / 2, -L / 14, L / 2, L / 14)),             # fuselage, nose along +x
                 (colour, [(-L / 12, -span / 2), (L / 8, -span / 2), (L / 5, 0), (L / 8, span / 2), (-L / 12, span / 2)]),
                 (colour, _rect(-L / 2, -span / 5, -L / 2 + L / 8, span / 5))]  # tail
        return (L / 2, span / 2), parts, True
    if cls == "ship":
        L = float(rng.uniform(40, 60))
        W = L / 3.2
        hull = [(-L / 2, -W / 2), (L / 4, -W / 2), (L / 2, 0), (L / 4, W / 2), (-L / 2, W / 2)]
        return (L / 2, W / 2), [(colour, hull), (dark, _rect(-L / 3, -W / 4, 0, W / 4))], True
    if cls == "storage-tank":
        r = float(rng.uniform(12, 20))
        return (r, r), [(colour, ("circle", r)), (dark, ("circle", 0.55 * r))], False
    L = float(rng.uniform(20, 28))
    return (L / 2, L / 4), [(colour, _rect(-L / 2, -L / 4, L / 2, L / 4)), (dark, _rect(L / 8, -L / 5, L / 3, L / 5))], True


def synth_region(cx, cy):
    S = SYNTH_SIZE
    row = "top" if cy < S / 3 else "bottom" if cy > 2 * S / 3 else ""
    col = "left" if cx < S / 3 else "right" if cx > 2 * S / 3 else ""
    return f"{row} {col}".strip() or "center"


def scale_shape(extent, parts, k):
    """synth_shape's extent and parts scaled by k about the object's centre."""
    scaled = [(fill, ("circle", shape[1] * k) if shape[0] == "circle" else [(x * k, y * k) for x, y in shape])
              for fill, shape in parts]
    return (extent[0] * k, extent[1] * k), scaled


def synth_image(rng, n_objects=(1, 4), size=None):
    """(image array, scene, objects [{"poly", "label", "difficult", "region"}]). n_objects: (least, most) objects
    drawn; size: (least, most) longer side of an object's box in pixels, or None for each class's own sizes."""
    S = SYNTH_SIZE
    scene = SYNTH_SCENES[int(rng.integers(len(SYNTH_SCENES)))]
    img = Image.fromarray(synth_ground(rng, scene))
    draw = ImageDraw.Draw(img)
    objects, placed = [], []  # placed: (cx, cy, radius)
    for _ in range(int(rng.integers(n_objects[0], n_objects[1] + 1))):
        cls = SYNTH_CLASSES[int(rng.integers(len(SYNTH_CLASSES)))]
        (hl, hw), parts, rotates = synth_shape(cls, rng)
        if size is not None:  # the box's longer side (2 * hl) drawn uniformly from size
            (hl, hw), parts = scale_shape((hl, hw), parts, float(rng.uniform(*size)) / (2 * hl))
        radius = math.hypot(hl, hw)
        for _try in range(50):  # rejection sampling: inside the image, not touching another object
            angle = float(rng.uniform(0, math.pi)) if rotates else 0.0
            cx, cy = (float(v) for v in rng.uniform(radius + 2, S - radius - 2, 2))
            if all(math.hypot(cx - x, cy - y) > radius + r + 3 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        for fill, shape in parts:
            if shape[0] == "circle":
                r = shape[1]
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            else:
                draw.polygon(_place(shape, cx, cy, angle), fill=fill)
        corners = _place(_rect(-hl, -hw, hl, hw), cx, cy, angle)
        objects.append({"poly": [round(v, 2) for p in corners for v in p], "label": cls, "difficult": 0,
                        "region": synth_region(cx, cy)})
    return np.asarray(img), scene, objects


def count_phrase(counts):
    """{'plane': 2, 'ship': 1} -> 'two planes and a ship'."""
    parts = [("a " + boxes.class_to_text(c) if n == 1 else f"{NUMBER_WORDS[n]} {SYNTH_PLURAL[c]}")
             for c, n in sorted(counts.items()) if n]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def synth_records(i, split, img_rel, scene, objects, rng, ground_expr="region", preset="default"):
    """All records of one synthetic image: det, ground (when some object is unambiguous), vqa x3, caption, cls.
    ground_expr: "region" names colour, class and region ("the red ship at the top left"); "class" names only the
    class ("the ship"), for objects alone of their class in the image. preset: the --prompts wording."""
    S, rid = SYNTH_SIZE, f"{split}_{i:05d}"
    objs = [{k: o[k] for k in ("poly", "label", "difficult")} for o in objects]
    counts = Counter(o["label"] for o in objects)
    style = prompts.answer_style(preset)
    recs = {"det": [data_prep.make_record(f"det_{rid}", "det", "synth", [img_rel],
                                prompts.det_prompt(SYNTH_CLASSES, preset=preset, train=split == "train"),
                                data_prep.det_answer(objs, S, S, preset=preset),
                                {"width": S, "height": S, "objects": objs, "classes": SYNTH_CLASSES,
                                 "box_format": "poly", "scene": scene, **style})]}
    # ground: an object the expression names alone: (class, region) unique in the image, or with
    # ground_expr "class" its class unique
    key = (lambda o: (o["label"], o["region"])) if ground_expr == "region" else (lambda o: o["label"])
    keys = Counter(key(o) for o in objects)
    unique = [o for o in objects if keys[key(o)] == 1]
    recs["ground"] = []
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        where = "in the center" if o["region"] == "center" else f"at the {o['region']}"
        expr = (f"the {SYNTH_COLOURS[o['label']][0]} {boxes.class_to_text(o['label'])} {where}"
                if ground_expr == "region" else f"the {boxes.class_to_text(o['label'])}")
        obj = {"poly": boxes.hbox_to_poly(boxes.poly_to_hbox(o["poly"])), "label": o["label"], "difficult": 0,
               "expression": expr}
        recs["ground"].append(data_prep.make_record(f"ground_{rid}", "ground", "synth", [img_rel],
                                          prompts.ground_prompt(expr, preset=preset),
                                          boxes.render_answer([obj], S, S, box_format="hbox", with_label=False,
                                                              style="rscovlm" if preset == "rscovlm" else "plain"),
                                          {"width": S, "height": S, "objects": [obj], "box_format": "hbox", **style}))
    # vqa: presence, count, comparison
    c1 = SYNTH_CLASSES[int(rng.integers(4))]
    present = [c for c in SYNTH_CLASSES if counts[c]]
    c2 = present[int(rng.integers(len(present)))] if rng.random() < 0.8 else SYNTH_CLASSES[int(rng.integers(4))]
    a, b = (SYNTH_CLASSES[j] for j in rng.permutation(4)[:2])
    qa = [("presence", f"Is there a {boxes.class_to_text(c1)} in the image?", "yes" if counts[c1] else "no"),
          ("count", f"How many {SYNTH_PLURAL[c2]} are there in the image?", str(counts[c2])),
          ("comp", f"Are there more {SYNTH_PLURAL[a]} than {SYNTH_PLURAL[b]}?", "yes" if counts[a] > counts[b] else "no")]
    recs["vqa"] = [data_prep.make_record(f"vqa_{rid}_{t}", "vqa", "synth", [img_rel], prompts.vqa_prompt(q, preset=preset), ans,
                               {"answer": ans, "type": t})
                   for t, q, ans in qa]
    # caption: several references
    ground, what = SYNTH_GROUNDS[scene][1], count_phrase(counts)
    n = sum(counts.values())
    refs = [f"An aerial image of {ground} with {what}.",
            f"There {'is' if n == 1 else 'are'} {what} in {ground}.",
            f"{what[0].upper() + what[1:]} seen from above in {ground}."]
    recs["caption"] = [data_prep.make_record(f"caption_{rid}", "caption", "synth", [img_rel], prompts.caption_prompt(preset), refs[0],
                                   {"references": refs})]
    recs["cls"] = [data_prep.make_record(f"cls_{rid}", "cls", "synth", [img_rel], prompts.cls_prompt(SYNTH_SCENES, preset), scene,
                               {"label": scene, "classes": SYNTH_SCENES})]
    return recs


def run_synth(args):
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    summary, written = data_prep.new_summary(), []
    counter = data_prep.answer_token_counter(args)
    for split_code, (split, n) in enumerate([("train", args.train), ("val", args.val)]):
        by_task = {t: [] for t in ("det", "ground", "vqa", "caption", "cls")}
        for i in track(range(n), f"synth {split}"):
            # one generator per image: an image does not change when --train/--val counts change
            rng = np.random.default_rng([args.seed, split_code, i])
            arr, scene, objects = synth_image(rng, args.objects, args.object_size)
            img_path = out / "images" / f"{split}_{i:05d}.png"
            if not img_path.exists():
                data_prep.save_image_atomic(Image.fromarray(arr), img_path)
            for t, recs in synth_records(i, split, f"images/{img_path.name}", scene, objects, rng,
                                         args.ground_expr, args.prompts).items():
                by_task[t] += recs
            summary["counts"][f"objects {split}"] += len(objects)
        for t, recs in by_task.items():
            data_prep.write_jsonl(out / f"synth_{t}_{split}.jsonl", recs)
            written.append(out / f"synth_{t}_{split}.jsonl")
            summary["counts"][f"records {t} {split}"] = len(recs)
        data_prep.write_jsonl(out / f"synth_all_{split}.jsonl", [r for recs in by_task.values() for r in recs])
        written.append(out / f"synth_all_{split}.jsonl")
        if n:
            data_prep.report_answer_tokens(summary, split, by_task["det"] + by_task["ground"], counter, args.answer_budget)
    data_prep.write_info(out, "synth", args, summary)
    data_prep.print_summary(f"synth (seed {args.seed})", summary, written)
    return summary

# -----------------------------------------------------------------------------
# CLI


def int_range(flag, lo, hi):
    """argparse type for 'MIN,MAX' (or one number) with lo <= MIN <= MAX <= hi."""
    def parse(text):
        try:
            v = [int(x) for x in text.split(",")]
        except ValueError:
            v = []
        if len(v) == 1:
            v = v * 2
        if len(v) != 2 or not lo <= v[0] <= v[1] <= hi:
            raise argparse.ArgumentTypeError(f"expected MIN,MAX with {lo} <= MIN <= MAX <= {hi}, got '{text}'")
        return tuple(v)
    parse.__name__ = flag
    return parse


def build_parser():
    p = argparse.ArgumentParser(description="rscovlm's offline stand-ins: a tiny random-init Qwen-VL checkpoint and "
                                            "synthetic remote-sensing data")
    add_debug_flag(p)
    sub = p.add_subparsers(dest="what", required=True)
    sp = sub.add_parser("model", help="write a tiny random-init checkpoint (seconds on a CPU)")
    sp.add_argument("dir", help="output checkpoint folder")
    sp.add_argument("--family", default="qwen2.5", choices=sorted(model.COORDS), help="model family")
    sp.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    sp.add_argument("--hidden", type=int, default=64, help="language model width (multiple of 16; the tests use 64)")
    sp.add_argument("--layers", type=int, default=2, help="language model decoder layers")
    sp.add_argument("--vision-hidden", type=int, default=64, help="vision tower width (multiple of 16)")
    sp.add_argument("--vision-depth", type=int, default=2, help="vision tower blocks")
    sp.add_argument("--head-dim", type=int, default=16, help="language model head width (multiple of 16 dividing --hidden)")
    sp.add_argument("--rope-theta", type=float, default=None, help="text RoPE base (default: 1e6 for qwen2.5, 5e6 for qwen3)")
    sp.add_argument("--vision-head-dim", type=int, default=16, help="vision head width (multiple of 16 dividing --vision-hidden)")
    sp.add_argument("--vision-pos-std", type=float, default=None, help="Qwen3-VL: init std of the vision position embeddings (default 0.02)")
    add_debug_flag(sp)

    sp = sub.add_parser("data", help="procedural remote-sensing-like data (det, ground, vqa, caption, cls)")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--train", type=int, default=200, help="number of training images")
    sp.add_argument("--val", type=int, default=50, help="number of validation images")
    sp.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    sp.add_argument("--objects", type=int_range("--objects", 1, 6), default=(1, 4), metavar="MIN,MAX",
                    help="objects per image, drawn uniformly from MIN..MAX (the demo's localisation level: 1,1)")
    sp.add_argument("--object-size", type=int_range("--object-size", 8, SYNTH_SIZE // 2), default=None,
                    metavar="MIN,MAX", help="longer side of each object's box in pixels, drawn uniformly; default: "
                                            "each class's own sizes (20-64 px; the demo's localisation level: 64,96)")
    sp.add_argument("--ground-expr", default="region", choices=["region", "class"],
                    help='grounding expressions: region = colour, class and region ("the red ship at the top left"); '
                         'class = the class alone ("the ship"), for objects alone of their class in the image')
    data_prep.add_answer_budget_flags(sp)
    data_prep.add_prompts_flag(sp)
    add_debug_flag(sp)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.what == "model":
        print(make_tiny(args.dir, args.family, args.seed, hidden=args.hidden, layers=args.layers,
                        vision_hidden=args.vision_hidden, vision_depth=args.vision_depth, head_dim=args.head_dim,
                        rope_theta=args.rope_theta, vision_head_dim=args.vision_head_dim,
                        vision_pos_std=args.vision_pos_std))
        return None
    if args.answer_budget < 1:
        raise UserError(f"--answer-budget {args.answer_budget}: give a number of tokens >= 1")
    return run_synth(args)


if __name__ == "__main__":
    run_cli(main)

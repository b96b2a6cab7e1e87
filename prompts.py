"""
prompts.py — every wording rscovlm writes into a record, in one place, and nothing else (no torch: the
converters build records without loading a model). "<image>" marks where an image goes.

Three presets (`--prompts` of every converter): `default`, this project's wording (RSCoVLM / GeoChat practice);
`rscovlm`, RSCoVLM's own plain-text wording and answer conventions, to reproduce or evaluate its checkpoints;
`rscovlm-json`, RSCoVLM's JSON-form detection and grounding. docs/prompts.md shows each one. The answer text of
det/ground records is not written here but rendered from meta when a record is tokenized (boxes.render_answer,
boxes.render_rscovlm), in the coordinates of the model being trained.
"""

import boxes


# The default preset is this project's (RSCoVLM / GeoChat practice); --prompts rscovlm is RSCoVLM's own.

DET_PROMPT = "<image>\nDetect all objects of the following categories in the image: {categories}. {fmt}"
DET_FORMAT = {
    "poly": "Output one object per line as its four corner points x1,y1,x2,y2,x3,y3,x4,y4 followed by its category.",
    "hbox": "Output one object per line as its box x1,y1,x2,y2 followed by its category.",
    "rbox": "Output one object per line as its rotated box cx,cy,w,h,angle followed by its category.",
}
GROUND_PROMPT = '<image>\nLocate the object described as "{expression}". {fmt}'
GROUND_FORMAT = {
    "poly": "Output its four corner points x1,y1,x2,y2,x3,y3,x4,y4.",
    "hbox": "Output its box x1,y1,x2,y2.",
    "rbox": "Output its rotated box cx,cy,w,h,angle.",
}
VQA_SUFFIX = "Answer the question using a single word or phrase."  # GeoChat-Bench
CAPTION_PROMPT = "<image>\nDescribe this remote sensing image in one sentence."
CLS_PROMPT = "<image>\nClassify the image from the following classes: {classes}. Answer in one word or a short phrase."
# --prompts rscovlm: RSCoVLM's own wording (VisionXLab/RSCoVLM, plain-text form, its default): detection and
# grounding from rscovlm/training/data/dense_det_dataset.py and refgeo_dataset.py (and eval/data/dense_det.py,
# geoground.py), VQA from eval/data/geochat_bench.py and vrsbench.py, scene classification from
# eval/data/scene_cls.py, captions from eval/data/data_prepare/format_image_caption.py. Its image comes
# right before the text (its chat data strips the '\n' after <image>); det/ground get a system turn per box
# form, and their answers RSCoVLM's conventions (meta.answer_style "rscovlm", boxes.render_rscovlm).
PRESETS = ("default", "rscovlm", "rscovlm-json")  # rscovlm-json: RSCoVLM's JSON-form det/ground text, else as rscovlm
RSCOVLM_SYSTEM = {
    "hbox": "As an AI assistant, you specialize in accurate image object detection, delivering coordinates in "
            "plain text format 'x1,y1,x2,y2 object'.",
    "rbox": "As an AI assistant, you specialize in accurate oriented object detection, delivering coordinates in "
            "plain text format 'x,y,w,h,a object'.",
    "poly": "As an AI assistant, you specialize in accurate oriented object detection, delivering coordinates of "
            "the polygon vertices in plain text format 'x1,y1,x2,y2,x3,y3,x4,y4 object'.",
}
RSCOVLM_FIND = "<image>find the {}"  # det: the categories (evaluation adds '.'); ground: the expression
RSCOVLM_VQA_SUFFIX = "Answer the question using a single word or a short phrase."  # not GeoChat's "or phrase."
RSCOVLM_CAPTION_PROMPT = "<image>Describe the image"
RSCOVLM_CLS_ASK = "<image>Classify the image within one of the given classes:"
RSCOVLM_CLS_PROMPT = RSCOVLM_CLS_ASK + "{classes}."  # joined by ','
# RSCoVLM's JSON form (the main templates of dense_det_dataset.py / refgeo_dataset.py, as eval/data/dense_det.py and
# geoground.py ask; training also draws paraphrases at random, which no fixed record can hold). hbox: no system
# turn. "corrdinates" is RSCoVLM's spelling.
RSCOVLM_JSON_SYSTEM = {
    "rbox": "You are an AI assistant specializing in oriented object detection. Represent objects with: center "
            "(x,y), width (w), height (h), and rotation angle.",
    "poly": "You are an AI assistant specializing in oriented object detection. Represent objects with quadrant "
            "bbox: the corrdinates of each vertices of the oriented bounding boxes in clock-wise order.",
}
RSCOVLM_JSON_DET = {
    "hbox": "<image>Locate every item from the category list in the image and output the coordinates in JSON "
            "format. The category set includes {}.",
    "rbox": "<image>Locate every item from the category list in the image and output the oriented bbox coordinates "
            "in JSON format. The category set includes {}.",
}
RSCOVLM_JSON_GROUND = {"hbox": "<image>Locate the {}, output the bbox coordinates using JSON format",
                       "rbox": "<image>Locate the {}, output the oriented bbox coordinates using JSON format"}
# Referring benchmarks RSCoVLM asks in their own words, without a system turn (eval/data/vrsbench.py:57-63,
# geochat_bench.py:80-96)
RSCOVLM_REFERRING = {
    ("vrsbench", "rscovlm"): "<image>find the {}, delivering coordinates in plain text format 'x1,y1,x2,y2 object'",
    ("vrsbench", "rscovlm-json"): RSCOVLM_JSON_GROUND["hbox"],
    ("geochat", "rscovlm"): "<image>Find all {}, delivering each oriented coordinates in plain text format "
                            "'x1,y1,x2,y2,x3,y3,x4,y4 object'",
    ("geochat", "rscovlm-json"): "<image>Represent all {} with quadrant bbox coordinates in a JSON format, represent "
                                 "objects with quadrant bbox: the corrdinates of each",
}
# The text "<image>" inside a prompt (not an image): RSCoVLM passes VHM's questions with the data's "<image>\n"
# left in them (eval/data/vhm_bench.py:25-30), after the image. Records write it as this tag; the chat rendering
# turns it back into the text "<image>" (_to_template_messages).
IMAGE_TAG_TEXT = "<image/>"


def _check_preset(preset):
    if preset not in PRESETS:
        raise ValueError(f"unknown prompt preset {preset!r}: expected one of {PRESETS}")


def is_rscovlm(preset):
    """RSCoVLM's wording (plain or JSON form): vqa, cls and caption prompts are the same in both."""
    _check_preset(preset)
    return preset != "default"


def det_prompt(classes, box_format="poly", preset="default", train=True):
    """Categories as text (hyphens as spaces, lower case), alphabetical. The default preset returns the user
    text; rscovlm returns [system turn, user turn] (make_record takes either). train=False: the evaluation
    wording (RSCoVLM's plain form ends with a period; the default preset and the JSON form have one wording)."""
    _check_preset(preset)
    if preset == "rscovlm":
        cats = ", ".join(sorted(boxes.rscovlm_label(c) for c in classes))
        return [{"role": "system", "content": RSCOVLM_SYSTEM[box_format]},
                {"role": "user", "content": RSCOVLM_FIND.format(cats) + ("" if train else ".")}]
    if preset == "rscovlm-json":
        cats = ", ".join(sorted(boxes.rscovlm_label(c) for c in classes))
        return _json_turns(box_format, RSCOVLM_JSON_DET["hbox" if box_format == "hbox" else "rbox"].format(cats))
    return DET_PROMPT.format(categories=", ".join(sorted(boxes.class_to_text(c) for c in classes)),
                             fmt=DET_FORMAT[box_format])


def _json_turns(box_format, user):
    """RSCoVLM's JSON form: the user turn alone for hbox, after the form's system turn otherwise."""
    system = [{"role": "system", "content": RSCOVLM_JSON_SYSTEM[box_format]}] if box_format != "hbox" else []
    return system + [{"role": "user", "content": user}]


def ground_prompt(expression, box_format="hbox", preset="default"):
    """The user text (default) or [system turn, user turn] (rscovlm: the same wording to train and evaluate)."""
    _check_preset(preset)
    if preset == "rscovlm":
        return [{"role": "system", "content": RSCOVLM_SYSTEM[box_format]},
                {"role": "user", "content": RSCOVLM_FIND.format(expression.strip())}]
    if preset == "rscovlm-json":
        return _json_turns(box_format, RSCOVLM_JSON_GROUND["hbox" if box_format == "hbox" else "rbox"]
                           .format(expression.strip()))
    return GROUND_PROMPT.format(expression=expression.strip(), fmt=GROUND_FORMAT[box_format])


def referring_prompt(benchmark, question, preset="default"):
    """VRSBench (hbox) or GeoChat-Bench (polygons, every target) referring: the default preset's grounding prompt,
    or the words RSCoVLM's evaluation asks these two benchmarks with (RSCOVLM_REFERRING)."""
    _check_preset(preset)
    if preset == "default":
        return ground_prompt(question, "hbox" if benchmark == "vrsbench" else "poly")
    return RSCOVLM_REFERRING[(benchmark, preset)].format(question.strip())


def vqa_prompt(question, suffix=True, preset="default"):
    if is_rscovlm(preset):
        return "<image>" + question.strip() + (" " + RSCOVLM_VQA_SUFFIX if suffix else "")
    return "<image>\n" + question.strip() + (" " + VQA_SUFFIX if suffix else "")


def cls_prompt(classes, preset="default"):
    """rscovlm: give the class folder names as they are (RSCoVLM lists and scores those)."""
    if is_rscovlm(preset):
        return RSCOVLM_CLS_PROMPT.format(classes=",".join(classes))
    return CLS_PROMPT.format(classes=", ".join(classes))


def caption_prompt(preset="default"):
    return RSCOVLM_CAPTION_PROMPT if is_rscovlm(preset) else CAPTION_PROMPT


def answer_style(preset):
    """meta.answer_style of det/ground (and zoom) records under a preset (the default preset leaves it out:
    plain): "rscovlm" or "rscovlm-json" (boxes.render_answer styles)."""
    return {"answer_style": preset} if is_rscovlm(preset) else {}


# MME-RealWorld, RSCoVLM's multiple-choice wording
MME_CHOICES = " The choices are listed below: \n"
MME_SUFFIX = ("Select the best answer to the above multiple-choice question based on the image. Respond with only "
              "the letter (A, B, C, D, or E) of the correct option.\nThe best answer is:")


def mme_prompt(text, choices):
    """RSCoVLM's MME-RealWorld question: text, the choices one per line, the letter instruction."""
    return text + MME_CHOICES + "".join(c + "\n" for c in choices) + MME_SUFFIX


# The zoom-in chain's tool (RSCoVLM's wording, checked character by character; see "Zoom-in chain" below)
ZOOM_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "image_zoom_in", "description": "Zoom in to the region of interest '
    "on the given image. Input the bounding box of the region of interest and return the zoomed-in image to help to "
    'focus and view more clearly.", "parameters": {"name": "bbox", "type": "list[int]", "description": "The bounding '
    "box of the region of interest as an array [x1, y1, x2, y2], where (x1, y1) and (x2, y2) indicate the positions' "
    'absolute coordinates of the left top and right down corners, respectively.", "required": true}}}\n</tools>\n\n'
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
ZOOM_ASK = "\nZoom in to the region of interest and answer the question."  # appended to the question
ZOOM_REPLY = "Here's the zoomed-in image. You can complete your task now."  # after the crop's <image>

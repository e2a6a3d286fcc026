"""HPSv3 (MizzenAI/HPSv3) ported onto transformers' Qwen2-VL, without the `hpsv3` package.

The `hpsv3` package pins transformers==4.45.2 and imports torchvision, so it cannot sit beside this
project's stack. This module rebuilds its inference path on the transformers 5 classes:

* backbone: `Qwen2VLModel` (vision tower + language model) of `Qwen/Qwen2-VL-7B-Instruct`, with the
  `<|Reward|>` token added to the tokenizer and the vocabulary resized to the tokenizer's length
  (the checkpoint holds the resized embedding, so only the base *config*, *tokenizer* and *image
  processor* are read from the base repository: its weights are never downloaded);
* head (`rm_head`, fp32): Linear(hidden, 1024) - ReLU - Dropout(0.05) - Linear(1024, 16) - ReLU -
  Linear(16, 2), applied to the last hidden state at the `<|Reward|>` token; the two outputs are a
  mean and an uncertainty, and the score is the mean, ``output[:, 0]``;
* position ids: the original calls the *language model* with ``position_ids=None``, which in
  transformers 4.45 means plain sequential positions ``0..L-1`` on all three M-RoPE sections (the
  image-grid 3-D positions that Qwen2-VL normally uses are *not* used). We pass those sequential
  positions explicitly, so transformers 5's own 3-D position computation is bypassed;
* images: converted to RGB (RGBA on white), resized with PIL bicubic by qwen-vl-utils'
  ``smart_resize`` to min_pixels = max_pixels = 200,704 (256 * 28 * 28; a 1024x1024 image becomes
  448x448), then the Qwen2-VL image processor (rescale, CLIP mean/std, 14-px patches, 2x2 merge);
* text: the original's chat message (image first, then ``INSTRUCTION.format(text_prompt=...)`` +
  the reward-token suffix) as Qwen2-VL-Instruct's chat template renders it (default system turn,
  generation prompt), with the image's `<|image_pad|>` expanded as the processor does,
  right-padded (padding after the reward token cannot reach it through the causal mask, so scores
  do not depend on the batch);
* dtype: bf16 on CUDA (as the original), fp32 on CPU, head always fp32.

Checkpoint: ``HPSv3.safetensors`` of ``MizzenAI/HPSv3`` is a full state dict of the reward model.
Its keys may be in transformers 4.45's layout (``visual.*``, ``model.layers.*``) or 4.52+'s
(``model.visual.*``, ``model.language_model.*``); :func:`convert_hpsv3_state_dict` maps either onto
transformers 5's layout.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from cdmctl.errors import UserError
from cdmctl.metrics.base import MetricSpec, register

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MODEL = "MizzenAI/HPSv3"
DEFAULT_FILENAME = "HPSv3.safetensors"
DEFAULT_BASE = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
PIXELS = 256 * 28 * 28  # 200,704: the original's min_pixels = max_pixels
IMAGE_FACTOR = 28
MAX_RATIO = 200

# The original's prompt (hpsv3/dataset/data_collator_qwen.py), kept verbatim: trailing spaces and
# blank lines are part of what the model was trained on.
INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best. 

**Visual Quality:**  
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

**Text Alignment:**  
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""

PROMPT_WITH_REWARD_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def user_text(prompt: str) -> str:
    """The text part of the user message for one prompt (instruction + reward-token suffix)."""
    return INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_REWARD_TOKEN


def chat_text(prompt: str, image_tokens: int = 1) -> str:
    """The chat the original sends, rendered as Qwen2-VL-Instruct's chat template renders it.

    One user turn, the image first and then the text, the default system turn, and the generation
    prompt. `image_tokens` copies of `<|image_pad|>` stand for the image (the processor's expansion:
    one per 2x2 group of 14-px patches). Written out rather than rendered by the processor: the
    transformers 5 Qwen2-VL *processor* needs torchvision (its video half), the tokenizer and the
    image processor do not.
    """
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|>" + IMAGE_PAD * image_tokens + "<|vision_end|>"
        + user_text(prompt) + "<|im_end|>\n<|im_start|>assistant\n"
    )


# --------------------------------------------------------------------------------------------
# images


def smart_resize(
    height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = PIXELS, max_pixels: int = PIXELS
) -> tuple[int, int]:
    """qwen-vl-utils' resize rule: sides multiples of `factor`, pixel count within [min, max]."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"aspect ratio must be below {MAX_RATIO}, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as qwen-vl-utils makes it: an RGBA image is composited on white, others converted."""
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    return image.convert("RGB")


def prepare_image(image: Image.Image, min_pixels: int = PIXELS, max_pixels: int = PIXELS) -> Image.Image:
    """RGB, then a PIL bicubic resize to the smart_resize size (200,704 pixels by default)."""
    image = to_rgb(image)
    height, width = smart_resize(image.height, image.width, IMAGE_FACTOR, min_pixels, max_pixels)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------
# checkpoint keys

_HEAD_PREFIX = "rm_head."


def rename_hpsv3_key(key: str) -> str:
    """Map one HPSv3 checkpoint key onto transformers 5's Qwen2VLForConditionalGeneration layout.

    transformers 4.45: ``visual.X`` / ``model.X`` (the text model) / ``lm_head.X`` / ``rm_head.X``;
    transformers 4.52+ and 5: ``model.visual.X`` / ``model.language_model.X``. Keys already in the
    new layout are returned unchanged; a ``module.`` prefix (DDP) is dropped.
    """
    key = key.removeprefix("module.")
    if key.startswith("visual."):
        return "model." + key
    if key.startswith("model.") and not re.match(r"model\.(language_model|visual)\.", key):
        return "model.language_model." + key[len("model.") :]
    return key


def convert_hpsv3_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename every key with :func:`rename_hpsv3_key`; two keys landing on one name is an error."""
    if isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]  # a .pth holding {"model": state_dict}
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        new = rename_hpsv3_key(key)
        if new in out:
            raise ValueError(f"HPSv3 checkpoint: keys collide on '{new}' after renaming")
        out[new] = value
    return out


def split_hpsv3_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(Qwen2VLModel state dict, head state dict) from a converted checkpoint; lm_head is dropped.

    Raises ValueError naming what is missing or not understood.
    """
    backbone, head, unknown = {}, {}, []
    for key, value in state_dict.items():
        if key.startswith("model."):
            backbone[key[len("model.") :]] = value
        elif key.startswith(_HEAD_PREFIX):
            head[key[len(_HEAD_PREFIX) :]] = value
        elif key.startswith("lm_head."):
            continue  # the language-model head is not used for scoring
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"HPSv3 checkpoint: keys not understood: {unknown[:5]}")
    expected_head = {f"{i}.{p}" for i in (0, 3, 5) for p in ("weight", "bias")}
    if set(head) != expected_head:
        raise ValueError(f"HPSv3 checkpoint: reward head keys {sorted(head)} != {sorted(expected_head)}")
    if "language_model.embed_tokens.weight" not in backbone:
        raise ValueError("HPSv3 checkpoint: no language_model.embed_tokens.weight")
    return backbone, head


# --------------------------------------------------------------------------------------------
# model


def build_reward_head(hidden_size: int, output_dim: int = 2):
    """The original's "ranknet" head, in fp32 (dropout is inert at eval)."""
    from torch import nn

    return nn.Sequential(
        nn.Linear(hidden_size, 1024),
        nn.ReLU(),
        nn.Dropout(0.05),
        nn.Linear(1024, 16),
        nn.ReLU(),
        nn.Linear(16, output_dim),
    ).float()


def prepare_tokenizer(tokenizer) -> int:
    """Right padding and the `<|Reward|>` special token; returns the token's id."""
    tokenizer.padding_side = "right"
    if REWARD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    token_id = tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer did not accept {REWARD_TOKEN} as a token")
    return int(token_id)


class HPSv3Scorer:
    """Scores (image, prompt) pairs with an HPSv3 reward model. Higher is better.

    `backbone` is a transformers `Qwen2VLModel`, `head` the reward head (fp32), `tokenizer` the
    Qwen2-VL tokenizer with `<|Reward|>` added (see :func:`prepare_tokenizer`), `image_processor`
    a Qwen2-VL image processor (the PIL one works without torchvision).
    """

    def __init__(
        self,
        backbone,
        head,
        tokenizer,
        image_processor,
        reward_token_id: int,
        device: str = "cpu",
        batch_size: int = 4,
        min_pixels: int = PIXELS,
        max_pixels: int = PIXELS,
    ):
        self.backbone = backbone.eval()
        self.head = head.eval()
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.reward_token_id = reward_token_id
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, Any]:
        """Model inputs for one batch (on the scorer's device), right-padded."""
        pixels = [prepare_image(im, self.min_pixels, self.max_pixels) for im in images]
        vision = self.image_processor(images=pixels, return_tensors="pt")
        merge = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        counts = [int(thw.prod()) // merge for thw in vision["image_grid_thw"]]
        texts = [chat_text(p, n) for p, n in zip(prompts, counts)]
        text = self.tokenizer(texts, padding=True, return_tensors="pt")
        batch = {
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "pixel_values": vision["pixel_values"],
            "image_grid_thw": vision["image_grid_thw"],
        }
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Head outputs (B, 2) in fp32 for a processed batch."""
        import torch

        input_ids = batch["input_ids"]
        n, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, -1).expand(3, n, -1)
        dtype = next(self.backbone.parameters()).dtype
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"].to(dtype),
            image_grid_thw=batch["image_grid_thw"],
            position_ids=positions,
            use_cache=False,
        )
        hidden = out.last_hidden_state
        mask = input_ids == self.reward_token_id
        counts = mask.sum(dim=1)
        if not bool((counts == 1).all()):
            raise RuntimeError(f"expected one {REWARD_TOKEN} token per sequence, found {counts.tolist()}")
        return self.head(hidden[mask].float())

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                out = self.forward(self.inputs(images[start:stop], prompts[start:stop]))
                scores.extend(out[:, 0].tolist())
        return scores


def load_state_dict_file(path: str, device: str = "cpu") -> dict[str, Any]:
    """A .safetensors file (read straight onto `device`), or a torch pickle of tensors (optionally
    under "model", read on the CPU)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device=str(device))
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) else state


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}' for hpsv3", "use auto, bf16, fp16 or fp32")
    return table[dtype]


def build_hpsv3_scorer(
    state_dict: Mapping[str, Any],
    config,
    tokenizer,
    image_processor,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 4,
    min_pixels: int = PIXELS,
    max_pixels: int = PIXELS,
) -> HPSv3Scorer:
    """An HPSv3Scorer from a checkpoint state dict (either key layout), a Qwen2VLConfig, the base
    model's tokenizer and image processor.

    The backbone is built without allocating weights (accelerate's init_empty_weights) and the
    checkpoint tensors are assigned in; only buffers (rotary frequencies) are computed.
    """
    import copy

    import torch
    from accelerate import init_empty_weights
    from transformers import Qwen2VLModel

    reward_id = prepare_tokenizer(tokenizer)
    backbone_sd, head_sd = split_hpsv3_state_dict(convert_hpsv3_state_dict(state_dict))
    vocab = int(backbone_sd["language_model.embed_tokens.weight"].shape[0])
    if len(tokenizer) != vocab or reward_id >= vocab:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens ({REWARD_TOKEN} = {reward_id}) but the "
            f"checkpoint's embedding has {vocab} rows: wrong base tokenizer for this checkpoint"
        )
    config = copy.deepcopy(config)
    config.text_config.vocab_size = vocab
    torch_dtype = resolve_dtype(dtype, device)
    with init_empty_weights():
        backbone = Qwen2VLModel._from_config(config, attn_implementation="sdpa")
    backbone.load_state_dict(backbone_sd, strict=True, assign=True)
    backbone.to(device=device, dtype=torch_dtype)
    head = build_reward_head(config.text_config.hidden_size, int(head_sd["5.weight"].shape[0]))
    head.load_state_dict(head_sd, strict=True)
    head.to(device=device, dtype=torch.float32)
    return HPSv3Scorer(
        backbone, head, tokenizer, image_processor, reward_id, device, batch_size, min_pixels, max_pixels
    )


def make_hpsv3(
    device: str = "cpu",
    model: str = DEFAULT_MODEL,
    filename: str = DEFAULT_FILENAME,
    base: str = DEFAULT_BASE,
    dtype: str = "auto",
    batch_size: int = 4,
    max_pixels: int = PIXELS,
    min_pixels: int = PIXELS,
) -> HPSv3Scorer:
    """Factory: `model` is a Hub repo (or a local folder / file), `base` the Qwen2-VL repo or folder."""
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    if os.path.isfile(model):
        path = model
    elif os.path.isdir(model):
        path = os.path.join(model, filename)
    else:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(model, filename)
    tokenizer = AutoTokenizer.from_pretrained(base)
    image_processor = AutoImageProcessor.from_pretrained(base)
    config = AutoConfig.from_pretrained(base)
    return build_hpsv3_scorer(
        load_state_dict_file(path, device), config, tokenizer, image_processor, device, dtype, batch_size,
        min_pixels, max_pixels,
    )


def hub_weights(options: dict[str, Any]) -> list[str]:
    """What make_hpsv3 downloads: the reward file (unless `model` is local) and the Qwen2-VL base."""
    model = str(options["model"])
    return [model if os.path.exists(model) else f"{model}/{options['filename']}", str(options["base"])]


SPEC = register(
    MetricSpec(
        name="hpsv3",
        description="HPSv3 human-preference score (Qwen2-VL-7B reward model; mean of its output)",
        extra="hpsv3",
        requires=("transformers", "safetensors", "accelerate", "huggingface_hub"),
        factory=make_hpsv3,
        weights=hub_weights,
        options={
            "model": DEFAULT_MODEL,
            "filename": DEFAULT_FILENAME,
            "base": DEFAULT_BASE,
            "dtype": "auto",
            "batch_size": 4,
            "max_pixels": PIXELS,
            "min_pixels": PIXELS,
        },
    )
)

"""ImageReward v1.0 (THUDM/ImageReward) ported onto transformers' BLIP classes.

The `image-reward` package pins timm 0.6.13, imports transformers helpers that transformers 5
removed, and needs torchvision; this module rebuilds its scoring path instead:

* image: BLIP's ViT-L/16 at 224 px (24 blocks, width 1024, LayerNorm eps 1e-6, exact GELU) as a
  transformers ``BlipVisionModel``; all its output tokens (after the final LayerNorm) are the
  cross-attention memory;
* text: BLIP's "MED" BERT-base encoder with a cross-attention block in every layer
  (``med_config.json``: 12 layers, width 768, vocab 30524) as a transformers ``BlipTextModel``
  (built with ``is_decoder=True`` so the cross-attention exists, run bidirectionally);
* the prompt is tokenised by ``bert-base-uncased`` (with BLIP's added ``[DEC]`` / ``[ENC]``),
  padded and truncated to 35 tokens; the feature is the text encoder's output at ``[CLS]``;
* head: Linear 768-1024-128-64-16-1 with dropout and *no* activation between them (the ReLUs are
  commented out in the original);
* score = ``(r - 0.16717362830052426) / 1.0333394966054072``; higher is better, about N(0, 1) on
  the authors' data;
* preprocessing as the original's torchvision pipeline, in PIL: shorter side to 224 (bicubic),
  centre crop 224, RGB, /255, CLIP mean and std;
* fp32 throughout, as the original.

:func:`convert_imagereward_state_dict` maps ``ImageReward.pt`` (keys ``blip.visual_encoder.*``,
``blip.text_encoder.*``, ``mlp.layers.*``) onto this layout and, with :func:`check_coverage`,
refuses a checkpoint that leaves any parameter unset or holds a key it does not understand
(the original loads with ``strict=False``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from cdmctl.metrics.base import MetricSpec, register

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_MODEL = "THUDM/ImageReward"
DEFAULT_CHECKPOINT = "ImageReward.pt"
DEFAULT_MED_CONFIG = "med_config.json"
DEFAULT_TOKENIZER = "google-bert/bert-base-uncased"
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BLIP's create_vit('large', 224): ViT-L/16, mlp_ratio 4, qkv bias, LayerNorm eps 1e-6, nn.GELU.
VIT_L16_224 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": IMAGE_SIZE,
    "patch_size": 16,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "attention_dropout": 0.0,
}

# BLIP's configs/med_config.json (what THUDM/ImageReward ships as med_config.json).
MED_CONFIG = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}

# Checkpoint keys ImageReward's score never reads (the original's load ignores them too).
IGNORED_PREFIXES = (
    "blip.vision_proj.",
    "blip.text_proj.",
    "blip.text_encoder.pooler.",
    "blip.visual_encoder_m.",
    "blip.text_encoder_m.",
    "blip.vision_proj_m.",
    "blip.text_proj_m.",
    "blip.text_decoder.",
    "blip.itm_head.",
)
IGNORED_KEYS = (
    "blip.text_encoder.embeddings.position_ids",
    "blip.temp",
    "blip.image_queue",
    "blip.text_queue",
    "blip.idx_queue",
    "blip.queue_ptr",
)

_VISION_RULES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]


def rename_imagereward_key(key: str) -> str | None:
    """The port's name for one original key; None for a key the score does not use.

    Raises KeyError for a key that is neither mapped nor known to be unused.
    """
    key = key.removeprefix("module.")
    if key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES):
        return None
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder.") :]
        for pattern, target in _VISION_RULES:
            if re.fullmatch(pattern, rest):
                return "vision." + re.sub(pattern, target, rest)
        raise KeyError(key)
    if key.startswith("blip.text_encoder."):
        return "text." + key[len("blip.text_encoder.") :]
    match = re.fullmatch(r"mlp\.layers\.(\d+)\.(weight|bias)", key)
    if match:
        return f"mlp.{match.group(1)}.{match.group(2)}"
    raise KeyError(key)


def convert_imagereward_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Rename an ImageReward.pt state dict onto the port; raises ValueError on unknown keys."""
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    out: dict[str, Any] = {}
    unknown = []
    for key, value in state_dict.items():
        try:
            new = rename_imagereward_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if new is not None:
            if new in out:
                raise ValueError(f"ImageReward checkpoint: keys collide on '{new}'")
            out[new] = value
    if unknown:
        raise ValueError(f"ImageReward checkpoint: {len(unknown)} keys not understood, e.g. {unknown[:5]}")
    return out


def check_coverage(converted: Mapping[str, Any], model) -> None:
    """Every parameter/persistent buffer of `model` is in `converted` and nothing else is."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(converted))
    extra = sorted(set(converted) - expected)
    if missing or extra:
        raise ValueError(
            f"ImageReward checkpoint does not cover the model: {len(missing)} missing (e.g. {missing[:5]}), "
            f"{len(extra)} unexpected (e.g. {extra[:5]})"
        )


# --------------------------------------------------------------------------------------------
# model


def text_config_from_med(med: Mapping[str, Any], vision_width: int):
    """A BlipTextConfig equal to BLIP's BertModel built from med_config.json."""
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", True):
        raise ValueError("med_config.json without add_cross_attention is not ImageReward's text encoder")
    return BlipTextConfig(
        vocab_size=med["vocab_size"],
        hidden_size=med["hidden_size"],
        encoder_hidden_size=vision_width,  # BLIP sets encoder_width = vision width
        intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"],
        num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"],
        hidden_act=med.get("hidden_act", "gelu"),
        layer_norm_eps=med.get("layer_norm_eps", 1e-12),
        hidden_dropout_prob=med.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=med.get("attention_probs_dropout_prob", 0.1),
        pad_token_id=med.get("pad_token_id", 0),
        is_decoder=True,  # builds the cross-attention blocks; forward runs with is_decoder=False
    )


def build_imagereward_model(vision_config, text_config):
    """nn.ModuleDict(vision=BlipVisionModel, text=BlipTextModel, mlp=the 5-Linear head)."""
    from torch import nn
    from transformers import BlipTextModel, BlipVisionModel

    width = text_config.hidden_size
    mlp = nn.Sequential(
        nn.Linear(width, 1024),
        nn.Dropout(0.2),
        nn.Linear(1024, 128),
        nn.Dropout(0.2),
        nn.Linear(128, 64),
        nn.Dropout(0.1),
        nn.Linear(64, 16),
        nn.Linear(16, 1),
    )
    return nn.ModuleDict(
        {
            "vision": BlipVisionModel(vision_config),
            "text": BlipTextModel(text_config, add_pooling_layer=False),
            "mlp": mlp,
        }
    ).eval()


def raw_reward(model, pixel_values, input_ids, attention_mask) -> torch.Tensor:
    """The MLP output r (B,) before normalisation, as ImageReward.score computes it."""
    import torch

    image_embeds = model["vision"](pixel_values=pixel_values).last_hidden_state
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    text = model["text"](
        input_ids=input_ids,
        attention_mask=attention_mask,
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        is_decoder=False,
    )
    features = text.last_hidden_state[:, 0, :].float()
    return model["mlp"](features).squeeze(-1)


def prepare_tokenizer(tokenizer):
    """BLIP's init_tokenizer additions: bos `[DEC]`, additional special `[ENC]`."""
    if "[DEC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def preprocess(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """(3, size, size) float32: torchvision's Resize(size, bicubic) + CenterCrop(size) + RGB +
    ToTensor + Normalize(CLIP), written with PIL and numpy."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left = round((new_w - size) / 2.0)
    top = round((new_h - size) / 2.0)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


class ImageRewardScorer:
    """Scores (image, prompt) pairs with ImageReward v1.0. Higher is better."""

    def __init__(self, model, tokenizer, device: str = "cpu", batch_size: int = 8):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = device
        self.batch_size = max(1, int(batch_size))
        self.image_size = int(model["vision"].config.image_size)

    def tokens(self, prompts: Sequence[str]) -> dict[str, Any]:
        return self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.stack([preprocess(im, self.image_size) for im in images]))

    def raw(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        text = self.tokens(prompts)
        return raw_reward(
            self.model,
            self.pixels(images).to(self.device),
            text["input_ids"].to(self.device),
            text["attention_mask"].to(self.device),
        )

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                r = self.raw(images[start:stop], prompts[start:stop])
                out.extend(((r - REWARD_MEAN) / REWARD_STD).tolist())
        return out


def build_imagereward_scorer(
    state_dict: Mapping[str, Any],
    med_config: Mapping[str, Any],
    tokenizer,
    device: str = "cpu",
    vision_config: Mapping[str, Any] | None = None,
    batch_size: int = 8,
) -> ImageRewardScorer:
    """An ImageRewardScorer from an ImageReward.pt state dict, med_config.json's dict and a BERT
    tokenizer. `vision_config` (BlipVisionConfig keyword arguments) defaults to ViT-L/16 at 224."""
    from transformers import BlipVisionConfig

    vision = BlipVisionConfig(**dict(vision_config or VIT_L16_224))
    model = build_imagereward_model(vision, text_config_from_med(med_config, vision.hidden_size))
    converted = convert_imagereward_state_dict(state_dict)
    check_coverage(converted, model)
    model.load_state_dict(converted, strict=True)
    model.to(device)
    tokenizer = prepare_tokenizer(tokenizer)
    if len(tokenizer) > model["text"].config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, the text encoder {model['text'].config.vocab_size}"
        )
    return ImageRewardScorer(model, tokenizer, device, batch_size)


def _fetch(repo: str, filename: str) -> str:
    if os.path.isfile(filename):
        return filename
    if os.path.isdir(repo):
        return os.path.join(repo, filename)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo, filename)


def make_imagereward(
    device: str = "cpu",
    model: str = DEFAULT_MODEL,
    checkpoint: str = DEFAULT_CHECKPOINT,
    med_config: str = DEFAULT_MED_CONFIG,
    tokenizer: str = DEFAULT_TOKENIZER,
    batch_size: int = 8,
) -> ImageRewardScorer:
    """Factory: `model` is the Hub repo (or a local folder); `checkpoint`/`med_config` file names
    in it (or local paths); `tokenizer` the BERT tokenizer BLIP uses."""
    import torch
    from transformers import AutoTokenizer

    state = torch.load(_fetch(model, checkpoint), map_location="cpu", weights_only=True)
    with open(_fetch(model, med_config), encoding="utf-8") as fh:
        med = json.load(fh)
    return build_imagereward_scorer(
        state, med, AutoTokenizer.from_pretrained(tokenizer), device, batch_size=batch_size
    )


def hub_weights(options: dict[str, Any]) -> list[str]:
    """What make_imagereward fetches (as `_fetch` resolves it) and the tokenizer repo."""
    model = str(options["model"])
    files = [name if os.path.isfile(name) or os.path.isdir(model) else f"{model}/{name}"
             for name in (str(options["checkpoint"]), str(options["med_config"]))]  # fmt: skip
    return [*files, str(options["tokenizer"])]


SPEC = register(
    MetricSpec(
        name="imagereward",
        description="ImageReward v1.0 (BLIP ViT-L + MED text encoder + MLP), normalised reward",
        extra="imagereward",
        requires=("transformers", "huggingface_hub"),
        factory=make_imagereward,
        weights=hub_weights,
        options={
            "model": DEFAULT_MODEL,
            "checkpoint": DEFAULT_CHECKPOINT,
            "med_config": DEFAULT_MED_CONFIG,
            "tokenizer": DEFAULT_TOKENIZER,
            "batch_size": 8,
        },
    )
)

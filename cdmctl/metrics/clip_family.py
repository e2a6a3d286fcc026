"""CLIP-family metrics on transformers: PickScore, CLIPScore (ViT-H-14), HPSv2.1 and the LAION aesthetic score.

All four run on `transformers.CLIPModel` (no open_clip, so no torchvision): they live in the `eval`
extra, which the core already satisfies. Every model option takes a hub id or a local folder; file
options (HPSv2.1 checkpoint, aesthetic MLP) take a local path or `owner/repo/path/in/repo`.

What each one reports (and where it differs from the paper's own code):

- `pickscore`: `exp(logit_scale) * cos(image, text)` with `yuvalkirstain/PickScore_v1` and the
  processor of `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (resize shortest side to 224 bicubic, centre
  crop 224). Same as the PickScore reference code. Typical values about 18-24.
- `clipscore`: `100 * max(cos(image, text), 0)` with CLIP ViT-H-14 (laion2B); the torchmetrics
  convention. Hessel et al. (2021) report `2.5 * max(cos, 0)` with ViT-B/32, and many distillation
  papers report `100 * cos` with ViT-L/14 or ViT-g: numbers are comparable only with the same model
  and scaling.
- `hpsv2`: HPS v2.1 (`xswu/HPSv2` `HPS_v2.1_compressed.pt`, an open_clip ViT-H-14) converted to a
  CLIPModel; raw cosine (about 0.25-0.35; the HPSv2 benchmark tables print 100x this). Preprocessing
  as HPSv2's open_clip transform: resize the longest side to 224 bicubic, pad with black to a square,
  normalise with the OpenAI CLIP mean/std, no centre crop. Text goes through the transformers CLIP
  tokenizer (open_clip's tokenizer also runs ftfy on the text; prompts with broken unicode may differ).
- `aesthetic`: LAION improved aesthetic predictor: the MLP `sac+logos+ava1-l14-linearMSE.pth`
  (768-1024-128-64-16-1, dropouts inactive at eval) on the L2-normalised CLIP ViT-L/14 image
  embedding (`openai/clip-vit-large-patch14`, transformers' copy of OpenAI's weights); about 1-10.
  Default MLP file: the copy TRL's DDPO example loads (`trl-lib/ddpo-aesthetic-predictor`,
  `aesthetic-model.pth`); point `aesthetic.mlp` at the original file to use it instead.

Images go through transformers' PIL image processor (not the torchvision "fast" one, whose antialiased
torch resize gives slightly different pixels), as the reference implementations did.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from cdmctl.errors import UserError
from cdmctl.metrics.base import MetricSpec, register

CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE = "yuvalkirstain/PickScore_v1"
HPS_V21 = "xswu/HPSv2/HPS_v2.1_compressed.pt"
CLIP_L = "openai/clip-vit-large-patch14"
AESTHETIC_MLP = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_TOKENS = 77


# ----------------------------------------------------------------------------- loading


def hub_file(spec: str) -> str:
    """A local file path as given, else `owner/repo/path/in/repo` downloaded (and cached) from the hub."""
    path = Path(str(spec)).expanduser()
    if path.is_file():
        return str(path)
    parts = str(spec).split("/")
    if len(parts) < 3 or not all(parts):
        raise UserError(f"{spec} is neither a file nor a hub file", "give a local path or owner/repo/file.pth")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:]))
    except Exception as exc:  # offline, gated, missing: one clear line instead of a traceback
        raise UserError(f"could not fetch {spec} from the hub ({type(exc).__name__})", "check the network or pass a local file") from exc


def _image_processor(source: str) -> Any:
    """transformers' PIL CLIP image processor (named CLIPImageProcessorPil from transformers 5 on)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor.from_pretrained(source)


def _tokenizer(source: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _clip_model(source: str, device: str) -> Any:
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(source).eval().to(device)


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im if im.mode == "RGB" else im.convert("RGB") for im in images]


class ClipEmbedder:
    """Projected, L2-normalised CLIP embeddings of images [B, 3, H, W] and prompts, as [B, D] fp32."""

    def __init__(self, model: Any, tokenizer: Any, image_processor: Any | None, device: str):
        self.model, self.tokenizer, self.image_processor, self.device = model, tokenizer, image_processor, device

    def pixels(self, images: Sequence[Image.Image]) -> Any:
        batch = self.image_processor(images=_rgb(images), return_tensors="pt")
        return batch["pixel_values"]

    def images(self, pixel_values: Any) -> Any:
        import torch

        with torch.inference_mode():
            pooled = self.model.vision_model(pixel_values=pixel_values.to(self.device)).pooler_output
            return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    def texts(self, prompts: Sequence[str], padding: str | bool = True) -> Any:
        import torch

        tokens = self.tokenizer(
            list(prompts), padding=padding, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            pooled = self.model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).pooler_output
            return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def cosine(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Any:
        """[B] cosine similarity of each image with its own prompt."""
        _check_pairs(images, prompts)
        return (self.images(self.pixels(images)) * self.texts(prompts)).sum(-1)


def _check_pairs(images: Sequence[Any], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")


# ----------------------------------------------------------------------------- PickScore and CLIPScore


class PickScore:
    """exp(logit_scale) * cos(image, prompt) with the PickScore CLIP-H model (Kirstain et al. 2023)."""

    def __init__(self, device: str, model: str = PICKSCORE, processor: str = CLIP_H):
        clip = _clip_model(model, device)
        self.embed = ClipEmbedder(clip, _tokenizer(processor), _image_processor(processor), device)
        self.scale = float(clip.logit_scale.detach().exp())

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return (self.scale * self.embed.cosine(images, prompts)).tolist()


class ClipScore:
    """100 * max(cos(image, prompt), 0) with CLIP ViT-H-14 (the torchmetrics CLIPScore scaling)."""

    def __init__(self, device: str, model: str = CLIP_H):
        self.embed = ClipEmbedder(_clip_model(model, device), _tokenizer(model), _image_processor(model), device)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return (100.0 * self.embed.cosine(images, prompts).clamp(min=0)).tolist()


# ----------------------------------------------------------------------------- HPSv2.1


def openclip_to_transformers(state: dict[str, Any]) -> dict[str, Any]:
    """Rename an open_clip CLIP state dict (OpenAI layout: resblocks with fused in_proj) to CLIPModel keys.

    Raises ValueError on a key it does not know, so that a checkpoint of another layout is never
    loaded half-way. Projections are transposed (open_clip computes x @ proj, CLIPModel x @ W.T).
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key == "attn_mask" or key.endswith(".attn_mask"):
            continue  # the causal mask buffer; CLIPModel builds its own
        tower, rest = ("vision_model", key[len("visual.") :]) if key.startswith("visual.") else ("text_model", key)
        block = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", rest)
        if block:
            prefix = f"{tower}.encoder.layers.{block.group(1)}."
            out.update(_block_keys(prefix, block.group(2), value))
        elif (tower, rest) in _TOP_LEVEL:
            name, transpose = _TOP_LEVEL[(tower, rest)]
            out[name] = value.t().contiguous() if transpose else value
        else:
            raise ValueError(f"unexpected open_clip key {key!r}")
    return out


_TOP_LEVEL = {
    ("text_model", "token_embedding.weight"): ("text_model.embeddings.token_embedding.weight", False),
    ("text_model", "positional_embedding"): ("text_model.embeddings.position_embedding.weight", False),
    ("text_model", "ln_final.weight"): ("text_model.final_layer_norm.weight", False),
    ("text_model", "ln_final.bias"): ("text_model.final_layer_norm.bias", False),
    ("text_model", "text_projection"): ("text_projection.weight", True),
    ("text_model", "logit_scale"): ("logit_scale", False),
    ("vision_model", "class_embedding"): ("vision_model.embeddings.class_embedding", False),
    ("vision_model", "conv1.weight"): ("vision_model.embeddings.patch_embedding.weight", False),
    ("vision_model", "positional_embedding"): ("vision_model.embeddings.position_embedding.weight", False),
    ("vision_model", "ln_pre.weight"): ("vision_model.pre_layrnorm.weight", False),
    ("vision_model", "ln_pre.bias"): ("vision_model.pre_layrnorm.bias", False),
    ("vision_model", "ln_post.weight"): ("vision_model.post_layernorm.weight", False),
    ("vision_model", "ln_post.bias"): ("vision_model.post_layernorm.bias", False),
    ("vision_model", "proj"): ("visual_projection.weight", True),
}
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _block_keys(prefix: str, name: str, value: Any) -> dict[str, Any]:
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        q, k, v = value.chunk(3, dim=0)
        kind = name.rsplit("_", 1)[1]
        return {f"{prefix}self_attn.{p}_proj.{kind}": t.contiguous() for p, t in zip("qkv", (q, k, v))}
    module, _, param = name.rpartition(".")
    if module not in _BLOCK:
        raise ValueError(f"unexpected open_clip block key {name!r}")
    return {f"{prefix}{_BLOCK[module]}.{param}": value}


def load_openclip_checkpoint(checkpoint: str, base: str, device: str) -> Any:
    """A CLIPModel with `base`'s config (hub id or folder) and the open_clip weights in `checkpoint`."""
    import torch
    from accelerate import init_empty_weights
    from transformers import CLIPConfig, CLIPModel

    raw = torch.load(hub_file(checkpoint), map_location="cpu", weights_only=True)
    state = openclip_to_transformers(raw.get("state_dict", raw) if isinstance(raw, dict) else raw)
    with init_empty_weights():  # parameters on the meta device (no 1B-parameter random init); buffers real
        model = CLIPModel(CLIPConfig.from_pretrained(base))
    expected = set(model.state_dict()) - {n for n, _ in model.named_buffers()}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"{checkpoint} does not fit {base}: missing {missing[:3]}, unexpected {extra[:3]}", "check hpsv2.base")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)
    return model.eval().to(device)


def hps_pixels(images: Sequence[Image.Image], size: int) -> Any:
    """HPSv2's open_clip eval transform: longest side to `size` (bicubic), black pad to square, normalise."""
    import numpy as np
    import torch

    batch = []
    for image in _rgb(images):
        scale = size / max(image.size)
        w, h = (round(d * scale) for d in image.size)
        canvas = Image.new("RGB", (size, size))
        canvas.paste(image.resize((w, h), Image.BICUBIC), ((size - w) // 2, (size - h) // 2))
        batch.append(np.asarray(canvas, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
    return (x - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


class HPSv2:
    """HPS v2.1 (Wu et al. 2023): raw cosine of the fine-tuned ViT-H-14 embeddings."""

    def __init__(self, device: str, checkpoint: str = HPS_V21, base: str = CLIP_H):
        model = load_openclip_checkpoint(checkpoint, base, device)
        self.embed = ClipEmbedder(model, _tokenizer(base), None, device)
        self.size = int(model.config.vision_config.image_size)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        _check_pairs(images, prompts)
        image = self.embed.images(hps_pixels(images, self.size))
        text = self.embed.texts(prompts, padding="max_length")  # open_clip pads every prompt to 77 tokens
        return (image * text).sum(-1).tolist()


# ----------------------------------------------------------------------------- LAION aesthetic


def aesthetic_mlp(in_dim: int = 768) -> Any:
    """The LAION improved-aesthetic-predictor head; parameter names match its `layers.N` state dict."""
    from torch import nn

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(in_dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
            )  # fmt: skip

        def forward(self, x: Any) -> Any:
            return self.layers(x)

    return MLP()


class Aesthetic:
    """LAION aesthetic score: MLP on the L2-normalised CLIP ViT-L/14 image embedding (prompt unused)."""

    def __init__(self, device: str, model: str = CLIP_L, mlp: str = AESTHETIC_MLP):
        import torch

        self.embed = ClipEmbedder(_clip_model(model, device), None, _image_processor(model), device)
        state = torch.load(hub_file(mlp), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        self.mlp = aesthetic_mlp(state["layers.0.weight"].shape[1])
        self.mlp.load_state_dict({k: v.float() for k, v in state.items()})
        self.mlp.eval().to(device)

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        import torch

        _check_pairs(images, prompts)
        with torch.inference_mode():
            return self.mlp(self.embed.images(self.embed.pixels(images))).squeeze(-1).tolist()


register(MetricSpec(
    name="pickscore", description="PickScore: exp(logit_scale) * cos, CLIP-H fine-tuned on Pick-a-Pic",
    extra="eval", requires=("transformers",), factory=PickScore,
    options={"model": PICKSCORE, "processor": CLIP_H}, weights=lambda o: [o["model"], o["processor"]],
))  # fmt: skip
register(MetricSpec(
    name="clipscore", description="CLIPScore: 100 * max(cos, 0) with CLIP ViT-H-14 (laion2B)",
    extra="eval", requires=("transformers",), factory=ClipScore, options={"model": CLIP_H},
    weights=lambda o: [o["model"]],
))  # fmt: skip
register(MetricSpec(
    name="hpsv2", description="HPS v2.1: cosine of the HPS-tuned ViT-H-14 (open_clip weights on CLIPModel)",
    extra="eval", requires=("transformers", "accelerate"), factory=HPSv2,
    options={"checkpoint": HPS_V21, "base": CLIP_H}, weights=lambda o: [o["checkpoint"], o["base"]],
))  # fmt: skip
register(MetricSpec(
    name="aesthetic", description="LAION aesthetic predictor (sac+logos+ava1 linear MSE) on CLIP ViT-L/14",
    extra="eval", requires=("transformers",), factory=Aesthetic,
    options={"model": CLIP_L, "mlp": AESTHETIC_MLP}, weights=lambda o: [o["model"], o["mlp"]],
))  # fmt: skip

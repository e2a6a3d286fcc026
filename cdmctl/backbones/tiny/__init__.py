"""Tiny test pipelines: random-weight pipeline folders of the real diffusers classes, and `builtin:` models.

The families' own writers are the modules beside this one (longcat, flux2_klein, qwenimage, zimage; SD3's is
here), and `toy` is a pure-torch backbone for engine tests.

    python -m cdmctl.backbones.tiny FAMILY DIR     # e.g. `zimage runs/tiny-zimage`; families: TINY_WRITERS

`write_tiny_sd3` builds a StableDiffusion3Pipeline whose every part is the real class (SD3 transformer,
two CLIP text encoders with projection, a T5 encoder, AutoencoderKL, flow-matching scheduler) at toy
sizes, with tokenizers written locally (no hub access), and saves it with `save_pretrained`. The
folder loads with `DiffusionPipeline.from_pretrained` exactly like a user's model, so every code path
that loads real checkpoints runs on it. `ensure_builtin` caches such folders under a name
(`builtin:tiny-sd3` in presets and on the command line).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from cdmctl.errors import UserError

# Bump when the written folders change, so that stale caches are rebuilt instead of reused.
FACTORY_VERSION = "1"

# Words that get their own token, so that ordinary prompts tokenize into few pieces; any other ASCII
# text still tokenizes (CLIP: byte-level pieces; T5: single characters).
_WORDS = """
a an the of and or with in on at to from by for over under near behind above below beside into is are
this that it its his her their my your our one two three four five many some small big large tiny huge
tall short long old new young little red orange yellow green blue purple pink brown black white gray
grey gold silver dark light bright colorful cat cats dog dogs bird birds fish horse cow lion tiger bear
fox wolf rabbit mouse owl duck frog panda monkey elephant giraffe zebra dragon robot man woman men women
person people child children boy girl baby king queen knight wizard astronaut chef doctor teacher
house home castle city town street road bridge tower building room kitchen garden park forest tree trees
flower flowers grass mountain mountains hill river lake sea ocean beach island desert sky cloud clouds
sun moon star stars rain snow fire water ice stone rock wood sand field farm village car bus train boat
ship plane bicycle apple banana orange cake pizza coffee tea cup bottle table chair bed book books lamp
window door wall sign hat shirt dress shoes glasses painting photo photograph picture portrait
illustration drawing sketch render art style digital oil watercolor anime cartoon realistic detailed
high quality resolution closeup view night day morning evening sunset sunrise winter summer spring autumn
saying says hello world holding sitting standing walking running flying eating drinking reading playing
wearing looking smiling cute beautiful happy sad funny scary magic ancient modern futuristic
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table used by byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style byte-level BPE: every byte (alone and word-final), plus merges spelling `_WORDS`."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    known = set(tokens)
    merges: list[str] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge, merged = f"{current} {piece}", current + piece
            if merged not in known:
                merges.append(merge)
                tokens.append(merged)
                known.add(merged)
            current = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_clip_tokenizer_files(folder: Path, model_max_length: int = 77) -> int:
    """vocab.json + merges.txt + tokenizer_config.json (77 tokens, as SD3's CLIP tokenizers); returns vocab size."""
    vocab, merges = _clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "model_max_length": model_max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(vocab)


def _write_t5_tokenizer_files(folder: Path) -> int:
    """A T5-layout Unigram tokenizer.json (pad 0, eos 1, unk 2; pieces for ASCII characters and `_WORDS`)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import Unigram

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -10.0) for c in range(33, 127)]
    pieces += [("▁" + w, -1.0) for w in _WORDS]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config = {
        "model_max_length": 512,
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 0,
        "additional_special_tokens": [],
        "tokenizer_class": "T5Tokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return len(pieces)


def _tiny_sd3_pipeline(resolution: int, transformer_config: dict | None = None, clip_length: int = 77,
                       shift: float = 3.0):  # fmt: skip
    """Assemble the tiny StableDiffusion3Pipeline; weights come from torch's (already seeded) global RNG.

    `transformer_config` overrides SD3Transformer2DModel arguments (e.g. a deeper, wider toy); `clip_length`
    is the CLIP tokenizers' model_max_length (SD3: 77; shorter makes a cheaper toy); `shift` the scheduler's
    time shift (SD3: 3.0).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    vae_block_channels = (8, 16)
    vae_scale_factor = 2 ** (len(vae_block_channels) - 1)
    with tempfile.TemporaryDirectory(prefix="cdmctl-tok-") as tmp:
        clip_vocab = _write_clip_tokenizer_files(Path(tmp, "clip"), clip_length)
        t5_vocab = _write_t5_tokenizer_files(Path(tmp, "t5"))
        tokenizer = CLIPTokenizer.from_pretrained(Path(tmp, "clip"))
        tokenizer_2 = CLIPTokenizer.from_pretrained(Path(tmp, "clip"))
        tokenizer_3 = T5TokenizerFast.from_pretrained(Path(tmp, "t5"))

    # Real SD3: CLIP-L (768) + CLIP-G (1280) hidden states are zero-padded to T5's 4096 = joint_attention_dim,
    # and the two CLIP projections (768 + 1280) make the pooled 2048. Same structure, toy widths.
    def clip(hidden: int, act: str):
        config = CLIPTextConfig(
            vocab_size=clip_vocab, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=32,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, hidden_act=act,
            bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
        )  # fmt: skip
        return CLIPTextModelWithProjection(config).eval()

    text_encoder, text_encoder_2 = clip(8, "quick_gelu"), clip(16, "gelu")
    t5_config = T5Config(
        vocab_size=t5_vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    text_encoder_3 = T5EncoderModel(t5_config).eval()
    transformer_args = dict(
        sample_size=resolution // vae_scale_factor, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=48,
    )  # fmt: skip
    transformer = SD3Transformer2DModel(**{**transformer_args, **(transformer_config or {})})
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=vae_block_channels, layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=resolution, scaling_factor=1.5305,
        shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )  # fmt: skip


def write_tiny_sd3(folder: str | Path, seed: int = 0, resolution: int = 32, transformer_config: dict | None = None,
                   clip_length: int = 77, shift: float = 3.0) -> Path:  # fmt: skip
    """Write a tiny random-weight SD3 pipeline folder (about 1 MB) and return its path.

    Deterministic given `seed` (the global torch RNG is left as it was). `resolution` is the default
    image size the pipeline generates at (transformer `sample_size` = resolution / 2); any multiple of
    4 pixels up to 192 works at sampling time. `transformer_config` (SD3Transformer2DModel arguments),
    `clip_length` (CLIP tokens) and `shift` (the scheduler's time shift) change the defaults, e.g. for the
    proving ground's trained toy teacher.
    """
    import torch

    if resolution % 4 or not 4 <= resolution <= 192:
        raise UserError(f"tiny-sd3 resolution {resolution} is not supported", "use a multiple of 4 between 4 and 192")
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _tiny_sd3_pipeline(resolution, transformer_config, clip_length, shift)
    pipe.save_pretrained(folder, safe_serialization=True)
    # Keep the plain BPE files next to tokenizer.json too, as real SD3 folders do (and older
    # transformers' slow CLIPTokenizer need them).
    vocab, merges = _clip_vocab_and_merges()
    for sub in ("tokenizer", "tokenizer_2"):
        (folder / sub / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (folder / sub / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


# name -> builder(folder) that writes the model into `folder`. Plugins add their own (the proving ground's
# trained toy teacher is `builtin:toy-sd3`) with `register_builtin`. A builder may carry a `digest()`
# attribute whose value joins the cache key (shipped files that change without a FACTORY_VERSION bump).
BUILTINS: dict[str, Callable[[Path], object]] = {
    "tiny-sd3": lambda folder: write_tiny_sd3(folder, seed=0),
    "tiny-longcat": lambda folder: _tiny_writer("longcat")(folder),
    "tiny-flux2-klein": lambda folder: _tiny_writer("flux2-klein")(folder),
    "tiny-zimage": lambda folder: _tiny_writer("zimage")(folder),
    "tiny-qwenimage": lambda folder: _tiny_writer("qwenimage")(folder),
}

# family -> writer(folder) of a tiny random-weight pipeline of that family, or its "module:function" path.
TINY_WRITERS: dict[str, str | Callable[[Path], object]] = {
    "sd3": write_tiny_sd3,
    "longcat": "cdmctl.backbones.tiny.longcat:write_tiny_longcat",
    "flux2-klein": "cdmctl.backbones.tiny.flux2_klein:write_tiny_flux2_klein",
    "zimage": "cdmctl.backbones.tiny.zimage:write_tiny_zimage",
    "qwenimage": "cdmctl.backbones.tiny.qwenimage:write_tiny_qwenimage",
}


def _tiny_writer(family: str) -> Callable[[Path], object]:
    if family not in TINY_WRITERS:
        raise UserError(f"no tiny pipeline for family '{family}'", f"use one of: {', '.join(sorted(TINY_WRITERS))}")
    writer = TINY_WRITERS[family]
    if isinstance(writer, str):
        import importlib

        module, _, name = writer.partition(":")
        writer = getattr(importlib.import_module(module), name)
    return writer


def write_tiny(family: str, folder: str | Path) -> Path:
    """Write the tiny random-weight pipeline of `family` into `folder` (new or empty) and return it."""
    writer = _tiny_writer(family)
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder} exists and is not an empty folder", "choose a new folder")
    writer(folder)
    return folder


def register_builtin(name: str, builder: Callable[[Path], object]) -> None:
    """Make `builtin:<name>` resolve to a folder that `builder(folder)` writes (once, then cached)."""
    BUILTINS[name] = builder


def cache_root() -> Path:
    """Where built-in models are cached: `$CDMCTL_CACHE`, else `~/.cache/cdmctl`."""
    return Path(os.environ.get("CDMCTL_CACHE") or Path.home() / ".cache" / "cdmctl")


def _cache_key(name: str) -> str:
    import diffusers
    import transformers

    # Library major.minor versions are in the key because saved configs and tokenizer files follow them.
    libs = "-".join(".".join(v.__version__.split(".")[:2]) for v in (diffusers, transformers))
    digest = getattr(BUILTINS.get(name), "digest", None)
    return f"{name}-v{FACTORY_VERSION}-{libs}" + (f"-{digest()}" if digest else "")


def ensure_builtin(name: str) -> Path:
    """Path of the built-in model `name`, building it on first use.

    The folder is written under a temporary name and renamed when complete, so that an interrupted or
    concurrent build never leaves a half-written model where a complete one is expected.
    """
    if name not in BUILTINS:
        from cdmctl.plugins import load_plugins

        load_plugins()  # a plugin may provide it
    if name not in BUILTINS:
        known = ", ".join(f"builtin:{n}" for n in sorted(BUILTINS))
        raise UserError(f"unknown built-in model 'builtin:{name}'", f"use one of: {known}")
    root = cache_root() / "builtin"
    final = root / _cache_key(name)
    if (final / "model_index.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        BUILTINS[name](tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "model_index.json").is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> int:
    """`python -m cdmctl.backbones.tiny FAMILY DIR`: write a tiny pipeline for smoke tests; exit 2 on a bad input."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m cdmctl.backbones.tiny",
        description="Write a tiny random-weight diffusers pipeline of a model family (real classes, 1-2 MB).",
    )
    parser.add_argument("family", help=f"one of: {', '.join(sorted(TINY_WRITERS))}")
    parser.add_argument("folder", help="where to write it (a new or empty folder)")
    args = parser.parse_args(argv)
    try:
        _tiny_writer(args.family)  # a bad name is refused before the libraries load (seconds)
        from cdmctl.quiet import quiet_libraries

        quiet_libraries()
        folder = write_tiny(args.family, args.folder)
    except UserError as e:
        print(f"error: {e.message}" + (f"\n  fix: {e.fix}" if e.fix else ""), file=sys.stderr)
        return e.exit_code
    print(folder)
    return 0


"""Write a tiny random-weight LongCat-Image pipeline folder of the real classes (`builtin:tiny-longcat`).

Every part is the class a real LongCat-Image folder holds: `LongCatImageTransformer2DModel` (one dual and one
single block), a `Qwen2_5_VLForConditionalGeneration` text encoder (tiny text and vision towers; the vision tower
is never used for text but the class has one), a byte-level BPE `Qwen2Tokenizer` written locally with the chat
template's special tokens, `AutoencoderKL` with 16 latent channels and the real 8x scale factor, and
`FlowMatchEulerDiscreteScheduler` with the dynamic shift. The folder loads with
`LongCatImagePipeline.from_pretrained` like a user's model.

`text_processor/` (the `Qwen2VLProcessor` that only prompt rewriting uses) is written as files in the layout of
a processor folder, not by the processor class: transformers cannot build a Qwen2VLProcessor without torchvision,
and cdmctl never loads it (LongCatBackbone.unused_parts).
"""

from __future__ import annotations

import json
from pathlib import Path

from cdmctl.backbones.tiny import _WORDS, _bytes_to_unicode

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]  # fmt: skip

# Qwen's chat format, enough for `apply_chat_template` on text messages (what prompt rewriting sends).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen_vocab_and_merges(extra_words: tuple[str, ...] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """GPT-2/Qwen byte-level BPE: every byte, merges spelling `extra_words` (first: they take precedence, so each
    becomes one token) and `_WORDS` alone and after a space, special tokens last."""
    byte_chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(byte_chars.values())}
    merges: list[tuple[str, str]] = []
    space = byte_chars[ord(" ")]  # "Ġ": the byte-level pre-tokenizer keeps a word's leading space
    for word in [*extra_words, *_WORDS]:
        for spelled in (word, space + word):
            current = spelled[0]
            for char in spelled[1:]:
                merged = current + char
                if merged not in vocab:
                    merges.append((current, char))
                    vocab[merged] = len(vocab)
                current = merged
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    return vocab, merges


def tiny_qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges()
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:])  # fmt: skip


def tiny_qwen_text_encoder(tokenizer, hidden: int = 32):
    """Qwen2.5-VL at toy sizes; its rope sections (mrope) must sum to half the head size."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    heads = 2
    half_head = hidden // heads // 2
    sections = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
        num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0], window_size=56)  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_longcat_scheduler():
    """The dynamic shift with the values LongCatImagePipeline falls back to (it reads them from this config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )  # fmt: skip


def _tiny_longcat_pipeline():
    """Assemble the tiny LongCatImagePipeline (no text processor); weights from torch's (seeded) global RNG."""
    from diffusers import AutoencoderKL, LongCatImagePipeline, LongCatImageTransformer2DModel

    tokenizer = tiny_qwen_tokenizer()
    text_encoder = tiny_qwen_text_encoder(tokenizer)
    # axes_dims_rope (modality, row, column) must sum to attention_head_dim
    transformer = LongCatImageTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size, pooled_projection_dim=32,
        axes_dims_rope=[4, 6, 6],
    )  # fmt: skip
    # Four blocks: the real 8x scale factor, so image sizes, sequence lengths and mu follow the real model's.
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    pipe = LongCatImagePipeline(scheduler=tiny_longcat_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                text_processor=None, transformer=transformer)  # fmt: skip
    return pipe, tokenizer


def write_text_processor(folder: Path, tokenizer) -> None:
    """`text_processor/` as a Qwen2VLProcessor folder: its tokenizer, image processor config and chat template."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    image_processor = {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "min_pixels": 3136, "max_pixels": 12544,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }  # fmt: skip
    (folder / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2) + "\n")
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_tiny_longcat(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight LongCat-Image pipeline folder (about 1.5 MB) and return its path.

    Deterministic given `seed` (the global torch RNG is left as it was). Any image size that is a multiple of
    16 pixels works; the pipeline's own default is 1024 (its hard-coded default_sample_size 128 times 8).
    """
    import torch

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe, tokenizer = _tiny_longcat_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    write_text_processor(folder / "text_processor", tokenizer)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["text_processor"] = ["transformers", "Qwen2VLProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder

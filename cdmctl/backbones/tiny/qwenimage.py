"""Write a tiny random-weight Qwen-Image pipeline folder of the real classes (`builtin:tiny-qwenimage`).

Every part is the class a real Qwen-Image folder holds: `QwenImageTransformer2DModel` (one block), a
`Qwen2_5_VLForConditionalGeneration` text encoder (tiny text and vision towers, as for LongCat), a byte-level BPE
`Qwen2Tokenizer` written locally whose vocabulary spells most words of the pipeline's system-prompt template as
one token (45 template tokens here, 34 with the real tokenizer: the pipeline's hard-coded drop of 34 leaves the
last 11 in the tiny model's embeddings, which changes nothing cdmctl relies on), `AutoencoderKLQwenImage` with 16 latent channels and the
real 8x scale factor and latent statistics, and `FlowMatchEulerDiscreteScheduler` with the published Qwen-Image
config's dynamic shift (256-8192 tokens, shift 0.5-0.9, `shift_terminal` 0.02, which the adapter drops).

No processor is involved: the text-to-image pipeline takes only a tokenizer, so torchvision is never needed.
"""

from __future__ import annotations

from pathlib import Path

from cdmctl.backbones.tiny.longcat import (
    SPECIAL_TOKENS,
    qwen_vocab_and_merges,
    tiny_qwen_text_encoder,
)

# words of QwenImagePipeline's prompt template, so that it tokenizes nearly as with the real tokenizer
TEMPLATE_WORDS = ("system", "user", "assistant", "Describe", "image", "detailing", "color", "shape", "size",
                  "texture", "quantity", "text", "spatial", "relationships", "objects", "background")  # fmt: skip

# the published scheduler config of Qwen/Qwen-Image (as several public training tools reproduce it)
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                    "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192, "shift_terminal": 0.02,
                    "time_shift_type": "exponential"}  # fmt: skip


def tiny_qwenimage_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges(TEMPLATE_WORDS)
    return Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS[1:])  # fmt: skip


def _tiny_qwenimage_pipeline():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    tokenizer = tiny_qwenimage_tokenizer()
    text_encoder = tiny_qwen_text_encoder(tokenizer)
    # axes_dims_rope (frame, row, column) must sum to attention_head_dim
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_encoder.config.text_config.hidden_size, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)  # fmt: skip


def write_tiny_qwenimage(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen-Image pipeline folder (about 2 MB) and return its path.

    Deterministic given `seed` (the global torch RNG is left as it was). Any image size that is a multiple of 16
    pixels works; the pipeline's own default is 1024.
    """
    import torch

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _tiny_qwenimage_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder

"""Write a tiny random-weight Z-Image pipeline folder of the real classes (`builtin:tiny-zimage`).

Every part is the class a real Z-Image folder holds: `ZImageTransformer2DModel` (one main layer and one refiner
of each kind), a `Qwen3Model` text encoder (tiny; the pipeline takes its second-to-last hidden state), a
byte-level BPE `Qwen2Tokenizer` written locally with the Qwen3-style chat template, `AutoencoderKL` with 16 latent
channels and the real 8x scale factor, and `FlowMatchEulerDiscreteScheduler` with a static shift of 3 (the value
believed to be in the published Z-Image scheduler config; not read offline). Loads with
`ZImagePipeline.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from cdmctl.backbones.tiny.flux2_klein import tiny_qwen3_tokenizer


def _tiny_zimage_pipeline():
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = tiny_qwen3_tokenizer()
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    hidden = 16
    text_encoder = Qwen3Model(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        bos_token_id=pad, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=pad,
    )).eval()  # fmt: skip
    # axes_dims (caption/frame, row, column) must sum to the head size dim / n_heads
    transformer = ZImageTransformer2DModel(
        in_channels=16, dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=hidden,
        axes_dims=[4, 6, 6], axes_lens=[1024, 512, 512],
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)  # fmt: skip


def write_tiny_zimage(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Z-Image pipeline folder (about 2 MB) and return its path.

    Deterministic given `seed` (the global torch RNG is left as it was). Any image size that is a multiple of 16
    pixels works; the pipeline's own default is 1024.
    """
    import torch

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _tiny_zimage_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder

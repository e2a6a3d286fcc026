"""Write a tiny random-weight FLUX.2 [klein] base pipeline folder of the real classes (`builtin:tiny-flux2-klein`).

Every part is the class a real klein folder holds: `Flux2Transformer2DModel` (one dual and one single block, no
guidance embedding, as the base), a `Qwen3ForCausalLM` text encoder with 27 tiny layers (the pipeline stacks the
hidden states of layers 9, 18 and 27), a byte-level BPE `Qwen2Tokenizer` written locally with a Qwen3-style chat
template (the `enable_thinking=False` branch the pipeline asks for), `AutoencoderKLFlux2` with 32 latent
channels, its 2x2 patch batch norm and the real 8x scale factor, and `FlowMatchEulerDiscreteScheduler` with the
dynamic shift (the pipeline computes mu itself). The folder loads with `Flux2KleinPipeline.from_pretrained`.
"""

from __future__ import annotations

from pathlib import Path

from cdmctl.backbones.tiny.longcat import SPECIAL_TOKENS, qwen_vocab_and_merges

THINK_TOKENS = ["<think>", "</think>"]

# Qwen3's chat format for text messages; with enable_thinking=False the assistant turn opens with an empty think block.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen3_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocab_and_merges()
    for token in THINK_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>",
                               additional_special_tokens=SPECIAL_TOKENS[1:] + THINK_TOKENS)  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen3(tokenizer, hidden: int = 16, layers: int = 27):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=pad, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=pad,
    )  # fmt: skip
    return Qwen3ForCausalLM(config).eval()


def _tiny_flux2_klein_pipeline():
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Transformer2DModel,
    )

    tokenizer = tiny_qwen3_tokenizer()
    text_encoder = tiny_qwen3(tokenizer)
    latent_channels = 32  # as the real VAE: 4 x 32 = 128 transformer input channels
    # axes_dims_rope (time, row, column, text position) must sum to attention_head_dim
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * text_encoder.config.hidden_size,
        timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
    )  # fmt: skip
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=latent_channels, norm_num_groups=4,
        sample_size=32, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )  # fmt: skip
    # batch-norm statistics that are not the identity, so that decode's normalisation is exercised
    vae.bn.running_mean.uniform_(-0.5, 0.5)
    vae.bn.running_var.uniform_(0.5, 2.0)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=False)  # fmt: skip


def write_tiny_flux2_klein(folder: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight FLUX.2 [klein] base pipeline folder (about 1 MB) and return its path.

    Deterministic given `seed` (the global torch RNG is left as it was). Any image size that is a multiple of
    16 pixels works; the pipeline's own default is 1024.
    """
    import torch

    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _tiny_flux2_klein_pipeline()
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder

"""Per-GPU memory of a distillation run for SD3-Medium and LongCat-Image: DDP vs FSDP2, full vs LoRA, 1/8/16 GPUs.

    python benchmarks/scale_memory.py                       # the computed table (CPU, seconds, no downloads)
    torchrun --nproc_per_node 8 benchmarks/scale_memory.py --measure --strategy fsdp2 --train full   # on GPUs

**Computed** (no GPU needed): every network is built on the `meta` device from its real config (below, with
sources) and its parameters counted; the memory of each state is then what cdmctl keeps for it:

- weights: student and fake teacher float32 masters, the frozen teacher in bf16 (full); LoRA: the frozen bf16
  base once under DDP (the three module trees share it), and per tree under FSDP2 (each tree is sharded on its
  own: 3 x base / N with `parallel.teacher: shard`, base + 2 x base / N with `replicate`), plus float32 adapters
  for the student and the fake teacher;
- gradients: float32, of one network at a time (the student's and the fake teacher's updates do not overlap and
  gradients are freed after each step);
- optimizer: AdamW's two float32 moments of both trained networks; EMA: float32 copy of the student's trained
  weights (`optim.ema_device: cpu` moves it off the GPU);
- communication: DDP's gradient buckets (a float32 copy of each trained network's gradients, allocated once);
  FSDP2's transient whole weights of two blocks in bf16 (the current one and the prefetched next), the root
  module's weights (not resharded after forward) and one block's whole float32 gradients before reduce-scatter.
- not included: activations (they depend on batch and resolution; gradient checkpointing keeps one block's),
  the CUDA context and allocator fragmentation (typically 1-3 GiB). The text encoders are listed apart: they run
  only while the prompt-embedding cache is built, then are freed; the VAE stays (sample grids).

**Measured** (`--measure`, under torchrun on GPUs): the real networks of the shape (random weights), prepared by
cdmctl's own `parallel.prepare_networks`, one full TTUR cycle of the engine (two fake-teacher updates, one
student update, EMA), and `torch.cuda.max_memory_allocated` of the largest rank. Each run appends a line to
benchmarks/results/scale_memory_measured.jsonl, which the table prints beside the computed total.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:  # runnable as a plain script from a checkout
        sys.path.insert(0, str(path))

MEASURED = ROOT / "benchmarks" / "results" / "scale_memory_measured.jsonl"
GIB = 2**30
LORA_RANK = 64  # the presets' default (model.lora.rank)

# Configs, and where each value comes from:
# - SD3-Medium transformer: stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json (also
#   benchmarks/iteration_speed.py); text encoders: its text_encoder (CLIP ViT-L/14), text_encoder_2 (OpenCLIP
#   ViT-bigG/14), text_encoder_3 (T5 v1.1 XXL encoder) config.json; VAE: vae/config.json (16 latent channels,
#   no quant convs).
# - LongCat-Image transformer: LongCatImageTransformer2DModel with num_layers 10, num_single_layers 20 and the
#   class defaults otherwise (attention_head_dim 128, 24 heads, joint_attention_dim 3584, in_channels 64). The
#   class defaults of diffusers 0.42.1 (19 / 38 blocks) are FLUX.1's, not LongCat's: 10 joint + 20 single blocks
#   are what mflux's LongCat port and the model card describe (a "6B" model), and they give 6.27B parameters =
#   12.54 GB in bf16, the size of the published transformer weights. Text encoder: Qwen2.5-VL-7B-Instruct
#   (config.json of Qwen/Qwen2.5-VL-7B-Instruct); VAE: FLUX.1's AutoencoderKL (16 channels), as SD3's.
SD3_TRANSFORMER = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
                   "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
                   "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192}  # fmt: skip
LONGCAT_TRANSFORMER = {"num_layers": 10, "num_single_layers": 20}
VAE_16 = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": [128, 256, 512, 512],
          "layers_per_block": 2, "down_block_types": ["DownEncoderBlock2D"] * 4,
          "up_block_types": ["UpDecoderBlock2D"] * 4, "use_quant_conv": False, "use_post_quant_conv": False}  # fmt: skip
SD3_LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                    "ff_context.net.2"]  # fmt: skip  (cdmctl.backbones.sd3.SD3Backbone.lora_target_modules)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd3_parts() -> dict[str, Any]:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from diffusers.models.attention import JointTransformerBlock
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**SD3_TRANSFORMER)
        text = [CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, projection_dim=768, vocab_size=49408)),
                CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                    num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, vocab_size=49408)),
                T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                        vocab_size=32128, feed_forward_proj="gated-gelu"))]  # fmt: skip
        vae = AutoencoderKL(**VAE_16)
    return {"transformer": transformer, "blocks": (JointTransformerBlock,), "targets": SD3_LORA_TARGETS,
            "text": sum(map(count, text)), "vae": count(vae)}  # fmt: skip


def longcat_parts() -> dict[str, Any]:
    from diffusers import AutoencoderKL
    from diffusers.models.transformers.transformer_longcat_image import (
        LongCatImageSingleTransformerBlock,
        LongCatImageTransformer2DModel,
        LongCatImageTransformerBlock,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        transformer = LongCatImageTransformer2DModel(**LONGCAT_TRANSFORMER)
        text = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config={"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                         "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064},
            vision_config={"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                           "out_hidden_size": 3584}, tie_word_embeddings=False))  # fmt: skip
        vae = AutoencoderKL(**VAE_16)
    # LoRA targets: every linear layer inside the blocks (attention and feed-forward projections; the LongCat
    # adapter's own list lives in its backbone, not on this branch)
    return {"transformer": transformer, "blocks": (LongCatImageTransformerBlock, LongCatImageSingleTransformerBlock),
            "targets": None, "text": count(text), "vae": count(vae)}  # fmt: skip


def lora_params(transformer: torch.nn.Module, blocks: tuple[type, ...], targets: list[str] | None) -> int:
    """r * (in + out) for every adapted linear layer."""
    total = 0
    for block in (m for m in transformer.modules() if isinstance(m, blocks)):
        for name, layer in block.named_modules():
            if isinstance(layer, torch.nn.Linear) and (targets is None or any(name == t for t in targets)):
                total += LORA_RANK * (layer.in_features + layer.out_features)
    return total


def shapes(parts: dict[str, Any]) -> dict[str, int]:
    t = parts["transformer"]
    blocks = [m for m in t.modules() if isinstance(m, parts["blocks"])]
    in_blocks = sum(map(count, blocks))
    return {"P": count(t), "A": lora_params(t, parts["blocks"], parts["targets"]), "block": max(map(count, blocks)),
            "root": count(t) - in_blocks, "text": parts["text"], "vae": parts["vae"]}  # fmt: skip


def per_gpu(s: dict[str, int], train: str, strategy: str, n: int, teacher: str = "shard") -> dict[str, float]:
    """Bytes per GPU of each state (see the module docstring), for n GPUs."""
    P, A = s["P"], s["A"]
    trained = P if train == "full" else A  # per trained network (student, fake teacher)
    shard = n if strategy == "fsdp2" else 1
    if train == "full":
        teacher_bytes = 2 * P / (shard if teacher == "shard" else 1)
        weights = 2 * 4 * P / shard + teacher_bytes
    else:
        base = 3 * 2 * P / shard if teacher == "shard" else 2 * P + 2 * 2 * P / shard
        weights = (2 * P if strategy != "fsdp2" else base) + 2 * 4 * A / shard
    out = {"weights": weights, "gradients": 4 * trained / shard, "optimizer": 2 * 8 * trained / shard,
           "ema": 4 * trained / shard}  # fmt: skip
    if strategy == "ddp" and n > 1:
        out["communication"] = 2 * 4 * trained  # DDP buckets of both trained networks
    elif strategy == "fsdp2":
        out["communication"] = 2 * 2 * s["block"] + 2 * s["root"] + 4 * s["block"]
    else:
        out["communication"] = 0.0
    out["total"] = sum(out.values())
    return out


def measured() -> list[dict[str, Any]]:
    if not MEASURED.is_file():
        return []
    return [json.loads(line) for line in MEASURED.read_text().splitlines() if line.strip()]


def table(models: dict[str, dict[str, int]]) -> list[str]:
    found = measured()
    lines = ["| model | train | strategy | GPUs | weights | gradients | optimizer | EMA | communication | total | "
             "measured peak |", "|" + "---|" * 11]  # fmt: skip
    for name, s in models.items():
        for train in ("full", "lora"):
            for strategy in ("ddp", "fsdp2"):
                for n in (1, 8, 16):
                    if strategy == "fsdp2" and n == 1:
                        continue  # FSDP2 needs several processes (one GPU: the ddp row, which is plain training)
                    m = per_gpu(s, train, strategy, n)
                    peak = [f"{r['peak_gib']:.1f} GiB ({r['device']})" for r in found if
                            (r["model"], r["train"], r["strategy"], r["processes"]) == (name, train, strategy, n)]
                    cells = [f"{m[k] / GIB:.1f}" for k in ("weights", "gradients", "optimizer", "ema", "communication",
                                                          "total")]  # fmt: skip
                    label = "1 (no DDP)" if n == 1 else str(n)
                    lines.append(f"| {name} | {train} | {strategy if n > 1 else '-'} | {label} | " + " | ".join(cells)
                                 + f" | {'; '.join(peak) or 'not measured'} |")  # fmt: skip
    return lines


def report() -> None:
    models = {"SD3-Medium": shapes(sd3_parts()), "LongCat-Image": shapes(longcat_parts())}
    for name, s in models.items():
        print(f"{name}: transformer {s['P'] / 1e9:.3f}B parameters (largest block {s['block'] / 1e6:.1f}M, outside "
              f"the blocks {s['root'] / 1e6:.1f}M), LoRA rank {LORA_RANK} adapter {s['A'] / 1e6:.1f}M; text encoders "
              f"{s['text'] / 1e9:.2f}B = {2 * s['text'] / GIB:.1f} GiB in bf16 while the embedding cache is built, "
              f"then freed; VAE {s['vae'] / 1e6:.1f}M = {2 * s['vae'] / GIB:.2f} GiB (stays)")  # fmt: skip
    print("\nGiB per GPU (activations not included); FSDP2 with parallel.teacher shard. LoRA + FSDP2 with the "
          "teacher replicated: add (1 - 1/N) x base bf16 to weights.\n")
    print("\n".join(table(models)))
    if not measured():
        print("\nmeasured peak: none yet (no GPU on this machine); run with --measure under torchrun on GPUs")


def measure(args: argparse.Namespace) -> None:
    """One TTUR cycle of the real engine on random weights of SD3-Medium's shape (or `--size small` on CPU for a
    smoke run), through cdmctl's own accelerator and sharding code; peak memory of the largest rank."""
    import tempfile

    from iteration_speed import SIZES, RandomPromptBank, sd3_backbone

    from cdmctl.config.load import load_preset
    from cdmctl.engine.ema import StudentEMA
    from cdmctl.engine.loop import Distiller, peak_memory
    from cdmctl.engine.roles import Roles
    from cdmctl.networks import adamw, build_networks
    from cdmctl.parallel import build_accelerator, effective_strategy, grad_clipper, prepare_networks, wrap_blocks
    from cdmctl.run import batch_maker

    sets = [f"parallel.strategy={args.strategy}", f"model.train={args.train}", f"train.batch_size={args.batch}",
            f"parallel.teacher={args.teacher}", "method.ttur_ratio=2"]  # fmt: skip
    preset = load_preset("sd3-4nfe", sets)
    strategy = effective_strategy(preset.parallel.strategy)
    acc = build_accelerator(preset, Path(tempfile.mkdtemp()), strategy)
    backbone = sd3_backbone(args.size, acc.device)
    wrap_blocks(acc, backbone.block_classes())
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(acc.mixed_precision, torch.float32)
    student, teacher, fake = build_networks(backbone, preset, compute)
    student_opt, fake_opt = adamw(student, 1e-5, preset), adamw(fake, 1e-5, preset)
    student, teacher, fake, student_opt, fake_opt = prepare_networks(acc, preset.parallel.teacher, student, teacher,
                                                                     fake, student_opt, fake_opt)  # fmt: skip
    roles = Roles(backbone, student, teacher, fake, autocast=acc.autocast, unwrap=acc.unwrap_model)
    ema = StudentEMA(acc.unwrap_model(student), preset.optim.ema_max_decay)
    res = args.resolution or SIZES[args.size]["resolution"]
    distiller = Distiller(acc, roles, preset.method, preset.optim, student_opt, fake_opt, ema,
                          make_batch=batch_maker(RandomPromptBank(args.size), args.batch // acc.num_processes,
                                                 backbone.latent_shape(res, res), acc.device),
                          shift=lambda s: backbone.shift(s, res, res).to(s.device), seed=0,
                          clip=grad_clipper(acc))  # fmt: skip
    for _ in range(2):
        distiller.iteration()
    peak = peak_memory(acc)
    if acc.is_main_process:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
        row = {"model": "SD3-Medium" if args.size == "medium" else f"sd3-{args.size}", "train": args.train,
               "strategy": strategy, "processes": acc.num_processes, "teacher": args.teacher, "resolution": res,
               "batch": args.batch, "peak_gib": peak.get("memory/gb", float("nan")),
               "host_peak_gib": peak["memory/host_peak_gb"], "device": device}  # fmt: skip
        print(json.dumps(row))
        if torch.cuda.is_available() and args.size == "medium":
            MEASURED.parent.mkdir(parents=True, exist_ok=True)
            with MEASURED.open("a") as f:
                f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true", help="measure one configuration (under torchrun on GPUs)")
    p.add_argument("--strategy", choices=["auto", "ddp", "fsdp2"], default="auto")
    p.add_argument("--train", choices=["full", "lora"], default="full")
    p.add_argument("--teacher", choices=["shard", "replicate"], default="shard")
    p.add_argument("--size", choices=["medium", "small"], default="medium", help="small: a CPU smoke run")
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--resolution", type=int, default=0)
    args = p.parse_args(argv)
    measure(args) if args.measure else report()


if __name__ == "__main__":
    main()

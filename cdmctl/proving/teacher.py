"""Build and train the proving ground's toy SD3 teacher: real SD3 classes, flow matching on the ground truth.

    python -m cdmctl.proving.teacher --out cdmctl/proving/toy_sd3   # rebuilds the shipped teacher
    python -m cdmctl.proving.teacher --ground toy-sd3-coupled --recipe shipped --out DIR   # the second, both stages
    python -m cdmctl.proving.teacher --ground toy-sd3-coupled --steps 8000 --out DIR   # one stage, any settings

The untrained pipeline comes from the tiny factory (deterministic random text encoders, VAE and a
deeper transformer); only the transformer is trained, through `SD3Backbone.velocity` exactly as the
distillation engine calls it, with rectified-flow matching on `GroundTruth` latents and the prompt
dropped (replaced by the empty prompt) with probability `dropout` so that classifier-free guidance works.
The folder written is a complete diffusers pipeline plus `proving.json` (how it was trained, how long).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from cdmctl.proving.grounds import GROUNDS, Ground
from cdmctl.proving.groundtruth import GroundTruth

RESOLUTION = 16  # pixels; latents are [4, 8, 8] (the tiny VAE downsamples by 2)
TEXT_LENGTH = 8  # T5 tokens (preset model.text_length); CLIP uses CLIP_LENGTH tokens
CLIP_LENGTH = 8
# The time shift each toy samples and distills with (its scheduler's `shift`, grounds.py). Training draws s ~ U(0, 1)
# and does not depend on it. The first toy's 6.0 was chosen because its teacher then needs about 8 Euler steps; sampled
# without the shift it needs far fewer (issue 24), which is why a second ground exists.
TRANSFORMER = dict(num_layers=4, attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
                   pos_embed_max_size=8)  # fmt: skip


@dataclass
class TrainConfig:
    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    dropout: float = 0.15  # share of samples trained on the empty prompt
    ema: float = 0.999
    seed: int = 0
    threads: int = 0  # torch CPU threads (0 = leave as is)
    init: str = ""  # a trained teacher folder of the same ground to continue from ("" = random initial weights)


@dataclass(frozen=True)
class Stage:
    """One stage of a teacher's recipe: its training settings and the ground-truth spec it trains on (overrides
    of the ground's own spec; none for the shipped spec). A later stage continues from the one before."""

    train: TrainConfig
    spec: dict = field(default_factory=dict)


# How each shipped teacher was made, from random weights (its proving.json records the same): `--recipe shipped`.
# The second ground's teacher trained first on a richer spec (4 medium + 8 fine features), which taught it the
# placements faster than the shipped spec alone did (0.35 at 50 Euler steps after 8,000 steps from random weights).
RECIPES: dict[str, list[Stage]] = {
    "toy-sd3": [Stage(TrainConfig(steps=6000, lr=1e-3, warmup=100, threads=1))],
    "toy-sd3-coupled": [Stage(TrainConfig(steps=8000, lr=1e-3, warmup=100, threads=1), {"medium": 4, "fine": 8}),
                        Stage(TrainConfig(steps=6000, lr=5e-4, warmup=50, threads=1))],
}  # fmt: skip

SHIPPED = GROUNDS["toy-sd3"].folder  # the first trained teacher, shipped as package data


def shipped_digest(ground: Ground = GROUNDS["toy-sd3"]) -> str:
    """Short content hash of a shipped teacher's files (it keys the built-in model cache)."""
    import hashlib

    h = hashlib.blake2b(digest_size=6)
    for path in sorted(p for p in ground.folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(ground.folder).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def install_shipped(folder: Path, ground: Ground = GROUNDS["toy-sd3"]) -> Path:
    """Copy a shipped teacher pipeline folder to `folder` (the `builtin:<ground>` builder)."""
    from cdmctl.errors import UserError

    if not (ground.folder / "model_index.json").is_file():
        raise UserError(
            f"the toy teacher's weights are missing from {ground.folder}",
            f"reinstall cdmctl, or rebuild them: python -m cdmctl.proving.teacher --ground {ground.name} "
            f"--out {ground.folder}",
        )
    shutil.copytree(ground.folder, folder)
    return Path(folder)


def write_untrained(folder: Path, seed: int = 0, shift: float = GROUNDS["toy-sd3"].shift) -> Path:
    from cdmctl.backbones.tiny import write_tiny_sd3

    return write_tiny_sd3(folder, seed=seed, resolution=RESOLUTION, transformer_config=TRANSFORMER,
                          clip_length=CLIP_LENGTH, shift=shift)  # fmt: skip


def load(folder: Path):
    from cdmctl.backbones.sd3 import SD3Backbone

    return SD3Backbone.from_pretrained(str(folder), max_sequence_length=TEXT_LENGTH)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(backbone, gt: GroundTruth, cfg: TrainConfig, log=print) -> torch.nn.Module:
    """Flow-match `backbone.transformer` on the ground truth; returns its EMA copy (the teacher)."""
    model = backbone.transformer.float().train().requires_grad_(True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    cond_all = backbone.encode_prompts(gt.prompts)
    null = backbone.encode_prompts([""])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    tick, window = time.perf_counter(), []
    for step in range(cfg.steps):
        idx = torch.randint(gt.num_prompts, (cfg.batch_size,), generator=gen)
        x0 = gt.sample(idx, gen)
        eps = torch.randn(x0.shape, generator=gen)
        s = torch.rand(cfg.batch_size, generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.dropout
        cond = cond_all.index(idx)
        cond = type(cond)({k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), null.tensors[k], v)
                           for k, v in cond.tensors.items()})  # fmt: skip
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        v = backbone.velocity(model, xs, s, cond)
        loss = (v.float() - (eps - x0)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        window.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps} loss {sum(window) / len(window):.4f} "
                f"lr {lr_at(step, cfg):.2e} {time.perf_counter() - tick:.0f}s")  # fmt: skip
            window = []
    return ema


def fit_decoder(vae, gt: GroundTruth, steps: int = 500, batch: int = 32, seed: int = 0, log=print) -> float:
    """Train the tiny VAE's decoder to draw latents as `figure.latent_to_rgb` does (channels 0-2 as RGB), so
    that run sample grids (which decode through the VAE) show the same pictures as the proving-ground figures.
    Returns the final mean absolute pixel error (0-1 scale)."""
    from cdmctl.proving.figure import latent_to_rgb

    decoder = vae.decoder.train().requires_grad_(True)
    opt = torch.optim.Adam(decoder.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    height = gt.spec.size * 2 ** (len(vae.config.block_out_channels) - 1)
    for step in range(steps):
        idx = torch.randint(gt.num_prompts, (batch,), generator=gen)
        x0, other = gt.sample(idx, gen), gt.sample(idx, gen)
        mix = torch.rand(batch, 1, 1, 1, generator=gen)
        latents = torch.cat([x0, mix * x0 + (1 - mix) * other, torch.randn(x0.shape, generator=gen)])
        target = torch.nn.functional.interpolate(latent_to_rgb(latents), size=(height, height), mode="area")
        image = decoder(latents / scale + shift)  # what AutoencoderKL.decode computes, in [-1, 1]
        loss = (image / 2 + 0.5 - target).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"decoder step {step + 1}/{steps}: mean abs pixel error {loss.item():.4f}")
    decoder.eval().requires_grad_(False)
    return loss.item()


GUIDANCES = (1.5, 2.0, 3.0)


def check(backbone, teacher: torch.nn.Module, gt: GroundTruth, log=print, per_prompt: int = 8) -> dict:
    """The teacher's own scores at 1-8 and 50 steps, unguided and at each of GUIDANCES; picks the guidance
    whose 50-step precision is best as `reference_guidance` (the teacher reference of the benchmark)."""
    from cdmctl.proving import evaluate

    cond, null = backbone.encode_prompts(gt.prompts), backbone.encode_prompts([""])
    scores = {}
    for g in (1.0, *GUIDANCES):
        result = evaluate.evaluate(backbone, teacher, gt, cond, null, [1, 2, 4, 8, 50], RESOLUTION, g, per_prompt)
        scores[f"{g:g}"] = {str(n): {k: round(v, 4) for k, v in m.items()} for n, m in result.items()}
        log(f"guidance {g:g}: precision at 1/2/4/8/50 steps "
            + " / ".join(f"{m['precision']:.2f}" for m in result.values()))  # fmt: skip
    best = max(GUIDANCES, key=lambda g: scores[f"{g:g}"]["50"]["precision"])
    return {"reference_guidance": best, "check_per_prompt": per_prompt, "check": scores}


def truth_with(ground: Ground, spec: dict | None = None):
    """The ground's ground truth, with `spec` overriding fields of its spec."""
    gt = ground.truth()
    return type(gt)(spec=replace(gt.spec, **spec)) if spec else gt


def build(out: Path, cfg: TrainConfig, ground: Ground = GROUNDS["toy-sd3"],
          log=lambda text: print(text, flush=True), spec: dict | None = None, score: bool = True) -> Path:  # fmt: skip
    """Write the untrained pipeline, train its transformer on `ground` (its spec overridden by `spec`), save the
    trained pipeline folder to `out`; `score` checks the teacher's samples at every guidance (the final stage)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    gt = truth_with(ground, spec)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdmctl-toy-") as tmp:
        folder = write_untrained(Path(tmp) / "pipe", seed=cfg.seed, shift=ground.shift)
        backbone = load(folder)
        if cfg.init:  # continue a teacher: a longer schedule without paying for its first part again
            trained = type(backbone.transformer).from_pretrained(Path(cfg.init) / "transformer")  # not the encoders
            backbone.transformer.load_state_dict(trained.state_dict())
        teacher = train(backbone, gt, cfg, log)
        seconds = time.perf_counter() - start
        staging = Path(tmp) / "out"
        shutil.copytree(folder, staging)
        shutil.rmtree(staging / "transformer")
        teacher.save_pretrained(staging / "transformer", safe_serialization=True)
        decoder_error = fit_decoder(backbone.vae, gt, log=log)
        shutil.rmtree(staging / "vae")
        backbone.vae.save_pretrained(staging / "vae", safe_serialization=True)
        sanity = check(backbone, teacher, gt, log) if score else {}
        record = {
            "train": asdict(cfg),
            "ground": ground.name,
            "ground_truth": asdict(gt.spec),
            "resolution": RESOLUTION,
            "scheduler_shift": ground.shift,
            "text_length": TEXT_LENGTH,
            "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "decoder_mean_abs_error": round(decoder_error, 4),
            "size_bytes": sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()),
            **sanity,
        }
        (staging / "proving.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out)
    log(f"trained in {seconds:.0f}s; teacher written to {out}")
    return out


def rebuild(out: Path, ground: Ground, stages: list[Stage], log=lambda text: print(text, flush=True)) -> Path:
    """Train a teacher through every stage of a recipe (each continuing the last) and write it to `out`; its
    proving.json gains `stages`: what each earlier stage trained on and for how long."""
    earlier = []
    with tempfile.TemporaryDirectory(prefix="cdmctl-recipe-") as tmp:
        init = ""
        for k, stage in enumerate(stages):
            last = k == len(stages) - 1
            log(f"stage {k + 1}/{len(stages)}: {stage.train.steps} steps, spec overrides {stage.spec or 'none'}")
            folder = out if last else Path(tmp) / f"stage-{k + 1}"
            build(folder, replace(stage.train, init=init), ground, log, spec=stage.spec, score=last)
            if not last:
                done = json.loads((folder / "proving.json").read_text())
                earlier.append({key: done[key] for key in ("train", "ground_truth", "train_seconds")})
            init = str(folder)
    record = json.loads((out / "proving.json").read_text())
    record["train"]["init"] = "the stage before (stages)" if earlier else ""
    (out / "proving.json").write_text(json.dumps({**record, "stages": earlier}, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="pipeline folder to write (replaced if present)")
    parser.add_argument("--ground", choices=list(GROUNDS), default="toy-sd3", help="which proving ground to train on")
    parser.add_argument("--recipe", choices=["shipped"], default=None,
                        help="every stage of the shipped teacher's recipe, from random weights (other settings ignored)")
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out, ground, recipe = args.pop("out"), GROUNDS[args.pop("ground")], args.pop("recipe")
    from cdmctl.run import quiet_libraries

    quiet_libraries()
    if recipe:
        rebuild(out, ground, RECIPES[ground.name])
    else:
        build(out, TrainConfig(**args), ground)


if __name__ == "__main__":
    main()

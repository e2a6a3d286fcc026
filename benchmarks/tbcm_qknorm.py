"""What QK-norm changes for TBCM's JVP, as far as the tiny random-weight SD3 pipeline on a CPU can show.

    python benchmarks/tbcm_qknorm.py            # ~1 min on one core; writes benchmarks/results/tbcm_qknorm.md

SD3-Medium's transformer has no QK-norm (its config leaves `qk_norm` unset: the installed SD3Transformer2DModel
builds its attention with norm_q = norm_k = None); SD3.5 sets qk_norm: rms_norm. SANA-Sprint and TBCM rely on
QK-norm for a stable sCM objective, since the JVP through softmax attention grows with the attention logits.

Two tiny pipelines from the same seed, identical but for `qk_norm` (None or rms_norm; RMSNorm starts at weight 1
and draws no random numbers, so every other weight is the same). The attention logits of a random tiny network
are small, so each is also evaluated with its query/key projections (weights and biases, image and text streams)
scaled by a factor k, which multiplies the logits by k^2 without QK-norm and changes nothing with it. At points
of the network's own rollout (the student equals the teacher at the start of distillation) this reports, per
factor: |F| and |cos t sin t dF/dt| (the JVP the sCM tangent uses, torch.func.jvp), |g| of the sCM tangent at
r = 1 (before normalisation), and how far the finite-difference JVP (eps 3e-4, float32) is from torch.func.jvp.
All per-sample L2 norms, mean over points. Real SD3 weights (and their logit scales) are not observed here.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch

FACTORS = [1.0, 4.0, 16.0, 32.0]
QK = ("to_q", "to_k", "add_q_proj", "add_k_proj")


def scaled(transformer: torch.nn.Module, factor: float) -> torch.nn.Module:
    out = copy.deepcopy(transformer)
    with torch.no_grad():
        for name, module in out.named_modules():
            if name.rsplit(".", 1)[-1] in QK:
                module.weight.mul_(factor)
                if module.bias is not None:
                    module.bias.mul_(factor)
    return out


def norms(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t.float(), dim=tuple(range(1, t.dim())))


def measure(backbone, transformer: torch.nn.Module, cond, seed: int, route_steps: int, sigma_d: float) -> dict:
    from cdmctl.engine import trigflow as T
    from cdmctl.engine.jvp import jvp_autograd, jvp_finite_difference
    from cdmctl.engine.tbcm import reference_route

    def velocity(x, s):
        return backbone.velocity(transformer, x, s, cond)

    def F(y, t):
        return T.trigflow_F(velocity, y, t)

    gen = torch.Generator().manual_seed(seed)
    n = len(cond)
    x = sigma_d * torch.randn((n, *backbone.latent_shape(32, 32)), generator=gen)
    route = reference_route(lambda s: backbone.shift(s, 32, 32), route_steps, 1e-3)
    rows = []
    with torch.no_grad():
        for i, ti in enumerate(route.tolist()):
            t = torch.full((n,), ti)
            Fx = F(x / sigma_d, t)
            dxdt = sigma_d * Fx
            if i > 0:  # the rollout's training points, as TBCM keeps them
                tangents = T.jvp_tangents(t, dxdt, sigma_d)
                exact = jvp_autograd(F, (x / sigma_d, t), tangents)
                fd = jvp_finite_difference(F, (x / sigma_d, t), tangents, 3e-4)
                _, g = T.scm_tangent(Fx, exact, x, dxdt, t, 1.0, sigma_d)
                rows.append((norms(Fx), norms(exact), g, norms(fd - exact) / norms(exact).clamp_min(1e-12)))
            t_next = torch.full((n,), float(route[i + 1]) if i + 1 < len(route) else 0.0)
            x = T.trig_step(x, t, t_next, dxdt)
    f, jvp, g, fd_err = (torch.cat(c).mean().item() for c in zip(*rows))
    return {"F": f, "jvp": jvp, "g": g, "fd_rel_err": fd_err}


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "tbcm_qknorm.md")
    p.add_argument("--route-steps", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from cdmctl.backbones import load_backbone
    from cdmctl.backbones.tiny import write_tiny_sd3

    prompts = ["a red cube", "a blue ball", "a green tree on a hill", "a white dog"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="cdmctl-qk-") as tmp:
        for qk in (None, "rms_norm"):
            folder = write_tiny_sd3(Path(tmp) / str(qk), seed=0, transformer_config={"qk_norm": qk})
            backbone = load_backbone("sd3", str(folder), max_sequence_length=8)
            attn = backbone.transformer.transformer_blocks[0].attn
            assert (attn.norm_q is None) == (qk is None)
            cond = backbone.encode_prompts(prompts)
            for k in FACTORS:
                results[(qk, k)] = measure(backbone, scaled(backbone.transformer, k), cond, 0, args.route_steps, 0.5)
    lines = [
        "# TBCM's JVP with and without QK-norm (tiny random-weight SD3 pipeline, CPU)", "",
        f"Command: `python benchmarks/tbcm_qknorm.py` ({len(prompts)} prompts, {args.route_steps}-level route, "
        f"{args.route_steps - 1} points each; per-sample L2 norms, mean over points). k scales the query/key "
        "projections (attention logits x k^2 without QK-norm).", "",
        "| qk_norm | k | \\|F\\| | \\|cos t sin t dF/dt\\| (func.jvp) | \\|g\\| (r = 1) | FD vs func.jvp, relative |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for (qk, k), r in results.items():
        lines.append(f"| {qk or 'none (SD3-Medium)'} | {k:g} | {r['F']:.3f} | {r['jvp']:.3f} | {r['g']:.3f} | "
                     f"{r['fd_rel_err']:.1e} |")  # fmt: skip
    lines += [
        "", "What this shows: without QK-norm the JVP grows with the attention logits (the softmax saturates) and the "
        "finite-difference JVP drifts from the exact one (float32 forwards, eps 3e-4); with QK-norm both stay where "
        "they are, whatever the projections' scale. What it cannot show: the logit scales of the real SD3-Medium "
        "weights, and whether a 1024 px, 2B-parameter sCM run diverges without QK-norm; that needs the weights and "
        "GPUs (watch `tbcm/jvp_norm`, `tbcm/g_norm` and `nonfinite` in such a run).",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()

"""Scores of proving-ground samples against the exact ground truth, and their noise floors.

Distances are RMS over latent elements (`||a - b||_2 / sqrt(D)`). For a sample x of prompt p:
- precision: share of samples whose nearest mode over *all* prompts' modes is one of p's modes and lies
  within `tau` (a sample on another prompt's mode, or a blend of modes, is wrong);
- adherence: share whose nearest mode belongs to p (no distance threshold);
- coverage: per prompt, 1 - total-variation distance between the histogram of its precise samples over
  its modes and the uniform one (1 = modes hit evenly; a prompt with no precise sample scores 0),
  averaged over prompts;
- mmd2: unbiased squared MMD per prompt between the samples and an independent ground-truth reference
  set, averaged over prompts; kernel: mean of Gaussian kernels exp(-d^2 / (2 h^2)) on the RMS distance d
  with bandwidths h in `MMD_BANDWIDTHS`.
The noise floor of each is the same score of an independent ground-truth sample of the same size.
"""

from __future__ import annotations

import torch

from cdmctl.proving.groundtruth import GroundTruth  # or coupled.CoupledGroundTruth: the same interface

MMD_BANDWIDTHS = (0.025, 0.05, 0.1, 0.2)
METRICS = ("precision", "coverage", "mmd2", "adherence")
HIGHER_IS_BETTER = {"precision": True, "coverage": True, "mmd2": False, "adherence": True}


def default_tau(gt: GroundTruth) -> float:
    """Precision radius: 0.36 x the closest distance between two modes of one prompt (a blend of two
    modes sits at 0.5 x), and at least 2.25 x the ground truth's own noise."""
    sep = min_mode_separation(gt)
    return max(0.36 * sep, 2.25 * gt.spec.noise)


def rms_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] RMS distances between rows of a [N, ...] and b [M, ...]."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return torch.cdist(a, b) / a.shape[1] ** 0.5


def min_mode_separation(gt) -> float:
    """Smallest RMS distance between two modes of the same prompt."""
    return gt.min_mode_separation()


def nearest_modes(gt, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt [B], mode [B], RMS distance [B]) of each sample's nearest mode over all prompts (the ground truth's
    own lookup: a list of modes, or a structured search where there are too many to list)."""
    return gt.nearest_modes(x)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths=MMD_BANDWIDTHS) -> float:
    """Unbiased MMD^2 between samples x [n, ...] and y [m, ...] (n, m >= 2)."""
    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = rms_cdist(a, b) ** 2
        return torch.stack([torch.exp(-d2 / (2 * h**2)) for h in bandwidths]).mean(0)

    n, m = len(x), len(y)
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(xx + yy - 2 * kxy.mean())


def score(gt: GroundTruth, x: torch.Tensor, prompt_idx: torch.Tensor, reference: torch.Tensor,
          reference_idx: torch.Tensor, tau: float | None = None) -> dict[str, float]:  # fmt: skip
    """All metrics of samples x [B, C, h, w] of prompts [B] against a ground-truth reference set."""
    tau = default_tau(gt) if tau is None else tau
    prompt_idx = torch.as_tensor(prompt_idx)
    near_prompt, near_mode, dist = nearest_modes(gt, x)
    on_prompt = near_prompt == prompt_idx
    precise = on_prompt & (dist < tau)
    coverages, mmds = [], []
    for p in range(gt.num_prompts):
        mine = prompt_idx == p
        if not mine.any():
            continue
        hits = torch.bincount(near_mode[mine & precise], minlength=gt.num_modes).double()
        coverages.append(0.0 if hits.sum() == 0 else 1 - 0.5 * float((hits / hits.sum() - 1 / gt.num_modes).abs().sum()))
        mmds.append(mmd2(x[mine], reference[reference_idx == p]))
    return {
        "precision": float(precise.double().mean()),
        "coverage": sum(coverages) / len(coverages),
        "mmd2": sum(mmds) / len(mmds),
        "adherence": float(on_prompt.double().mean()),
    }


def reference_set(gt: GroundTruth, per_prompt: int = 64, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ground-truth reference samples (x0 [P * n, ...], prompts [P * n]) that MMD compares with."""
    return gt.sample_per_prompt(per_prompt, torch.Generator().manual_seed(seed))


def noise_floor(gt: GroundTruth, per_prompt: int, repeats: int = 5, seed: int = 99) -> dict[str, tuple[float, float]]:
    """Each metric of fresh ground-truth samples (same size as the evaluated sets): metric -> (mean, std)."""
    ref, ref_idx = reference_set(gt)
    runs = []
    for r in range(repeats):
        x, idx = gt.sample_per_prompt(per_prompt, torch.Generator().manual_seed(seed + r))
        runs.append(score(gt, x, idx, ref, ref_idx))
    out = {}
    for k in METRICS:
        v = torch.tensor([run[k] for run in runs], dtype=torch.float64)
        out[k] = (float(v.mean()), float(v.std()) if repeats > 1 else 0.0)
    return out

"""One TTUR cycle of every shipped preset at its real architecture and resolution, on the meta device: shapes and FLOPs.

    python benchmarks/real_size.py                      # every real preset, batch 2 per process (about a minute)
    python benchmarks/real_size.py sd3-4nfe --batch 4   # some presets, another per-process batch

What runs is distill's own code: the preset is loaded and validated, the family adapter is built around the real
transformer (cdmctl.backbones.architectures, no weights: meta tensors carry shapes and no storage), `build_networks`
makes the student, teacher and fake teacher (full copies or LoRA over one base, gradient checkpointing as the preset
says), the optimizers and EMA are the run's, and `Distiller.iteration()` runs `method.ttur_ratio` iterations (so one
student update and its fake-teacher updates) with the schedule drawn at the preset's step counts and the time shift
at its resolution. The prompts are conditioning tensors of the shapes the adapter's encode_prompts returns.

Where values are needed, they are real: the engine's random draws (schedule, levels, record steps), the prompt
lengths and masks the adapters read, and the latents and losses on the CPU (small); only the networks run on meta.
`MetaBoundary` is the one seam: it moves a network's inputs to meta, runs it there (FlopCounterMode counts its
matmuls, attention and convolutions, backward included) and hands back zeros of the output's shape, whose gradient
it passes back to the meta graph. Everything a family does with values before its transformer runs (Qwen-Image
cutting the text to the longest prompt, Z-Image splitting captions by length) therefore runs as in training.

Time: meta tensors carry no data, but torch registers its Python reference implementations (torch._refs,
torch._decomp) as the meta kernels of most operations, so each operation costs about a millisecond of Python on an
idle core (cProfile: _prims_common / _refs / decompositions' addmm dominate; FakeTensorMode is no faster, its
operation cache hits but the Python dispatch remains). One SD3-Medium forward at 1024 px is about 2,100 operations.
A cycle therefore runs a network call without gradient once per distinct input shape (MetaBoundary replays the
rest with their FLOPs); calls with gradient, their backward and checkpointing's recompute all run.

Not covered: numbers (the networks compute nothing) and the gradient norm (a clip on meta gradients has no value;
the clip reports 0).

TBCM (`sd3-tbcm`) runs its own distiller, built as run.py builds it (student and teacher, the log-variance head on
the CPU with its own optimizer, the EMA), one iteration per cycle. Its JVP (`jvp: autograd`) is torch.func.jvp over
the student unwrapped, which here is the student's MetaBoundary (Roles' default `unwrap`, as a DDP wrapper would
be): the boundary routes dual tensors to `_Crossing`, whose forward-mode rule (`jvp`) runs torch.func.jvp of the
meta network at the inputs that carry a tangent, under torch's own attention (the math kernel jvp_autograd pins; the
memory-efficient kernel has no forward-mode rule), takes off the primal FLOPs its forward already counted and hands
back zero tangents of the outputs' shapes on the CPU. torch.func.jvp of a linear layer dispatches three matmuls
(primal, input tangent, and the weights' zero tangent), on meta as on the CPU (checked), so the JVP costs about three
forwards in the FLOP count, as the engine's cost model (JVP_FORWARDS) says.

Writes benchmarks/results/real_size.md and .json with the command.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
H100_BF16_DENSE = 989e12  # FLOP/s, NVIDIA H100 SXM bf16 dense tensor cores


def to_meta(value: Any) -> Any:
    return value.detach().to("meta") if isinstance(value, torch.Tensor) else value


def counted(counter: Any, run: Callable[[], Any]) -> tuple[Any, dict]:
    """run() and the FLOPs it added to `counter`'s global count, by operation ({} without a counter)."""
    counts = counter.flop_counts["Global"] if counter is not None else {}
    before = dict(counts)
    out = run()
    return out, {op: n - before.get(op, 0) for op, n in counts.items() if n != before.get(op, 0)}


class _Crossing(torch.autograd.Function):
    """Run the meta network, return zeros of its outputs on the caller's device; backward: into the meta graph;
    forward mode (torch.func.jvp, TBCM's `jvp: autograd`): torch.func.jvp of the meta network, zero tangents back."""

    @staticmethod
    def forward(boundary: "MetaBoundary", spec: Any, anchor: torch.Tensor, *flat: Any):
        args, kwargs = tree_unflatten(list(flat), spec)
        with torch.enable_grad():
            out, boundary.primal_flops = counted(boundary.counter, lambda: boundary.inner(
                *tree_map(to_meta, args), **tree_map(to_meta, kwargs)))
        leaves, boundary.out_spec = tree_flatten(out)
        boundary.crossed = leaves  # for setup_context (which functorch may call more than once)
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=anchor.device) for t in leaves)

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        boundary, spec, anchor, *flat = inputs
        ctx.boundary, ctx.spec, ctx.flat, ctx.device = boundary, spec, flat, anchor.device
        ctx.meta_out, ctx.primal_flops = boundary.crossed, boundary.primal_flops

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        pairs = [(o, g.to("meta")) for o, g in zip(ctx.meta_out, grads) if o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.meta_out = None
        return (None, None, None) + (None,) * len(ctx.flat)

    @staticmethod
    def jvp(ctx, *tangents: torch.Tensor | None):
        """torch.func.jvp of the meta network at the inputs that carry a tangent, under torch's own attention (the
        math kernel `jvp_autograd` pins; forward mode has no rule for the efficient one). The primal it recomputes
        was counted by `forward` already: its FLOPs come off, leaving what one dual-tensor forward costs."""
        which = [i for i, t in enumerate(tangents[3:]) if t is not None]

        def network(*varying: torch.Tensor) -> Any:
            leaves = [to_meta(v) for v in ctx.flat]
            for i, v in zip(which, varying):
                leaves[i] = v
            args, kwargs = tree_unflatten(leaves, ctx.spec)
            return ctx.boundary.inner(*args, **kwargs)

        primals = tuple(to_meta(ctx.flat[i]) for i in which)
        directions = tuple(to_meta(tangents[3 + i]) for i in which)
        with torch.no_grad(), torch_attention():  # the cycle's FlopCounterMode counts it
            torch.func.jvp(network, primals, directions)
        if ctx.boundary.counter is not None:
            for op, n in ctx.primal_flops.items():
                ctx.boundary.counter.flop_counts["Global"][op] -= n
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=ctx.device) if t.is_floating_point() else None
                     for t in ctx.meta_out)  # fmt: skip


def signature(tree: Any) -> tuple:
    """What a meta network's outputs can depend on: every tensor's shape and dtype, every other value itself."""
    leaves, spec = tree_flatten(tree)
    return (str(spec), *((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t) for t in leaves))


class MetaBoundary(nn.Module):
    """`inner` (a network on meta) as a module that takes and returns CPU tensors: zeros of the real shapes.

    A call without gradient whose inputs have the shapes, dtypes and other arguments of an earlier one (a
    simulation's steps, the teacher on every iteration) is not run again: a meta network has no values, so its
    outputs' shapes follow from those alone, and the FLOPs the first call added to `counter` are added again.
    Each meta operation costs milliseconds of Python (torch registers its Python reference implementations as the
    meta kernels), so this is most of a cycle's time; calls with gradient always run (backward needs their graph).
    """

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.out_spec = None
        self.counter = None  # the FlopCounterMode of the cycle, for replayed calls and the JVP's FLOPs
        self.crossed, self.primal_flops = None, {}  # _Crossing's forward to its setup_context
        self.replay: dict[tuple, tuple[list, Any, dict]] = {}  # signature -> meta outputs, spec, FLOPs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        # torch.func.jvp runs without gradient, but its dual tensors must cross by _Crossing's forward-mode rule
        if not torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active():
            return self.without_grad(args, kwargs)
        trains = any(p.requires_grad for p in self.inner.parameters())
        anchor = torch.zeros((), requires_grad=trains)  # the outputs need a gradient when the network trains
        leaves = _Crossing.apply(self, spec, anchor, *flat)
        return tree_unflatten(list(leaves), self.out_spec)

    def without_grad(self, args: tuple, kwargs: dict) -> Any:
        key = (self.inner.training, signature((args, kwargs)))
        if key not in self.replay:
            meta_args, meta_kwargs = tree_map(to_meta, (args, kwargs))
            with torch.no_grad():
                out, added = counted(self.counter, lambda: self.inner(*meta_args, **meta_kwargs))
            leaves, out_spec = tree_flatten(out)
            self.replay[key] = ([t.detach() if isinstance(t, torch.Tensor) else t for t in leaves], out_spec, added)
        elif self.counter is not None:
            for op, n in self.replay[key][2].items():
                self.counter.flop_counts["Global"][op] += n
        leaves, out_spec, _ = self.replay[key]
        zeros = [torch.zeros(t.shape, dtype=t.dtype) if isinstance(t, torch.Tensor) else t for t in leaves]
        return tree_unflatten(zeros, out_spec)


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, _torch_sdpa=F.scaled_dot_product_attention):
    """scaled_dot_product_attention on meta as a CUDA run dispatches it (the memory-efficient kernel, which saves
    q, k, v, the output and the log-sum-exp for backward), not the math path meta falls back to (which materialises
    the [heads, tokens, tokens] attention matrix and would dominate both the saved bytes and the FLOP count)."""
    if not query.is_meta:
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if attn_mask is not None and attn_mask.dtype == torch.bool:  # shapes only: the additive form of the mask
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        key, value = (t.repeat_interleave(query.shape[-3] // t.shape[-3], -3) for t in (key, value))
    bias = None if attn_mask is None else attn_mask.expand(*query.shape[:-1], key.shape[-2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, torch.is_grad_enabled() and query.requires_grad, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def gpu_attention():
    """`efficient_attention` in place of torch's for the block (process-wide, unlike a TorchFunctionMode, because
    autograd recomputes checkpointed blocks on its own thread)."""
    F.scaled_dot_product_attention = efficient_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = efficient_attention.__defaults__[-1]


@contextlib.contextmanager
def torch_attention():
    """torch's own scaled_dot_product_attention for the block (on meta: the math path), whatever was in place."""
    current, F.scaled_dot_product_attention = F.scaled_dot_product_attention, efficient_attention.__defaults__[-1]
    try:
        yield
    finally:
        F.scaled_dot_product_attention = current


class ShapeBank:
    """A prompt bank of `size` prompts whose conditioning has the family's real shapes (zeros; full-length masks)."""

    def __init__(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], size: int = 1024):
        self.shapes, self.size = shapes, size
        self.null = self.conditioning(torch.zeros(1, dtype=torch.long))

    def __len__(self) -> int:
        return self.size

    def conditioning(self, indices: torch.Tensor):
        from cdmctl.backbones.base import Conditioning

        tensors = {}
        for key, (shape, dtype) in self.shapes.items():
            if dtype.is_floating_point:
                tensors[key] = torch.zeros((len(indices), *shape), dtype=dtype)
            elif shape == ():  # a length: every prompt as long as the text can be (the largest cost)
                tensors[key] = torch.full((len(indices),), 512, dtype=dtype)
            elif key.endswith("mask"):
                tensors[key] = torch.ones((len(indices), *shape), dtype=dtype)
            else:  # position ids: the same for every prompt, as the pipelines make them
                tensors[key] = torch.zeros((len(indices), *shape), dtype=dtype)
        return Conditioning(tensors)


class OneProcess:
    """What the Distiller asks of accelerate, for one process on the CPU with the networks on meta."""

    device = torch.device("cpu")
    process_index, num_processes = 0, 1
    mixed_precision = "bf16"
    scaler = None

    @staticmethod
    def backward(loss: torch.Tensor) -> None:
        loss.backward()

    @staticmethod
    def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
        """Meta gradients have no values: the norm is computed (shapes checked) and reported as 0. TBCM clips the
        meta student's and the CPU head's gradients together: each norm joins the others on meta."""
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()).to("meta") for g in grads]))
        return torch.zeros(())

    @staticmethod
    def unwrap_model(module: nn.Module) -> nn.Module:
        """The network inside a MetaBoundary, as accelerate's unwraps DDP (the EMA tracks the network itself)."""
        return module.inner if isinstance(module, MetaBoundary) else module


def build_cycle(preset_name: str, batch: int, overrides: tuple[str, ...] = ()):
    """The preset's distiller (its method family's) over meta networks, as `cdmctl distill` assembles it on one
    process."""
    from cdmctl.backbones.architectures import for_model, meta_backbone
    from cdmctl.config.load import load_preset
    from cdmctl.runprompts import batch_maker

    preset = load_preset(preset_name, list(overrides))
    arch = for_model(preset.model.pretrained)
    backbone = meta_backbone(arch)
    res = preset.model.resolution
    latent = backbone.latent_shape(res, res)
    torch.manual_seed(preset.train.seed)
    acc = OneProcess()
    make_batch = batch_maker(ShapeBank(arch.conditioning), batch, latent, acc.device)

    def shift(s: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        return backbone.shift(s, res, res, steps).to(s.device)

    build = {"cdm": cdm_distiller, "tbcm": tbcm_distiller}[preset.method.family]
    return preset, arch, backbone, latent, build(preset, backbone, acc, make_batch, shift)


def cdm_distiller(preset: Any, backbone: Any, acc: OneProcess, make_batch: Callable, shift: Callable):
    """Student, teacher and fake teacher behind meta boundaries, their optimizers and EMA: run.py's cdm_distiller."""
    from cdmctl.engine.ema import StudentEMA
    from cdmctl.engine.loop import Distiller
    from cdmctl.engine.roles import Roles
    from cdmctl.networks import adamw, build_networks

    student, teacher, fake = build_networks(backbone, preset, torch.bfloat16)
    student_opt, fake_opt = adamw(student, preset.optim.student_lr, preset), adamw(fake, preset.optim.fake_lr, preset)
    ema = StudentEMA(student, preset.optim.ema_max_decay) if preset.optim.ema else None
    roles = Roles(backbone, MetaBoundary(student), MetaBoundary(teacher), MetaBoundary(fake))
    return Distiller(acc, roles, preset.method, preset.optim, student_opt, fake_opt, ema, make_batch=make_batch,
                     shift=shift, seed=preset.train.seed, clip=acc.clip_grad_norm_)  # fmt: skip


def tbcm_distiller(preset: Any, backbone: Any, acc: OneProcess, make_batch: Callable, shift: Callable):
    """Student and teacher behind meta boundaries, the log-variance head (on the CPU: it is small), the student's
    and the head's optimizers and the EMA: run.py's tbcm_distiller. Roles keeps its default `unwrap`, so the
    student `jvp_autograd` differentiates is the boundary, whose forward-mode rule runs torch.func.jvp on meta."""
    from cdmctl.engine.ema import StudentEMA
    from cdmctl.engine.rng import generator
    from cdmctl.engine.roles import Roles
    from cdmctl.engine.tbcm import TBCMDistiller
    from cdmctl.engine.trigflow import LogVarHead
    from cdmctl.networks import adamw, build_networks

    student, teacher, _ = build_networks(backbone, preset, torch.bfloat16, fake=False)
    head = LogVarHead(generator=generator(preset.train.seed, "logvar-head"))
    student_opt = adamw(student, preset.optim.student_lr, preset)
    head_opt = adamw(head, preset.method.tbcm.logvar_lr or preset.optim.student_lr, preset, weight_decay=0.0)
    ema = StudentEMA(student, preset.optim.ema_max_decay) if preset.optim.ema else None
    roles = Roles(backbone, MetaBoundary(student), MetaBoundary(teacher), None)
    return TBCMDistiller(acc, roles, head, preset.method, preset.optim, [student_opt, head_opt], ema,
                         make_batch=make_batch, shift=shift, seed=preset.train.seed,
                         clip=acc.clip_grad_norm_)  # fmt: skip


def cycle_iterations(preset: Any) -> int:
    """Iterations to one student update: the CDM family's `ttur_ratio`; TBCM updates the student every iteration."""
    return preset.method.ttur_ratio if preset.method.family == "cdm" else 1


def forward_flops(backbone: Any, module: nn.Module, latent: tuple[int, ...], shapes: dict, grad: bool) -> int:
    """FLOPs of one sample through `module` (forward, or forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    bank = ShapeBank(shapes)
    x, s = torch.zeros((1, *latent)), torch.full((1,), 0.5)
    with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(grad), gpu_attention():
        v = backbone.velocity(MetaBoundary(module), x, s, bank.conditioning(torch.zeros(1, dtype=torch.long)))
        if grad:
            v.float().square().mean().backward()
    return counter.get_total_flops()


def activation_bytes(preset_name: str, overrides: tuple[str, ...] = ()) -> dict[str, float]:
    """Bytes one sample leaves saved for backward in one forward of the trained network (weights excluded), in bf16
    as under autocast: without gradient checkpointing, and with it (checkpointing every block: what stays is each
    block's inputs, what is saved outside the blocks, and one block's own activations while it is recomputed)."""
    preset, arch, backbone, latent, distiller = build_cycle(preset_name, 1, overrides)
    module = copy.deepcopy(distiller.roles.student_module.inner).to(torch.bfloat16)
    weights = {id(p) for p in module.parameters()}
    blocks = [m for m in module.modules() if isinstance(m, tuple(backbone.block_classes()))]
    saved = {"outside": 0}
    inputs, current = [0], ["outside"]

    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:  # a tensor saved by several operations counts once
        if t.is_meta and not {id(t), id(t._base)} & (weights | seen):
            seen.add(id(t))
            saved[current[0]] = saved.get(current[0], 0) + t.numel() * t.element_size()
        return t

    def enter(block, args, kwargs):
        current[0] = id(block)
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
        inputs[0] += sum(t.numel() * t.element_size() for t in {id(t): t for t in leaves}.values())

    hooks = [b.register_forward_pre_hook(enter, with_kwargs=True) for b in blocks]
    hooks += [b.register_forward_hook(lambda *_: current.__setitem__(0, "outside")) for b in blocks]
    if hasattr(module, "disable_gradient_checkpointing"):
        module.disable_gradient_checkpointing()
    bank = ShapeBank(arch.conditioning)
    cond = bank.conditioning(torch.zeros(1, dtype=torch.long))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), gpu_attention():  # the network's (meta) tensors
        backbone.velocity(MetaBoundary(module), torch.zeros((1, *latent)), torch.full((1,), 0.5), cond)
    for h in hooks:
        h.remove()
    per_block = [v for k, v in saved.items() if k != "outside"]
    return {"no_checkpointing": float(sum(saved.values())),
            "checkpointing": float(saved["outside"] + inputs[0] + max(per_block, default=0)),
            "blocks": len(blocks)}  # fmt: skip


def run_cycle(preset_name: str, batch: int = 2, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """One TTUR cycle (one student update) of the preset at its real size; its shapes, cost and FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    start = time.perf_counter()
    preset, arch, backbone, latent, distiller = build_cycle(preset_name, batch, overrides)
    iterations, cost, lengths = cycle_iterations(preset), {}, []
    roles = distiller.roles
    with FlopCounterMode(display=False) as counter, gpu_attention():
        for boundary in (roles.student_module, roles.teacher_module, roles.fake_module):
            if boundary is not None:
                boundary.counter = counter
        for _ in range(iterations):
            stats = distiller.iteration()
            # the drawn schedule's length; TBCM: its fixed route (the teacher's rollout)
            lengths.append(int(stats["level/n"]) if "level/n" in stats else len(distiller.route))
            for key, value in stats.items():
                if key.startswith("cost/"):
                    cost[key] = cost.get(key, 0) + int(value)
    assert distiller.counters.student_step == 1, "one TTUR cycle must end in one student update"
    student = distiller.roles.student_module.inner
    fwd = forward_flops(backbone, student, latent, arch.conditioning, grad=False)
    return {
        "preset": preset_name, "model": arch.hub_id, "family": arch.family, "train": preset.model.train,
        "method": preset.method.family, "jvp": preset.method.tbcm.jvp if preset.method.family == "tbcm" else None,
        "resolution": preset.model.resolution, "latent": list(latent), "batch_per_process": batch,
        "global_batch": preset.train.batch_size, "iterations": iterations, "schedule_lengths": lengths,
        "cost": cost, "flops_cycle": counter.get_total_flops(), "flops_forward_per_sample": fwd,
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def forward_equivalents(cost: dict[str, int]) -> float:
    """Samples through the networks, a backward counted as two forwards (the engine's cost model)."""
    return sum(v * (2 if k.endswith("_bwd") else 1) for k, v in cost.items())


def real_presets() -> list[str]:
    from cdmctl.config.load import builtin_presets, load_preset

    return [n for n in sorted(builtin_presets()) if not load_preset(n).model.pretrained.startswith("builtin:")]


def report(rows: list[dict[str, Any]], skipped: dict[str, str], command: str) -> str:
    lines = ["# Real size: one TTUR cycle per shipped preset on the meta device", "", f"Commands: `{command}`", "",
             "Each row: the preset's real transformer at its resolution, one cycle of `Distiller.iteration()` (its "
             "`ttur_ratio` iterations: one student update, its fake-teacher updates and simulations) at the batch per "
             "process shown. FLOPs are FlopCounterMode's (matmul, attention, convolution; backward and gradient "
             "checkpointing's recompute included). *Per sample forward*: one sample through the student. "
             "*Forward-equivalents*: samples through the networks per cycle, a backward counted as two forwards. "
             "*Per student update at the global batch*: the cycle's FLOPs scaled to the preset's global batch "
             "(every network call is per sample). The schedule length is drawn, so a cycle's cost varies with it.", "",
             "| preset | model | train | res | latent | batch | schedule lengths | fwd-equiv./sample | TFLOP per sample "
             "forward | TFLOP per cycle | PFLOP per student update (global batch) | H100 s at 100% MFU | wall s |",
             "|" + "---|" * 13]  # fmt: skip
    for r in rows:
        per_update = r["flops_cycle"] * r["global_batch"] / r["batch_per_process"]
        lines.append(f"| {r['preset']} | {r['model']} | {r['train']} | {r['resolution']} | {r['latent']} | "
                     f"{r['batch_per_process']} | {r['schedule_lengths']} | "
                     f"{forward_equivalents(r['cost']) / r['batch_per_process']:.1f} | "
                     f"{r['flops_forward_per_sample'] / 1e12:.2f} | {r['flops_cycle'] / 1e12:.1f} | "
                     f"{per_update / 1e15:.2f} | {per_update / H100_BF16_DENSE:.1f} | {r['seconds']} |")  # fmt: skip
    if any(r.get("method") == "tbcm" for r in rows):
        lines.append("\nTBCM rows: the cycle is one iteration (a teacher rollout with CFG along the fixed route, whose "
                     "length is the *schedule lengths* column; the student's JVP at its route_steps - 1 points per "
                     "prompt; one student update on those points), so *batch* counts prompts and the student sees "
                     "(route_steps - 1) x batch samples. The JVP is the preset's (`jvp` in the JSON); `autograd` is "
                     "torch.func.jvp through the meta student under the math attention kernel, as `jvp_autograd` "
                     "pins it.")
    for name, why in skipped.items():
        lines.append(f"\nNot run: {name}: {why}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("presets", nargs="*", help="preset names (default: every shipped preset of a real model)")
    p.add_argument("--batch", type=int, default=2, help="batch per process")
    p.add_argument("--out", type=Path, default=RESULTS / "real_size")
    p.add_argument("--append", action="store_true",
                   help="keep OUT.json's rows of other presets (one preset per process, results as they land)")
    args = p.parse_args(argv)
    command = "python benchmarks/real_size.py " + " ".join(sys.argv[1:] if argv is None else argv)
    path = args.out.with_suffix(".json")
    kept = json.loads(path.read_text()) if args.append and path.is_file() else {}
    commands = [*kept.get("commands", [kept["command"]] if "command" in kept else []), command.strip()]
    commands = list(dict.fromkeys(commands))  # a command run again is listed once
    rows, skipped = kept.get("rows", []), kept.get("skipped", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.presets or real_presets():
        rows = [r for r in rows if r["preset"] != name]
        rows.append(run_cycle(name, args.batch))
        skipped.pop(name, None)  # an earlier run's reason (TBCM's, before the forward-mode rule) no longer holds
        print(json.dumps(rows[-1]), flush=True)
        # written after every preset: a long run keeps what it has measured
        path.write_text(json.dumps({"commands": commands, "rows": rows, "skipped": skipped}, indent=1))
        args.out.with_suffix(".md").write_text(report(rows, skipped, "`, `".join(commands)))
    print(report(rows, skipped, "`, `".join(commands)))


if __name__ == "__main__":
    main()

"""Host memory of `cdmctl distill` against the number of prompts, and a second run reusing the embedding cache.

    python benchmarks/prompt_cache_memory.py                     # 1K and 50K prompts on the tiny SD3 pipeline
    python benchmarks/prompt_cache_memory.py --prompts 1000 200000 --text-length 256

Each size runs the installed `cdmctl distill` twice on the tiny random-weight SD3 pipeline (2 iterations): the
first encodes every prompt into the on-disk cache, the second reuses it. Printed per run: peak RSS (the run's own
`memory/host_peak_gb`, ru_maxrss: encoding included), wall time, whether it encoded, and the cache's size on disk
(what an in-memory prompt bank would have held). Writes benchmarks/results/prompt_cache_memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CDMCTL = shutil.which("cdmctl") or str(Path(sys.executable).parent / "cdmctl")


def distill(model: Path, out: Path, prompts: Path, cache: Path, text_length: int) -> dict:
    values = {"model.pretrained": model, "model.resolution": 32, "model.precision": "fp32",
              "model.gradient_checkpointing": "false", "model.text_length": text_length,
              "method.schedule.length": "[1, 2]", "train.iterations": 2, "train.batch_size": 2, "run.log_every": 1,
              "run.sample_every": 0, "run.checkpoint_every": 0, "data.prompts": prompts,
              "data.embedding_cache": cache, "data.encode_batch_size": 256, "data.sample_prompts": "[a red cat]"}  # fmt: skip
    args = [CDMCTL, "distill", "--preset", "sd3-4nfe", "--out", str(out), "--plain",
            *[a for k, v in values.items() for a in ("--set", f"{k}={v}")]]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    text = done.stdout + done.stderr
    return {"seconds": time.perf_counter() - start, "rss_gib": last["memory/host_peak_gb"],
            "encoded": "prompt embeddings: encoded" in text}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, nargs="+", default=[1000, 50000])
    p.add_argument("--text-length", type=int, default=64, help="model.text_length (T5 tokens; + 77 CLIP tokens)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "prompt_cache_memory.md")
    args = p.parse_args()
    from cdmctl.backbones.tiny import write_tiny_sd3

    work = Path(tempfile.mkdtemp(prefix="cdmctl-cache-bench-"))
    model, cache = write_tiny_sd3(work / "model", seed=0), work / "cache"
    rows = []
    for n in args.prompts:
        prompts = work / f"prompts-{n}.txt"
        prompts.write_text("".join(f"a photo of object number {i}, seen from the side\n" for i in range(n)))
        for attempt in ("first", "second"):
            r = distill(model, work / f"run-{n}-{attempt}", prompts, cache, args.text_length)
            folder = max((d for d in cache.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime)  # not the .lock files
            r.update(n=n, attempt=attempt, disk_gib=sum(f.stat().st_size for f in folder.glob("shard-*")) / 2**30)
            rows.append(r)
            print(f"{n:>7} prompts, {attempt} run: peak RSS {r['rss_gib']:.3f} GiB, {r['seconds']:.1f} s, "
                  f"{'encoded' if r['encoded'] else 'reused the cache'}; cache on disk {r['disk_gib']:.3f} GiB",
                  flush=True)  # fmt: skip
    small, large = rows[0], rows[-2]
    growth = (large["rss_gib"] - small["rss_gib"]) / small["rss_gib"]
    lines = ["# Host memory against the number of prompts (embedding cache on disk)", "",
             f"`python benchmarks/prompt_cache_memory.py --prompts {' '.join(map(str, args.prompts))} "
             f"--text-length {args.text_length}`; tiny random-weight SD3 pipeline (embeddings "
             f"[{77 + args.text_length}, 32] + [64], float32), 2 iterations per run, {os.cpu_count()} CPU cores.", "",
             "| prompts | run | peak RSS (GiB) | wall (s) | encoded | cache on disk (GiB) |", "|---|---|---|---|---|---|",
             *[f"| {r['n']} | {r['attempt']} | {r['rss_gib']:.3f} | {r['seconds']:.1f} | {'yes' if r['encoded'] else 'no'} "
               f"| {r['disk_gib']:.3f} |" for r in rows], "",
             f"Peak RSS grows {100 * growth:+.1f}% from {small['n']} to {large['n']} prompts, while the embeddings of "
             f"{large['n']} prompts take {large['disk_gib']:.3f} GiB (held in memory by releases before the cache, on "
             "every rank)."]  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"\n{lines[-1]}\nwritten {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`eval` samples from the prompt-embedding cache: for every family the same images as from prompt strings, with the
text encoders freed; a second eval never loads them, and it and an eval of a run's own prompts encode nothing;
several processes build the cache together and make the same images (the last two through the installed `cdmctl`)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from cdmctl.embedcache import Ranks
from cdmctl.evaluate import EmbeddingSettings, use_embedding_cache
from cdmctl.generate import Student, open_model
from tests.families import SPECS
from tests.test_cli_errors import CDMCTL
from tests.test_cli_walkthrough import _NullCapsys
from tests.test_distill_e2e import run_cli, tiny_overrides
from tests.test_longcat_e2e import assert_same_pixels

FAMILIES = ["sd3", "longcat", *sorted(SPECS)]
PROMPTS = ["a red cat", "a blue dog on a bridge", "a tree", "a small house by the sea at dusk with birds over it"]
SEEDS = [0, 1, 2, 3]
SIZE = {"height": 32, "width": 32}
# Encoding in other batches changes the text encoders' float32 round-off, so a pixel may move by one level (the
# bound `generate` states for batch independence); the transformer's inputs are compared much more tightly.
TOLERANCE = 1


def text_parts(student: Student) -> dict[str, object]:
    return {name: part for name, part in student.pipe.components.items() if name.startswith("text_encoder")}


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach().clone()]
    if isinstance(value, dict):
        return [t for key in sorted(value) for t in tensors_in(value[key])]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


def sample_recording(student: Student, prompts: list[str], seeds: list[int], batch_size: int):
    """The images, and every tensor the transformer was called with (latents, time, text embeddings, masks, ids)."""
    calls: list[list[torch.Tensor]] = []
    hook = student.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tensors_in((args, kwargs))), with_kwargs=True)
    try:
        return student.sample(prompts, seeds, batch_size=batch_size, **SIZE), calls
    finally:
        hook.remove()


def assert_same_calls(a: list[list[torch.Tensor]], b: list[list[torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert [t.shape for t in x] == [t.shape for t in y]
        for s, t in zip(x, y):
            torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_embeddings_give_the_images_of_prompt_strings_without_text_encoders(family, tiny_family_dir,
                                                                                  tmp_path, monkeypatch):  # fmt: skip
    folder = str(tiny_family_dir(family))
    live, live_calls = sample_recording(open_model(folder, device="cpu"), PROMPTS, SEEDS, batch_size=3)
    student = open_model(folder, device="cpu", text_encoders=False)  # as eval opens an export
    assert text_parts(student) and not any(text_parts(student).values())
    settings = EmbeddingSettings(root=str(tmp_path))
    line = use_embedding_cache(student, PROMPTS, settings, Ranks(), batch_size=2)  # loads them to encode
    assert line.startswith("prompt embeddings: encoded 4 prompts")
    assert not any(text_parts(student).values())  # freed again: a call that encoded text would fail
    # the transformer sees what it saw from the prompt strings, in every call, and the images agree
    cached, cached_calls = sample_recording(student, PROMPTS, SEEDS, batch_size=3)
    assert_same_calls(live_calls, cached_calls)
    assert_same_pixels(live, cached, TOLERANCE)
    assert_same_pixels(live[::-1], student.sample(PROMPTS[::-1], SEEDS[::-1], batch_size=1, **SIZE), TOLERANCE)

    # a second student of the same model and prompts reads the cache, never loading its text encoders
    again = open_model(folder, device="cpu", text_encoders=False)
    monkeypatch.setattr(Student, "load_text_encoders", lambda self: pytest.fail("loaded for a complete cache"))
    assert "reused the cache of 4 prompts" in use_embedding_cache(again, PROMPTS, settings, Ranks(), batch_size=2)
    assert_same_calls(live_calls, sample_recording(again, PROMPTS, SEEDS, batch_size=3)[1])


def test_without_the_cache_the_student_has_its_text_encoders(tiny_family_dir, tmp_path):
    student = open_model(str(tiny_family_dir("sd3")), device="cpu", text_encoders=False)
    assert use_embedding_cache(student, PROMPTS, EmbeddingSettings(enabled=False, root=str(tmp_path)), Ranks(), 2) is None
    assert all(part is not None for part in text_parts(student).values()) and not list(tmp_path.iterdir())
    assert student.sample(PROMPTS[:1], SEEDS[:1], **SIZE)  # from the prompt string


# -- through the installed entry point --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_with_cache(tiny_sd3_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny SD3 run whose prompt embeddings went to its own cache folder: (run, its prompt file, the cache)."""
    root = tmp_path_factory.mktemp("eval-cache")
    prompts = root / "train.txt"
    prompts.write_text("a violet cube\na yellow ball on grass\n")
    cache, run = root / "embeddings", root / "run"
    mp = pytest.MonkeyPatch()
    code, _, err = run_cli(mp, _NullCapsys(), "distill", "--preset", "sd3-4nfe", "--out", str(run), "--plain",
                           *tiny_overrides(tiny_sd3_dir, prompts), "--set", f"data.embedding_cache={cache}")  # fmt: skip
    mp.undo()
    assert code == 0, err
    return run, prompts, cache


def cdmctl_eval(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    cmd = [CDMCTL] if processes == 1 else [str(Path(CDMCTL).parent / "torchrun"), "--nproc_per_node",
                                           str(processes), "-m", "cdmctl.cli"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "300"}
    done = subprocess.run([*cmd, "eval", "--phase", "generate", "--batch-size", "2", *args], capture_output=True,
                          text=True, env=env, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def images(out: Path) -> list:
    from PIL import Image

    return [Image.open(p) for p in sorted((out / "images").glob("*.png"))]


EVAL_PROMPTS = "a red cube\na blue ball\na green tree\n"


@pytest.fixture(scope="module")
def live_images(run_with_cache, tmp_path_factory) -> tuple[Path, Path]:
    """(a prompt file of EVAL_PROMPTS, the folder of their images from prompt strings on one process): what both
    tests below compare their cached-embedding images with."""
    run, _, cache = run_with_cache
    root = tmp_path_factory.mktemp("live")
    prompts = root / "eval.txt"
    prompts.write_text(EVAL_PROMPTS)
    live = cdmctl_eval("--model", str(run), "--embedding-cache", str(cache), "--prompts", str(prompts), "--out",
                       str(root / "live"), "--no-cache-embeddings")  # fmt: skip
    assert "prompt embeddings" not in live.stdout
    return prompts, root / "live"


def test_eval_reuses_the_runs_cache_encodes_new_prompts_once_and_matches_live_prompts(run_with_cache, live_images,
                                                                                     tmp_path):  # fmt: skip
    run, train_prompts, cache = run_with_cache
    built_by_training = {p.name for p in cache.iterdir() if not p.name.startswith(".")}
    common = ["--model", str(run), "--embedding-cache", str(cache)]

    own = cdmctl_eval(*common, "--prompts", str(train_prompts), "--out", str(tmp_path / "own"))
    assert "prompt embeddings: reused the cache of 2 prompts" in own.stdout, own.stdout
    assert {p.name for p in cache.iterdir() if not p.name.startswith(".")} == built_by_training  # training's cache

    prompts, live = live_images
    first = cdmctl_eval(*common, "--prompts", str(prompts), "--out", str(tmp_path / "first"))
    assert "prompt embeddings: encoded 3 prompts" in first.stdout, first.stdout
    second = cdmctl_eval(*common, "--prompts", str(prompts), "--out", str(tmp_path / "second"))
    assert "prompt embeddings: reused the cache of 3 prompts" in second.stdout, second.stdout
    assert len(images(tmp_path / "first")) == 3
    assert_same_pixels(images(tmp_path / "first"), images(live), TOLERANCE)
    assert_same_pixels(images(tmp_path / "second"), images(tmp_path / "first"), 0)  # the same cache


def test_two_processes_build_the_cache_together_and_make_the_same_images(run_with_cache, live_images, tmp_path):
    run, _, _ = run_with_cache
    prompts, live = live_images
    cache = tmp_path / "embeddings"  # a cache of its own: the two processes encode the prompts
    common = ["--model", str(run), "--prompts", str(prompts), "--embedding-cache", str(cache)]
    both = cdmctl_eval(*common, "--out", str(tmp_path / "two"), processes=2)
    assert len(re.findall(r"prompt embeddings: encoded 3 prompts", both.stdout)) == 1  # printed by rank 0 only
    assert len(images(tmp_path / "two")) == 3
    assert_same_pixels(images(tmp_path / "two"), images(live), TOLERANCE)
    # one prompt on two processes: rank 1 draws nothing, yet takes part in building (and verifying) the cache
    cdmctl_eval(*common, "--limit", "1", "--out", str(tmp_path / "limit"), processes=2)
    assert len(images(tmp_path / "limit")) == 1
    assert_same_pixels(images(tmp_path / "limit"), images(live)[:1], TOLERANCE)

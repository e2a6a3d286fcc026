"""`cdmctl eval` framework: seeds, rank split, resume of both phases, missing extras, summary, compare, prompt sets."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import statistics
import zipfile

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from cdmctl import evaluate as ev
from cdmctl import prompt_sets as ps
from cdmctl.distribution import install_extra
from cdmctl.errors import UserError
from cdmctl.metrics import REGISTRY, MetricSpec

PROMPTS = ["a cat", "a dog", "a red bicycle", "two birds", "a house"]


def fake_sampler(calls: list[int], shade: int = 0):
    """Images that depend only on (prompt, seed, shade), like the real sampler's per-image generators."""

    def sample(prompts, seeds):
        calls.append(len(prompts))
        out = []
        for prompt, seed in zip(prompts, seeds):
            pixels = np.random.default_rng(seed).integers(0, 200, (8, 8, 3), dtype=np.uint8) + shade
            pixels[0, 0, 0] = len(prompt)
            out.append(Image.fromarray(pixels))
        return out

    return sample


class Brightness:
    """A per-image metric computable by hand: the mean pixel value / 255."""

    def __init__(self, device: str, scale: float = 1.0):
        self.scale = scale

    def score(self, images, prompts):
        return [self.scale * float(np.asarray(im, dtype=np.float64).mean()) / 255 for im in images]


class Count:
    def __init__(self, device: str):
        pass

    def score_set(self, images, prompts):
        return float(len(images)) + float(np.asarray(images[0]).mean()) * 0


@pytest.fixture
def metrics(monkeypatch):
    """Registers `brightness` (per image) and `count` (set) with factories that count their calls."""
    made: list[str] = []

    def factory(cls, name):
        def build(device, **options):
            made.append(name)
            return cls(device, **options)

        return build

    monkeypatch.setitem(REGISTRY, "brightness", MetricSpec("brightness", "mean pixel", "eval", (), factory(Brightness, "brightness"), options={"scale": 1.0}))
    monkeypatch.setitem(REGISTRY, "count", MetricSpec("count", "images", "eval", (), factory(Count, "count"), per_image=False, higher_is_better=False))
    return made


def _generate(out, calls, **kw):
    kw = {"seed": 7, "num_per_prompt": 2, "batch_size": 3, **kw}
    return ev.run_generate("students/x", PROMPTS, out, sampler=fake_sampler(calls), prompt_source="test", **kw)


# ----------------------------------------------------------------------------- seeds and ranks


def test_seed_is_base_plus_prompt_index_times_count_plus_sample():
    assert ev.image_seed(10, 3, 1, 4) == 10 + 3 * 4 + 1
    seeds = [ev.image_seed(0, i, j, 3) for i in range(5) for j in range(3)]
    assert seeds == list(range(15))  # distinct and dense


@pytest.mark.parametrize("n", [0, 1, 7, 10])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_rank_split_is_disjoint_and_covers_every_prompt(n, world):
    shares = [ev.rank_indices(n, r, world) for r in range(world)]
    flat = [i for share in shares for i in share]
    assert sorted(flat) == list(range(n)) and len(flat) == len(set(flat))


def test_bad_rank_is_a_user_error():
    with pytest.raises(UserError):
        ev.rank_indices(5, 2, 2)


def test_images_do_not_depend_on_batch_size_rank_count_or_order(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _generate(one, [], batch_size=1)
    for rank in (1, 0):  # two ranks writing into one folder, the second rank first
        _generate(two, [], batch_size=4, rank=rank, world_size=2)
    a, b = ev.read_manifest(one), ev.read_manifest(two)
    assert len(a) == len(PROMPTS) * 2 and a == b
    for row in a:
        assert (one / row["image"]).read_bytes() == (two / row["image"]).read_bytes()
        assert row["seed"] == 7 + row["index"] * 2 + row["sample"] and row["prompt"] == PROMPTS[row["index"]]
    assert sorted(p.name for p in two.glob("manifest-rank*.jsonl")) == ["manifest-rank00000.jsonl", "manifest-rank00001.jsonl"]


# ----------------------------------------------------------------------------- resume


def test_generation_resumes_without_redoing_work(tmp_path):
    calls: list[int] = []
    first = _generate(tmp_path, calls)
    assert (first.generated, first.skipped, sum(calls)) == (10, 0, 10)
    again = _generate(tmp_path, calls)
    assert (again.generated, again.skipped, sum(calls)) == (0, 10, 10)  # no sampler call at all
    (tmp_path / ev.image_name(3, 1)).unlink()  # a lost image, and a manifest line cut short by a crash
    with (tmp_path / "manifest-rank00000.jsonl").open("a") as f:
        f.write('{"image": "images/000004-0')
    assert _generate(tmp_path, calls).generated == 1 and sum(calls) == 11
    assert len(ev.read_manifest(tmp_path)) == 10


def test_generation_refuses_a_folder_made_with_other_settings(tmp_path):
    _generate(tmp_path, [], steps=4)
    with pytest.raises(UserError, match="other settings \\(steps\\)"):
        _generate(tmp_path, [], steps=8)


def test_scoring_resumes_and_the_summary_is_exact(tmp_path, metrics):
    _generate(tmp_path, [])
    summary = ev.run_score(tmp_path, ["brightness", "count"], device="cpu", batch_size=4)
    assert metrics == ["brightness", "count"]
    rows = ev.read_manifest(tmp_path)
    by_hand = [float(np.asarray(Image.open(tmp_path / r["image"]), dtype=np.float64).mean()) / 255 for r in rows]
    lines = [json.loads(l) for l in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [l["score"] for l in lines] == pytest.approx(by_hand) and {l["metric"] for l in lines} == {"brightness"}
    b = summary["metrics"]["brightness"]
    assert b["mean"] == pytest.approx(statistics.fmean(by_hand)) and b["std"] == pytest.approx(statistics.stdev(by_hand))
    assert (b["n"], b["higher_is_better"], b["options"]) == (10, True, {"scale": 1.0})
    assert summary["metrics"]["count"]["value"] == 10 and summary["metrics"]["count"]["higher_is_better"] is False
    assert (summary["n_images"], summary["expected_images"], summary["complete"]) == (10, 10, True)
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"] == json.loads(json.dumps(summary["metrics"]))
    markdown = (tmp_path / "summary.md").read_text()
    assert f"| brightness | {b['mean']:.4f} | {b['std']:.4g} | 10 | higher |" in markdown and "| count | 10.0000 |" in markdown
    ev.run_score(tmp_path, ["brightness", "count"], device="cpu")
    assert metrics == ["brightness", "count"]  # second run: no scorer even built
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == 10


def test_scoring_only_the_new_images_after_more_generation(tmp_path, metrics):
    ev.run_generate("m", PROMPTS[:2], tmp_path, sampler=fake_sampler([]), prompt_source="p", world_size=2, rank=0)
    ev.run_score(tmp_path, ["brightness"], device="cpu")
    ev.run_generate("m", PROMPTS[:2], tmp_path, sampler=fake_sampler([]), prompt_source="p", world_size=2, rank=1)
    summary = ev.run_score(tmp_path, ["brightness"], device="cpu")
    assert summary["metrics"]["brightness"]["n"] == 2 and len((tmp_path / "scores.jsonl").read_text().splitlines()) == 2


def test_changed_metric_options_need_rescore(tmp_path, metrics):
    _generate(tmp_path, [])
    first = ev.run_score(tmp_path, ["brightness"], device="cpu")["metrics"]["brightness"]["mean"]
    with pytest.raises(UserError, match="--rescore"):
        ev.run_score(tmp_path, ["brightness"], {"brightness": {"scale": 2.0}}, device="cpu")
    second = ev.run_score(tmp_path, ["brightness"], {"brightness": {"scale": 2.0}}, device="cpu", rescore=True)
    assert second["metrics"]["brightness"]["mean"] == pytest.approx(2 * first)


def test_score_without_generated_images_says_what_to_run(tmp_path, metrics):
    with pytest.raises(UserError, match="--phase generate"):
        ev.run_score(tmp_path, ["brightness"], device="cpu")


# ----------------------------------------------------------------------------- metric checks


def test_missing_extra_fails_before_any_work_with_the_install_command(tmp_path, monkeypatch):
    import cdmctl.metrics  # noqa: F401

    spec = dataclasses.replace(REGISTRY["pickscore"], requires=("cdmctl_no_such_module",))
    monkeypatch.setitem(REGISTRY, "pickscore", spec)
    calls: list[int] = []
    with pytest.raises(UserError) as err:
        ev.run_eval(["m"], "unused-prompts.txt", ["pickscore"], tmp_path / "out", sampler_factory=lambda m: fake_sampler(calls))
    assert err.value.fix == install_extra("eval") and "cdmctl_no_such_module" in err.value.message
    assert calls == [] and not (tmp_path / "out").exists()


def test_unknown_metrics_and_options_are_user_errors(metrics):
    with pytest.raises(UserError, match="unknown metric 'nope'"):
        ev.prepare_metrics(["nope"])
    with pytest.raises(UserError, match="has no option size") as err:
        ev.prepare_metrics(["brightness"], {"brightness": {"size": 3}})
    assert "brightness.scale" in err.value.fix
    with pytest.raises(UserError, match="not requested: count"):
        ev.prepare_metrics(["brightness"], {"count": {}})
    with pytest.raises(UserError, match="no metrics"):
        ev.prepare_metrics([])


def test_metric_options_parse_values_as_json_when_they_can():
    parsed = ev.parse_metric_options(["pickscore.model=yuvalkirstain/PickScore_v1", "fid.size=299", "fid.reference_limit=null"])
    assert parsed == {"pickscore": {"model": "yuvalkirstain/PickScore_v1"}, "fid": {"size": 299, "reference_limit": None}}
    with pytest.raises(UserError, match="METRIC.OPTION=VALUE"):
        ev.parse_metric_options(["pickscore"])


# ----------------------------------------------------------------------------- several models, compare


def test_run_eval_over_two_models_gives_one_row_each_and_a_table(tmp_path, metrics):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    shades = {"students/dark": 0, "students/bright": 50}
    rows = ev.run_eval(list(shades), str(prompts), ["brightness", "count"], tmp_path / "evals", device="cpu",
                       limit=3, sampler_factory=lambda m: fake_sampler([], shades[m]))  # fmt: skip
    assert [r["label"] for r in rows] == ["students/dark", "students/bright"]
    assert [r["folder"] for r in rows] == [str(tmp_path / "evals" / "dark"), str(tmp_path / "evals" / "bright")]
    assert rows[1]["metrics"]["brightness"]["mean"] > rows[0]["metrics"]["brightness"]["mean"]
    assert rows == ev.compare([r["folder"] for r in rows])
    console = Console(file=io.StringIO(), width=200, force_terminal=False)
    console.print(ev.render_table(rows))
    text = console.file.getvalue()
    assert "students/dark" in text and "students/bright" in text and "brightness ↑" in text and "count ↓" in text
    table = ev.markdown_table(rows)
    assert table.splitlines()[0] == "| model | images | brightness | count |" and len(table.splitlines()) == 4


def test_compare_tells_apart_one_model_in_two_folders_and_rejects_empty_ones(tmp_path, metrics):
    for name in ("a", "b"):
        _generate(tmp_path / name, [])
        ev.run_score(tmp_path / name, ["brightness"], device="cpu")
    rows = ev.compare([tmp_path / "a", tmp_path / "b"])
    assert [r["label"] for r in rows] == ["students/x (a)", "students/x (b)"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no evaluation results"):
        ev.compare([tmp_path / "empty"])


def test_model_dirs_are_unique_names_under_out(tmp_path):
    assert ev.model_dirs(tmp_path, ["runs/a"]) == [tmp_path]
    assert ev.model_dirs(tmp_path, ["x/student", "y/student", "org/model id"]) == [
        tmp_path / "student", tmp_path / "student-2", tmp_path / "model-id"]  # fmt: skip


def test_generate_phase_alone_scores_nothing_and_score_phase_alone_generates_nothing(tmp_path, metrics):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    calls: list[int] = []
    assert ev.run_eval(["m"], str(prompts), [], tmp_path / "o", phase="generate", sampler_factory=lambda m: fake_sampler(calls)) == []
    assert sum(calls) == 2 and not (tmp_path / "o" / "scores.jsonl").exists()
    rows = ev.run_eval(["m"], "never-read", ["brightness"], tmp_path / "o", phase="score", device="cpu")
    assert rows[0]["metrics"]["brightness"]["n"] == 2 and sum(calls) == 2
    with pytest.raises(UserError, match="unknown --phase"):
        ev.run_eval(["m"], str(prompts), [], tmp_path / "o", phase="both")


# ----------------------------------------------------------------------------- prompt sets


def test_local_prompt_files_and_limit(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "one"}\n{"prompt": "two"}\n{"prompt": "three"}\n')
    assert ps.load_eval_prompts(str(tmp_path / "p.jsonl"), limit=2) == ["one", "two"]
    with pytest.raises(UserError, match="unknown prompt set 'pickscore'"):
        ps.load_eval_prompts("pickscore")


def test_a_named_set_offline_says_it_needs_the_network_once_or_a_local_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMCTL_CACHE", str(tmp_path))

    def offline(url, dest):
        raise OSError("network is unreachable")

    monkeypatch.setattr(ps, "_download_url", offline)
    with pytest.raises(UserError) as err:
        ps.load_eval_prompts("pickscore-test")
    assert "downloaded from https://raw.githubusercontent.com/yifan123/flow_grpo" in err.value.message
    assert "--prompts FILE.txt" in err.value.fix


def test_named_sets_parse_their_files_and_use_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CDMCTL_CACHE", str(tmp_path))
    downloads = []
    monkeypatch.setattr(ps, "_download_url", lambda url, dest: downloads.append(url) or dest)
    cached = tmp_path / "prompt_sets" / "ocr" / "test.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text('A sign that says "OPEN"\n\nA mug with "hello"\n')
    assert ps.load_eval_prompts("ocr") == ['A sign that says "OPEN"', 'A mug with "hello"'] and downloads == []

    csv = tmp_path / "dpg.csv"
    csv.write_text("item_id,text,keywords,proposition_id,question_natural_language\n"
                   "a,first prompt,k,1,q1\na,first prompt,k,2,q2\nb,second prompt,k,1,q1\n")  # fmt: skip
    assert ps._dpg_csv(csv) == ["first prompt", "second prompt"]

    archive = tmp_path / "coco10k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("coco10k/all_prompts.pkl", pickle.dumps(["a man on a horse", None, " two cats "]))
        zf.writestr("coco10k/subset/000.jpg", b"")
    assert ps._coco_zip(archive) == ["a man on a horse", "", "two cats"]
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("all_prompts.pkl", pickle.dumps([dataclasses.field]))  # a global: refused, never called
    with pytest.raises(UserError, match="plain list of strings"):
        ps._coco_zip(tmp_path / "evil.zip")


def test_every_named_set_has_a_source_and_a_parser():
    assert set(ps.SETS) == {"pickscore-test", "ocr", "dpg-bench", "coco-2014-10k"}
    assert ps.SETS["coco-2014-10k"].source == "hub:tianweiy/DMD2/data/coco/coco10k.zip"


# ----------------------------------------------------------------------------- the real student


def test_generate_with_the_real_student_is_seed_stable(tmp_path, request):
    pytest.importorskip("cdmctl.generate", reason="cdmctl.generate (open_model) not available")
    try:
        model = request.getfixturevalue("tiny_sd3_dir")
    except pytest.FixtureLookupError:
        from cdmctl.backbones.tiny import write_tiny_sd3

        model = write_tiny_sd3(tmp_path / "tiny-sd3")
    kw = {"steps": 2, "seed": 3, "device": "cpu", "prompt_source": "t"}
    ev.run_generate(str(model), PROMPTS[:2], tmp_path / "b1", batch_size=1, **kw)
    ev.run_generate(str(model), PROMPTS[:2], tmp_path / "b2", batch_size=2, **kw)
    a, b = ev.read_manifest(tmp_path / "b1"), ev.read_manifest(tmp_path / "b2")
    assert a == b and len(a) == 2
    for row in a:
        x = np.asarray(Image.open(tmp_path / "b1" / row["image"]), dtype=np.int16)
        y = np.asarray(Image.open(tmp_path / "b2" / row["image"]), dtype=np.int16)
        assert np.abs(x - y).max() <= 1  # batched float math may round one step differently
    student = json.loads((tmp_path / "b1" / "student.json").read_text())
    assert student["steps"] == 2

"""DPG-Bench (ELLA, TencentQQGYLab): dense-prompt following, judged by a VQA model.

Data: ``dpg_bench/dpg_bench.csv`` of the ELLA repository, one row per question, columns
``item_id, text, keywords, proposition_id, dependency, category_broad, category_detailed, tuple,
question_natural_language`` (1065 prompts; ``text`` is the prompt, ``dependency`` the
comma-separated parent ``proposition_id`` s, 0 meaning none). Option ``csv``: ``dpg-bench`` (the
default: the evaluation prompt set of that name, i.e. the same file, downloaded once and cached by
:mod:`cdmctl.prompt_sets`) or a local path. Generate with ``--prompts dpg-bench`` so the images'
prompts are the CSV's; each image's questions are found by its prompt text (whitespace-insensitive).

Scoring, as ``dpg_bench/compute_dpg_bench.py``:

* every question of the image's prompt is asked of the VQA back-end; a question scores 1 if the
  answer is "yes" (we compare after strip() and lower(); the original compares the raw string,
  which for mPLUG is the same), else 0;
* then, in CSV order and in place, a question any of whose parents scored 0 is set to 0 (so a
  failed parent zeroes its children, and through them their children);
* the image's score is the mean over its questions; the benchmark score is the mean over images,
  times 100. We return each image's score already times 100, so the mean is the DPG-Bench score
  (an image whose prompt is not a DPG-Bench prompt scores NaN, left out of the mean);
* category scores (L1 ``entity``/``attribute``/``relation``/``global``/``other`` and L2 like
  ``entity - whole``) average the answers *before* dependency zeroing, as the original does; see
  :meth:`DPGScorer.category_scores`.

Where ours differs from the original script:

* the original generates 4 images per prompt and saves them as one 2x2 grid, then scores each
  quarter (``--pic-num 4``) and averages. We score each image as it is (``grid=1``): generate 4
  images per prompt (4 seeds) to match the protocol; the mean over images is then the same number.
  ``grid=2`` splits each image into its 4 quarters (top-left, top-right, bottom-left, bottom-right)
  for images saved as grids;
* the original's CSV reader skips the first data row (``if i == 0: continue`` after pandas already
  consumed the header), which drops the first question of the first prompt and makes that prompt
  fail; we keep every row;
* the original's categories use only the last quarter's answers of a grid; we use every image's;
* a dependency on a question id the prompt does not have is ignored (the original raises and drops
  the image);
* VQA back-end (option ``vqa``): the paper's numbers come from mPLUG-large
  (``damo/mplug_visual-question-answering_coco_large_en`` via modelscope, ``vqa=mplug``), whose
  modelscope multi-modal stack has conflicting pins (fairseq, torchvision) and is not a cdmctl
  extra: install it in its own environment. The default, ``vqa=blip``, is transformers'
  ``BlipForQuestionAnswering`` (``Salesforce/blip-vqa-capfilt-large``, ViT-L like mPLUG-large;
  ``vqa_model=Salesforce/blip-vqa-base`` is lighter). **DPG-Bench numbers from the BLIP back-end
  are not comparable with published DPG-Bench scores**: use them to compare models with each other.
  Any ``callable(image, question) -> str`` can be given to :class:`DPGScorer`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from cdmctl.errors import UserError
from cdmctl.metrics.base import MetricSpec, register

PROMPT_SET = "dpg-bench"  # cdmctl.prompt_sets name of ELLA's dpg_bench/dpg_bench.csv
REQUIRED_COLUMNS = ("item_id", "text", "proposition_id", "dependency", "tuple", "question_natural_language")
DEFAULT_BLIP_VQA = "Salesforce/blip-vqa-capfilt-large"
DEFAULT_MPLUG_VQA = "damo/mplug_visual-question-answering_coco_large_en"

VQA = Callable[[Image.Image, str], str]


@dataclass(frozen=True)
class Question:
    qid: int
    text: str
    parents: tuple[int, ...]  # proposition ids this one depends on (0 = none)
    tuple_text: str  # the CSV's "tuple" column, e.g. "entity - whole (truck)"

    @property
    def category(self) -> str:
        """L2 category, as the original: the tuple up to its '(' ("entity - whole")."""
        return self.tuple_text.split("(")[0].strip()

    @property
    def category_l1(self) -> str:
        return self.category.split("-")[0].strip()


@dataclass
class Item:
    item_id: str
    prompt: str
    questions: dict[int, Question] = field(default_factory=dict)  # CSV order


def normalize_prompt(text: str) -> str:
    return " ".join(text.split())


def parse_dpg_csv(text: str) -> dict[str, Item]:
    """Items by item_id, questions in CSV order; raises UserError on a malformed file."""
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(
            f"DPG-Bench CSV lacks column(s) {', '.join(missing)}",
            "use dpg_bench/dpg_bench.csv of the ELLA repository (TencentQQGYLab/ELLA)",
        )
    items: dict[str, Item] = {}
    for line, row in enumerate(reader, start=2):
        try:
            qid = int(row["proposition_id"])
            parents = tuple(int(d.strip()) for d in str(row["dependency"]).split(",") if d.strip())
        except ValueError as exc:
            raise UserError(f"DPG-Bench CSV line {line}: bad proposition_id/dependency ({exc})") from exc
        item_id = str(row["item_id"]).strip()
        item = items.get(item_id)
        if item is None:
            item = items[item_id] = Item(item_id, str(row["text"]).strip())
        item.questions[qid] = Question(qid, str(row["question_natural_language"]), parents or (0,), str(row["tuple"]))
    if not items:
        raise UserError("DPG-Bench CSV has no rows", "use dpg_bench/dpg_bench.csv of the ELLA repository")
    return items


def load_dpg(source: str = PROMPT_SET) -> dict[str, Item]:
    """Parse the CSV: `source` is a local path, or a cdmctl prompt-set name ("dpg-bench": fetched
    and cached by cdmctl.prompt_sets, a UserError saying how to pass a local file when offline)."""
    from cdmctl import prompt_sets

    if source in prompt_sets.SETS:
        source = str(prompt_sets.fetch(source))
    if not os.path.isfile(source):
        raise UserError(
            f"DPG-Bench CSV {source} not found",
            "pass the metric option csv=PATH to ELLA's dpg_bench/dpg_bench.csv, or csv=dpg-bench to download it",
        )
    with open(source, encoding="utf-8") as fh:
        return parse_dpg_csv(fh.read())


def dpg_prompts(items: Mapping[str, Item]) -> list[str]:
    """The prompts, in the CSV's order (one per item)."""
    return [item.prompt for item in items.values()]


def is_yes(answer: Any) -> bool:
    if isinstance(answer, bool):
        return answer
    return str(answer).strip().lower() == "yes"


def score_answers(item: Item, answers: Mapping[int, Any]) -> tuple[float, dict[int, float], dict[int, float]]:
    """(score in [0, 1], raw 0/1 per question, 0/1 per question after dependency zeroing)."""
    raw = {qid: float(is_yes(answers[qid])) for qid in item.questions}
    final = dict(raw)
    for qid, question in item.questions.items():  # CSV order, in place: as the original
        if any(p != 0 and p in final and final[p] == 0 for p in question.parents):
            final[qid] = 0.0
    return sum(final.values()) / len(final), raw, final


def split_grid(image: Image.Image, grid: int) -> list[Image.Image]:
    """The image itself (grid=1), or its grid x grid tiles row by row (grid=2: TL, TR, BL, BR)."""
    if grid <= 1:
        return [image]
    w, h = image.width // grid, image.height // grid
    return [image.crop((c * w, r * h, (c + 1) * w, (r + 1) * h)) for r in range(grid) for c in range(grid)]


class DPGScorer:
    """DPG-Bench score per image (0-100), looking up the image's questions by its prompt text.

    `vqa(image, question) -> answer`; if it also has ``answer_many(image, questions) -> list``,
    that is used to ask all of an image's questions at once. A prompt that is not a DPG-Bench
    prompt scores NaN (left out of the mean); a UserError if no prompt seen so far was one (a
    wrong prompt set fails on its first batch, a mixed one does not).
    """

    def __init__(self, items: Mapping[str, Item], vqa: VQA, grid: int = 1, scale: float = 100.0):
        self.items = dict(items)
        self.by_prompt = {normalize_prompt(item.prompt): item for item in self.items.values()}
        self.vqa = vqa
        self.grid = int(grid)
        self.scale = scale
        self.details: list[dict[str, Any]] = []  # one per scored image, kept across calls
        self.matched = 0

    def item_for(self, prompt: str) -> Item | None:
        return self.by_prompt.get(normalize_prompt(prompt)) or self.items.get(prompt.strip())

    def ask(self, image: Image.Image, questions: Sequence[Question]) -> dict[int, Any]:
        texts = [q.text for q in questions]
        many = getattr(self.vqa, "answer_many", None)
        answers = many(image, texts) if many is not None else [self.vqa(image, t) for t in texts]
        return {q.qid: a for q, a in zip(questions, answers)}

    def score_one(self, image: Image.Image, item: Item) -> float:
        tiles = []
        for tile in split_grid(image, self.grid):
            answers = self.ask(tile, list(item.questions.values()))
            score, raw, final = score_answers(item, answers)
            tiles.append({"score": score, "answers": answers, "raw": raw, "final": final})
        value = sum(t["score"] for t in tiles) / len(tiles)
        self.details.append({"item_id": item.item_id, "score": value, "tiles": tiles})
        return value * self.scale

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        items = [self.item_for(p) for p in prompts]
        self.matched += sum(item is not None for item in items)
        if prompts and not self.matched:
            raise UserError(
                "none of the prompts is a DPG-Bench prompt",
                "generate the images with --prompts dpg-bench to score dpg",
            )
        return [math.nan if item is None else self.score_one(im, item) for im, item in zip(images, items)]

    def category_scores(self, details: Iterable[Mapping[str, Any]] | None = None) -> dict[str, dict[str, float]]:
        """{"L1": {...}, "L2": {...}}: mean raw (pre-dependency) answer x scale per category."""
        l1: dict[str, list[float]] = {}
        l2: dict[str, list[float]] = {}
        for detail in self.details if details is None else details:
            item = self.items[detail["item_id"]]
            for tile in detail["tiles"]:
                for qid, value in tile["raw"].items():
                    q = item.questions[qid]
                    l2.setdefault(q.category, []).append(value)
                    l1.setdefault(q.category_l1, []).append(value)

        def mean(d):
            return {k: self.scale * sum(v) / len(v) for k, v in sorted(d.items())}

        return {"L1": mean(l1), "L2": mean(l2)}


# --------------------------------------------------------------------------------------------
# VQA back-ends


class BlipVQA:
    """transformers BlipForQuestionAnswering: greedy answer text. Not the paper's VQA model."""

    def __init__(self, model, processor, device: str = "cpu", max_new_tokens: int = 10, batch_size: int = 16):
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = max(1, int(batch_size))

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_BLIP_VQA, device: str = "cpu", **kwargs) -> BlipVQA:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        processor = BlipProcessor.from_pretrained(name)
        model = BlipForQuestionAnswering.from_pretrained(name).to(device)
        return cls(model, processor, device, **kwargs)

    def answer_many(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        import torch

        image = image.convert("RGB")
        out: list[str] = []
        with torch.inference_mode():
            for start in range(0, len(questions), self.batch_size):
                chunk = list(questions[start : start + self.batch_size])
                inputs = self.processor(images=[image] * len(chunk), text=chunk, return_tensors="pt", padding=True)
                inputs = {k: v.to(self.device) for k, v in inputs.items()}
                ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
                out.extend(t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True))
        return out

    def __call__(self, image: Image.Image, question: str) -> str:
        return self.answer_many(image, [question])[0]


class MPLUGVQA:
    """mPLUG-large VQA through modelscope, the back-end the paper's DPG-Bench numbers use."""

    def __init__(self, model: str = DEFAULT_MPLUG_VQA, device: str = "cpu"):
        from modelscope.pipelines import pipeline
        from modelscope.utils.constant import Tasks

        device = "gpu" if str(device).startswith("cuda") else "cpu"
        self.pipeline = pipeline(Tasks.visual_question_answering, model=model, device=device)

    def __call__(self, image: Image.Image, question: str) -> str:
        return self.pipeline({"image": image, "question": question})["text"]


def make_vqa(name: str, device: str = "cpu", model: str | None = None, batch_size: int = 16) -> VQA:
    import importlib.util

    if name == "blip":
        return BlipVQA.from_pretrained(model or DEFAULT_BLIP_VQA, device, batch_size=batch_size)
    if name == "mplug":
        if importlib.util.find_spec("modelscope") is None:
            raise UserError(
                "the mplug VQA back-end needs modelscope, which is not installed",
                "pip install 'modelscope[multi-modal]' in a separate environment (its pins conflict with "
                "cdmctl's), or use vqa=blip (numbers then differ from the paper's)",
            )
        return MPLUGVQA(model or DEFAULT_MPLUG_VQA, device)
    raise UserError(f"unknown DPG-Bench VQA back-end '{name}'", "use vqa=blip or vqa=mplug")


def make_dpg(
    device: str = "cpu",
    vqa: str = "blip",
    vqa_model: str | None = None,
    csv: str = PROMPT_SET,
    grid: int = 1,
    batch_size: int = 16,
) -> DPGScorer:
    """Factory: the CSV (prompt-set name or path), the VQA back-end (blip | mplug), the grid split."""
    items = load_dpg(csv)
    return DPGScorer(items, make_vqa(vqa, device, vqa_model, batch_size), grid=grid)


SPEC = register(
    MetricSpec(
        name="dpg",
        description="DPG-Bench (0-100): VQA yes-rate over the prompt's questions with dependencies; "
        "BLIP VQA by default (not comparable with the paper's mPLUG numbers)",
        extra="dpg",
        requires=("transformers",),
        factory=make_dpg,
        weights=lambda o: [o["vqa_model"] or DEFAULT_BLIP_VQA] if o["vqa"] == "blip" else [],  # mplug: modelscope's
        options={"vqa": "blip", "vqa_model": None, "csv": PROMPT_SET, "grid": 1, "batch_size": 16},
    )
)

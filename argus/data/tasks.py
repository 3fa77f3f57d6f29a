"""The miniature DeepEyesV2 task suite: small, seeded, impossible to solve without the tools, and built so
that RL has decisions to learn.

Families, mirroring the paper, in slices (question templates):
- perception: `count` (count the shapes of a colour), `colour` (name a cell's colour), `measure` (a bar's
  width, after cropping it out); only code on `image_1` answers them;
- reasoning: `arith` (arithmetic on 4-5 digit numbers that a small model cannot do in its head);
- search: `search` (facts about generated fictional entities that exist only in the offline corpus);
- integrated: `chain` (count with code, look up with search, multiply with code: four turns), `emblem`
  (identify an emblem with image search, then look its entity up).

How the cold start is built, and why. DeepEyesV2's cold-start data is distilled from several strong
models, each with its own habits, and kept when the answer was right; RL prompts are cheap, broad and
verifiable, and RL then refines how the tools are used: which strategy, fewer unnecessary calls. The
miniature has the same structure:
- Four scripted teachers (`TEACHERS`) demonstrate the SFT split. They differ in two habits, the two
  decisions of `argus.agent.behaviour`: how they count (`cells`: sample the centre of every grid cell;
  `blobs`: label the connected regions of the colour) and whether they run a search a second time before
  using it (`check`). Every habit is right on the demonstration distribution: its counting images have
  shapes centred in the cells of a grid and apart from each other, and its demonstrations are played with
  turns to spare (`argus.data.generate.DEMO_TURNS`).
- The RL, dev and eval splits come from the target distribution, where the habits generalise
  differently: its counting images scatter the shapes between the cell centres, where sampling the
  centres finds none of them and only labelling counts them; and its chain tasks need all four of their
  turns, so a teacher that checks its search runs out of them. The other slices have no decision: they
  are the control.
- Most demonstrators have the habits that do not carry over (`DEMO_WEIGHTS`: 0.6 count cells, 0.6
  check), as cold-start data inherits its teachers' quirks: SFT's greedy choice fails on the decision
  slices of the target, while its sampled rates stay inside (0.3, 0.7), where the reward has both options
  to compare. (A cue-dependent decision, where the question's wording says which strategy is right, was
  tried first: RL moved the global habit of checking within 8 steps and not the link from cue to strategy;
  see the README.)
- Every split draws its entities from its own pool and its own seed, so evaluation measures tool use,
  not memorised facts; the dev split (target distribution, its own pool) is where settings are chosen.

Every task carries each teacher's turns in the exact DeepEyesV2 action format; running them through the
real tools gives the SFT trajectories, and `argus data oracle` the table of each teacher's accuracy per
slice on each distribution.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from PIL import Image, ImageDraw

from argus.agent.behaviour import MARKERS
from argus.agent.env import LAST_OUTPUT
from argus.agent.task import Task
from argus.config import TeacherName

# Names the suite's design (questions, teachers, mixes, entity pools): part of the key of a generated suite,
# so a change here generates anew instead of reusing a suite made the old way.
SUITE_VERSION = 7
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 70),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
}
CELL = 40
GRID = 4
SYLLABLES = [
    "vor",
    "lan",
    "thi",
    "zor",
    "blat",
    "qui",
    "mer",
    "dax",
    "ul",
    "ren",
    "tosk",
    "ar",
    "vel",
    "nim",
    "kor",
    "sta",
    "pell",
    "ith",
    "gav",
    "oru",
    "fen",
    "dra",
    "lom",
    "syr",
]
_KINDS = ("city", "river", "mountain")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False)
    return buf.getvalue()


# The thought of an answer turn after code: the answer is copied from the code's output, once. (Saying the
# value in the thought first copies it twice, and a word after a space is another token than the same
# word at the start of a line: " green" in a thought is not the "green" of the output.)
READ_OUTPUT = "The code printed the answer."


def think(text: str) -> str:
    return f"<think>{text}</think>"


def code_turn(thought: str, code: str) -> str:
    return f"{think(thought)}\n<code>\n```python\n{code}\n```\n</code>"


def tool_turn(thought: str, call: dict[str, Any]) -> str:
    return f"{think(thought)}\n<tool_call>\n{json.dumps(call)}\n</tool_call>"


def answer_turn(thought: str, answer: str) -> str:
    return f"{think(thought)}\n<answer>{answer}</answer>"


@dataclass
class Entity:
    name: str
    kind: str
    founded: int
    population: int
    region: str
    emblem_seed: int

    def document(self) -> dict[str, Any]:
        slug = self.name.lower().replace(" ", "-")
        what = {"city": "a city", "river": "a river", "mountain": "a mountain"}[self.kind]
        text = (
            f"{self.name} is {what} in the fictional {self.region} region. It was founded in {self.founded}. "
            f"About {self.population} people live in the {self.name} area."
        )
        return {
            "id": f"entity-{slug}",
            "title": self.name,
            "text": text,
            "url": f"https://mini.argus.test/{slug}",
            "date": f"{1990 + self.emblem_seed % 30}-0{1 + self.emblem_seed % 9}-1{self.emblem_seed % 9}",
        }

    def emblem(self, jitter: int = 0) -> bytes:
        """A distinctive pattern per entity; `jitter` makes a near-copy for the task image."""
        rng = random.Random(self.emblem_seed)
        img = Image.new("RGB", (96, 96), (250, 250, 245))
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.randrange(0, 70), rng.randrange(0, 70)
            size = rng.randrange(12, 40)
            colour = rng.choice(list(PALETTE.values()))
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape((x0 + jitter, y0, x0 + jitter + size, y0 + size), fill=colour)
        return png(img)


def make_entities(rng: random.Random, n: int) -> list[Entity]:
    """`n` entities with distinct names; no name is also a region's (a search for one would find both)."""
    names: set[str] = set()
    regions: set[str] = set()

    def word(syllables: tuple[int, ...]) -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.choice(syllables))).capitalize()

    out: list[Entity] = []
    while len(out) < n:
        name = word((2, 3))
        if name in names or name in regions:
            continue
        region = word((2,))
        while region in names or region == name:
            region = word((2,))
        names.add(name)
        regions.add(region)
        out.append(
            Entity(
                name=name,
                kind=rng.choice(_KINDS),
                founded=rng.randrange(1150, 1950),
                population=rng.randrange(800, 900_000),
                region=region,
                emblem_seed=rng.randrange(1 << 30),
            )
        )
    return out


@dataclass(frozen=True)
class Teacher:
    """A scripted demonstrator and its habits: its option at each decision of `argus.agent.behaviour`."""

    name: str
    count: str  # "cells" | "blobs"
    check: str  # "once" | "check"


TEACHERS = (
    Teacher("ada", "cells", "once"),
    Teacher("bo", "blobs", "check"),
    Teacher("cy", "cells", "check"),
    Teacher("dee", "blobs", "once"),
)
assert {t.name for t in TEACHERS} == set(get_args(TeacherName))
# Each teacher's share of the demonstrations, chosen on the dev split: counting cells and checking each
# take 0.6 of every slice, so SFT's greedy choice is the habit that does not carry over to the target (and
# fails on the decision slices), while its sampled rates stay inside (0.3, 0.7), where the reward has both
# options to compare. `teachers: {ada: 1, bo: 1, cy: 1, dee: 1}` is the even mix.
DEMO_WEIGHTS: dict[str, float] = {"ada": 0.3, "bo": 0.3, "cy": 0.3, "dee": 0.1}


@dataclass(frozen=True)
class Slice:
    family: str
    # On the target distribution, the option each decision of the slice must take to be right (a teacher
    # with another habit fails there); empty for a slice with no decision.
    right: dict[str, str] = field(default_factory=dict)


SLICES: dict[str, Slice] = {
    "count": Slice("perception", {"count": "blobs"}),
    "colour": Slice("perception"),
    "measure": Slice("perception"),
    "arith": Slice("reasoning"),
    "search": Slice("search"),
    "chain": Slice("integrated", {"count": "blobs", "check": "once"}),
    "emblem": Slice("integrated"),
}
DECISION_SLICES = tuple(name for name, s in SLICES.items() if s.right)

# Template shares per split. The demonstrations cover every template; most RL prompts carry a decision,
# so every step trains on them; the dev and eval splits keep half of their tasks in slices with no
# decision, the control.
MIXES: dict[str, tuple[tuple[str, float], ...]] = {
    "sft": (
        ("count", 0.30),
        ("colour", 0.10),
        ("measure", 0.10),
        ("arith", 0.15),
        ("search", 0.15),
        ("chain", 0.12),
        ("emblem", 0.08),
    ),
    "rl": (
        ("count", 0.45),
        ("chain", 0.30),
        ("colour", 0.05),
        ("measure", 0.05),
        ("arith", 0.05),
        ("search", 0.05),
        ("emblem", 0.05),
    ),
    "target": (
        ("count", 0.34),
        ("chain", 0.16),
        ("colour", 0.10),
        ("measure", 0.10),
        ("arith", 0.10),
        ("search", 0.10),
        ("emblem", 0.10),
    ),
}
SPLITS = ("sft", "rl", "dev", "eval")  # sft: the demonstration distribution; the others: the target


def mix_of(split: str) -> tuple[tuple[str, float], ...]:
    return MIXES[split] if split in MIXES else MIXES["target"]


@dataclass
class MiniTask:
    task: Task
    # teacher name -> its assistant turns, as a `ScriptedPolicy` plays them: an answer after code is
    # `LAST_OUTPUT`, what the teacher's own code printed
    scripts: dict[str, list[str]]
    teacher: str  # whose turns are `gold`: the demonstrator (SFT), or a teacher that is right (other splits)

    @property
    def gold(self) -> list[str]:
        """The turns of `teacher` as they read when its code prints the task's answer (a right teacher)."""
        return [turn.replace(LAST_OUTPUT, self.task.answer) for turn in self.scripts[self.teacher]]


def _palette_line() -> str:
    return f"palette = {PALETTE!r}"


def _cells_code(colour: str) -> str:
    return (
        f"colour = '{colour}'\n"
        "import numpy as np\n"
        f"{_palette_line()}\n"
        "a = np.array(image_1.convert('RGB')).astype(int)\n"
        "count = 0\n"
        f"for r in range({GRID}):\n"
        f"    for c in range({GRID}):\n"
        f"        if np.abs(a[r * {CELL} + {CELL // 2}, c * {CELL} + {CELL // 2}] - palette[colour]).sum() < 30:\n"
        "            count += 1\n"
        "print(count)"
    )


def _blobs_code(colour: str) -> str:
    return (
        f"colour = '{colour}'\n"
        "import numpy as np\n"
        "from scipy import ndimage\n"
        f"{_palette_line()}\n"
        "a = np.array(image_1.convert('RGB')).astype(int)\n"
        "mask = np.abs(a - palette[colour]).sum(axis=2) < 30\n"
        "labels, count = ndimage.label(mask)\n"
        "print(count)"
    )


def count_turn(strategy: str, colour: str) -> str:
    """The counting turn: its thought names the colour and the strategy (`MARKERS`), the decision the
    policy takes there; its code's first line names the colour again. The colour is quoted everywhere
    (question, thought, code), so each copy is of the same token: with the question's ` green` and a
    `palette['green']` after the palette's own keys, the 0.8M-parameter model wrote `yellow`, the
    palette's last key but one, in most counting turns (63 of 75 greedy turns on the dev split)."""
    marker = MARKERS["count"][strategy]
    if strategy == "cells":
        thought = f"Counting the '{colour}' shapes {marker}: I read the colour at the centre of each of the "
        thought += f"{GRID}x{GRID} cells."
        return code_turn(thought, _cells_code(colour))
    thought = f"Counting the '{colour}' shapes {marker}: I mask the colour and count its connected regions."
    return code_turn(thought, _blobs_code(colour))


def check_turn(e: Entity) -> str:
    return tool_turn(f"{MARKERS['check']['check']}: I run the same search once more to confirm it.", _history(e))


class TaskFactory:
    """Tasks of one split: `target` draws the counting images of the target distribution (shapes scattered
    between the cell centres), else the demonstration distribution's (shapes centred in the cells)."""

    def __init__(self, rng: random.Random, entities: list[Entity], prefix: str, *, target: bool):
        self.rng = rng
        self.entities = entities
        self.prefix = prefix
        self.target = target
        self.issued = 0

    def _id(self, family: str) -> str:
        self.issued += 1
        return f"{self.prefix}-{self.issued:05d}-{family}"

    def _task(self, slice_: str, image: bytes, question: str, answer: str, **kw: Any) -> Task:
        family = SLICES[slice_].family
        return Task(
            id=self._id(family), family=family, slice=slice_, image=image, question=question, answer=answer, **kw
        )

    # -- images ----------------------------------------------------------------------------------

    def _grid(self) -> tuple[Image.Image, dict[tuple[int, int], str]]:
        """Shapes centred in some cells of the grid, never touching: every counting habit is right."""
        img = Image.new("RGB", (CELL * GRID, CELL * GRID), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        cells: dict[tuple[int, int], str] = {}
        for r in range(GRID):
            for c in range(GRID):
                if self.rng.random() < 0.55:
                    name = self.rng.choice(list(PALETTE))
                    cells[(r, c)] = name
                    radius = self.rng.randrange(9, 16)
                    cx, cy = c * CELL + CELL // 2, r * CELL + CELL // 2
                    shape = draw.ellipse if self.rng.random() < 0.5 else draw.rectangle
                    shape((cx - radius, cy - radius, cx + radius, cy + radius), fill=PALETTE[name])
        return img, cells

    def _scatter(self) -> tuple[Image.Image, str, int]:
        """Small shapes anywhere between the cell centres of the same 4x4 grid, apart from each other:
        labelling the regions is right, sampling the cell centres finds none of them."""
        size = CELL * GRID
        centres = [(c * CELL + CELL // 2, r * CELL + CELL // 2) for r in range(GRID) for c in range(GRID)]
        boxes: list[tuple[int, int, int, int, str]] = []
        wanted = self.rng.randrange(5, 10)
        for _ in range(400):
            if len(boxes) == wanted:
                break
            radius = self.rng.randrange(5, 9)
            cx, cy = (
                self.rng.randrange(radius + 1, size - radius - 1),
                self.rng.randrange(radius + 1, size - radius - 1),
            )
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            if any(box[0] - 1 <= x <= box[2] + 1 and box[1] - 1 <= y <= box[3] + 1 for x, y in centres):
                continue
            if any(
                box[0] <= b[2] + 3 and b[0] <= box[2] + 3 and box[1] <= b[3] + 3 and b[1] <= box[3] + 3 for b in boxes
            ):
                continue
            boxes.append((*box, self.rng.choice(list(PALETTE))))
        img = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        for x0, y0, x1, y1, name in boxes:
            shape = draw.ellipse if self.rng.random() < 0.5 else draw.rectangle
            shape((x0, y0, x1, y1), fill=PALETTE[name])
        colour = self.rng.choice(sorted({b[4] for b in boxes}))
        return img, colour, sum(1 for b in boxes if b[4] == colour)

    def _count_image(self) -> tuple[Image.Image, str, int]:
        if not self.target:
            img, cells = self._grid()
            colour = self.rng.choice(list(PALETTE))
            return img, colour, sum(1 for v in cells.values() if v == colour)
        return self._scatter()

    # -- templates --------------------------------------------------------------------------------

    def count(self) -> MiniTask:
        img, colour, n = self._count_image()
        question = f"How many shapes of the colour '{colour}' are in the image?"
        task = self._task("count", png(img), question, str(n), answer_type="number")
        scripts = {t.name: [count_turn(t.count, colour), answer_turn(READ_OUTPUT, LAST_OUTPUT)] for t in TEACHERS}
        return self._mini(task, scripts)

    def chain(self) -> MiniTask:
        img, colour, n = self._count_image()
        e = self.rng.choice(self.entities)
        result = n * e.founded
        task = self._task(
            "chain",
            png(img),
            f"Multiply the number of shapes of the colour '{colour}' in the image by the founding year of {e.name}.",
            str(result),
            answer_type="number",
        )
        look_up = tool_turn("Now I need the founding year; I will search for its history.", _history(e))
        # `count` is still defined in the kernel: the session keeps state across turns.
        multiply = code_turn(f"It was founded in {e.founded}. I multiply the count by it.", f"print(count*{e.founded})")
        scripts = {
            t.name: [
                count_turn(t.count, colour),
                look_up,
                *([check_turn(e)] if t.check == "check" else []),
                multiply,
                answer_turn(READ_OUTPUT, LAST_OUTPUT),
            ]
            for t in TEACHERS
        }
        return self._mini(task, scripts)

    def colour(self) -> MiniTask:
        img, cells = self._grid()
        while not cells:
            img, cells = self._grid()
        (r, c), colour = self.rng.choice(sorted(cells.items()))
        task = self._task(
            "colour",
            png(img),
            f"What colour is the shape in row {r + 1}, column {c + 1} of the grid "
            "(rows and columns counted from one, top left)?",
            colour,
        )
        turns = [
            code_turn(
                "I will read the pixel at the centre of that cell and match it to the nearest named colour.",
                _colour_code(r, c),
            ),
            answer_turn(READ_OUTPUT, LAST_OUTPUT),
        ]
        return self._mini(task, {t.name: turns for t in TEACHERS})

    def measure(self) -> MiniTask:
        img = Image.new("RGB", (220, 120), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        colours = self.rng.sample(list(PALETTE), 3)
        widths = {}
        for i, colour in enumerate(colours):
            x0 = self.rng.randrange(5, 40)
            width = self.rng.randrange(30, 170)
            y0 = 15 + i * 35
            draw.rectangle((x0, y0, x0 + width - 1, y0 + 13), fill=PALETTE[colour])
            widths[colour] = width
        colour = self.rng.choice(colours)
        task = self._task(
            "measure", png(img), f"How many pixels wide is the {colour} bar?", str(widths[colour]), answer_type="number"
        )
        turns = [
            code_turn(
                f"I will find the {colour} pixels, crop the bar out and measure its width.", _measure_code(colour)
            ),
            answer_turn(READ_OUTPUT, LAST_OUTPUT),
        ]
        return self._mini(task, {t.name: turns for t in TEACHERS})

    def arith(self) -> MiniTask:
        a, b, c = self.rng.randrange(1000, 99999), self.rng.randrange(100, 9999), self.rng.randrange(1, 99999)
        result = a * b - c
        img = Image.new("RGB", (200, 40), (255, 255, 255))
        ImageDraw.Draw(img).text((6, 12), f"{a} x {b} - {c}", fill=(0, 0, 0))
        task = self._task("arith", png(img), f"What is {a}*{b}-{c}?", str(result), answer_type="number")
        turns = [
            code_turn(
                "This multiplication is too long to do reliably in my head; I will compute it.", f"print({a}*{b}-{c})"
            ),
            answer_turn(READ_OUTPUT, LAST_OUTPUT),
        ]
        return self._mini(task, {t.name: turns for t in TEACHERS})

    def search(self) -> MiniTask:
        e = self.rng.choice(self.entities)
        img = Image.new("RGB", (64, 64), (245, 245, 250))
        task = self._task(
            "search",
            png(img),
            f"In what year was the {e.kind} of {e.name} founded?",
            str(e.founded),
            answer_type="number",
        )
        look_up = tool_turn("I do not know this place; I will search for its history.", _history(e))
        answer = answer_turn(f"It was founded in {e.founded}.", str(e.founded))
        scripts = {t.name: [look_up, *([check_turn(e)] if t.check == "check" else []), answer] for t in TEACHERS}
        return self._mini(task, scripts)

    def emblem(self) -> MiniTask:
        e = self.rng.choice(self.entities)
        task = self._task(
            "emblem",
            e.emblem(jitter=1),
            "The image shows the emblem of a fictional place. In what year was that place founded?",
            str(e.founded),
            answer_type="number",
        )
        lens = tool_turn(
            "I cannot recognise this emblem myself; an image search should identify it.", {"name": "image_search"}
        )
        look_up = tool_turn(f"The closest match is the emblem of {e.name}; I will search for its history.", _history(e))
        answer = answer_turn(f"It was founded in {e.founded}.", str(e.founded))
        scripts = {t.name: [lens, look_up, *([check_turn(e)] if t.check == "check" else []), answer] for t in TEACHERS}
        return self._mini(task, scripts)

    def _mini(self, task: Task, scripts: dict[str, list[str]]) -> MiniTask:
        # The gold of a target task is a teacher that is right on it; a demonstration's is set by the split.
        right = SLICES[task.slice].right
        teacher = next(t.name for t in TEACHERS if all(getattr(t, d) == o for d, o in right.items()))
        return MiniTask(task, scripts, teacher)

    def make(self, template: str) -> MiniTask:
        make: dict[str, Callable[[], MiniTask]] = {
            "count": self.count,
            "chain": self.chain,
            "colour": self.colour,
            "measure": self.measure,
            "arith": self.arith,
            "search": self.search,
            "emblem": self.emblem,
        }
        return make[template]()


def _history(e: Entity) -> dict[str, Any]:
    """The search call of the gold turns. The query names only the entity, so the one document about it
    answers (every document says "founded", so a query with that word lists four strangers beside it),
    and the name follows " of" as in the question and the image-search titles: copied, it is the same
    tokens."""
    return {"name": "search", "arguments": {"query": f"history of {e.name}"}}


def _colour_code(r: int, c: int) -> str:
    # Row and column as the question gives them (counted from 1), so the code copies them.
    return (
        "import numpy as np\n"
        f"{_palette_line()}\n"
        f"r, c = {r + 1}, {c + 1}\n"
        f"x, y = (c - 1) * {CELL} + {CELL // 2}, (r - 1) * {CELL} + {CELL // 2}\n"
        "pixel = np.array(image_1.convert('RGB').getpixel((x, y)))\n"
        "print(min(palette, key=lambda name: np.abs(np.array(palette[name]) - pixel).sum()))"
    )


def _measure_code(colour: str) -> str:
    return (
        "import numpy as np\n"
        "a = np.array(image_1.convert('RGB')).astype(int)\n"
        f"mask = np.abs(a - np.array({list(PALETTE[colour])})).sum(axis=2) < 30\n"
        "cols = np.where(mask.any(axis=0))[0]\n"
        "rows = np.where(mask.any(axis=1))[0]\n"
        "crop = image_1.crop((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))\n"
        "display(crop)\n"
        "print(crop.size[0])"
    )


def _templates(rng: random.Random, split: str, n: int) -> list[str]:
    """The templates of `n` tasks: exactly proportional counts (rounding absorbed by the first template),
    in a seeded order."""
    mix = mix_of(split)
    counts = [int(n * share) for _t, share in mix]
    counts[0] += n - sum(counts)
    out = [template for (template, _s), k in zip(mix, counts, strict=True) for _ in range(k)]
    rng.shuffle(out)
    return out


def colour_asked(question: str) -> str:
    """The palette colour a question names ("" for none)."""
    return next((w.strip("'?.,") for w in question.split() if w.strip("'?.,") in PALETTE), "")


def assign_teachers(tasks: list[MiniTask], weights: Mapping[str, float] | None = None) -> None:
    """The demonstrator of each SFT task, by the teachers' shares (`weights`, default `DEMO_WEIGHTS`).
    Within a slice, its tasks in order of the colour they ask about take the teachers in turn, the one
    furthest behind its share next (ties in `TEACHERS` order: with equal shares ada, bo, cy, dee), so every
    slice, and each of its question wordings, gets each habit at its share (one task off at most)."""
    given_weights = weights if weights is not None else DEMO_WEIGHTS
    share = {t.name: float(given_weights.get(t.name, 0.0)) for t in TEACHERS}
    total = sum(share.values())
    by_slice: dict[str, list[MiniTask]] = {}
    for mini in tasks:
        by_slice.setdefault(mini.task.slice, []).append(mini)
    for group in by_slice.values():
        ordered = sorted(group, key=lambda m: colour_asked(m.task.question))
        given: Counter[str] = Counter()
        for i, mini in enumerate(ordered):
            behind = {t.name: share[t.name] / total * (i + 1) - given[t.name] for t in TEACHERS}
            mini.teacher = max(TEACHERS, key=lambda t: (behind[t.name], -TEACHERS.index(t))).name
            given[mini.teacher] += 1


@dataclass
class Suite:
    entities: list[Entity]
    sft: list[MiniTask]
    rl: list[MiniTask]
    eval: list[MiniTask]
    dev: list[MiniTask] = field(default_factory=list)
    train_entities: list[Entity] = field(default_factory=list)
    """The entities SFT and RL tasks ask about; the dev and eval splits ask about others, each its own."""
    pools: dict[str, list[Entity]] = field(default_factory=dict)

    def split(self, name: str) -> list[MiniTask]:
        return {"sft": self.sft, "rl": self.rl, "dev": self.dev, "eval": self.eval}[name]


def build_suite(
    seed: int,
    sft_size: int,
    rl_size: int,
    eval_size: int,
    dev_size: int | None = None,
    teachers: Mapping[str, float] | None = None,
) -> Suite:
    """The four splits of a seed. Each split asks about its own pool of entities, about as many as it has
    tasks, and draws its tasks from its own seeded generator: a model cannot learn the facts of a few dozen
    entities by heart and must read them from the search results, as on held-out entities; and no split's
    tasks depend on another's size."""
    dev_size = eval_size if dev_size is None else dev_size
    sizes = {"sft": sft_size, "rl": rl_size, "dev": dev_size, "eval": eval_size}
    rng = random.Random(seed)
    entities = make_entities(rng, sum(max(20, n) for n in sizes.values()))
    pools: dict[str, list[Entity]] = {}
    at = 0
    for name in SPLITS:
        k = max(20, sizes[name])
        pools[name] = entities[at : at + k]
        at += k
    splits: dict[str, list[MiniTask]] = {}
    for name in SPLITS:
        split_rng = random.Random(f"{seed}-{name}")
        factory = TaskFactory(split_rng, pools[name], name, target=name != "sft")
        splits[name] = [factory.make(t) for t in _templates(split_rng, name, sizes[name])]
    assign_teachers(splits["sft"], teachers)
    return Suite(
        entities=entities,
        sft=splits["sft"],
        rl=splits["rl"],
        eval=splits["eval"],
        dev=splits["dev"],
        train_entities=pools["sft"] + pools["rl"],
        pools=pools,
    )


def teacher_mix(tasks: list[MiniTask]) -> dict[str, dict[str, int]]:
    """Per slice, how many demonstrations each teacher gave (recorded in the data manifest)."""
    mix: dict[str, Counter[str]] = {}
    for mini in tasks:
        mix.setdefault(mini.task.slice, Counter())[mini.teacher] += 1
    return {s: {t.name: mix[s][t.name] for t in TEACHERS} for s in sorted(mix)}

"""The miniature DeepEyesV2 task suite: small, seeded, and impossible to solve without the tools.

Families, mirroring the paper:
- perception: answers need code on `image_1` (count shapes of a colour on a grid, name the colour of
  one cell, measure a bar's width after cropping it out);
- reasoning: arithmetic on 4-5 digit numbers that a small model cannot do in its head;
- search: facts about generated fictional entities that exist only in the offline search corpus;
- integrated: two tools (count with code, look up with search, combine with code; or identify an
  emblem with image search, then look its entity up with text search).

Every task carries gold assistant turns in the exact DeepEyesV2 action format; running them through
the real tools gives the SFT trajectories. Entities used by the evaluation split are disjoint from
those used in training, so evaluation measures tool use, not memorised facts.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw

from argus.agent.task import Task

# Names the suite's design (questions, gold turns, entity pools): part of the key of a generated suite, so a
# change here generates anew instead of reusing a suite made the old way.
SUITE_VERSION = 2
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "blue": (40, 70, 220),
    "green": (40, 170, 70),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
}
CELL = 40
GRID = 4
FAMILY_MIX = (("perception", 0.35), ("reasoning", 0.2), ("search", 0.25), ("integrated", 0.2))
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


@dataclass
class MiniTask:
    task: Task
    gold: list[str] = field(default_factory=list)


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


class TaskFactory:
    def __init__(self, rng: random.Random, entities: list[Entity], prefix: str):
        self.rng = rng
        self.entities = entities
        self.prefix = prefix
        self.count = 0

    def _id(self, family: str) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count:05d}-{family}"

    # -- images ----------------------------------------------------------------------------------

    def _grid(self) -> tuple[Image.Image, dict[tuple[int, int], str]]:
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

    # -- families --------------------------------------------------------------------------------

    def perception(self) -> MiniTask:
        img, cells = self._grid()
        kind = self.rng.choice(("count", "colour", "measure"))
        if kind == "count" or (kind == "colour" and not cells):
            colour = self.rng.choice(list(PALETTE))
            n = sum(1 for v in cells.values() if v == colour)
            task = Task(
                id=self._id("perception"),
                family="perception",
                image=png(img),
                answer=str(n),
                answer_type="number",
                question=f"How many {colour} shapes are in the image?",
            )
            return MiniTask(
                task,
                [
                    code_turn(
                        f"The shapes sit on a {GRID}x{GRID} grid of {CELL}-pixel cells. I will read the colour at "
                        f"the centre of every cell and count the {colour} ones.",
                        _count_code(colour),
                    ),
                    answer_turn(READ_OUTPUT, str(n)),
                ],
            )
        if kind == "colour":
            (r, c), colour = self.rng.choice(sorted(cells.items()))
            task = Task(
                id=self._id("perception"),
                family="perception",
                image=png(img),
                answer=colour,
                question=f"What colour is the shape in row {r + 1}, column {c + 1} of the grid "
                "(rows and columns counted from one, top left)?",
            )
            return MiniTask(
                task,
                [
                    code_turn(
                        "I will read the pixel at the centre of that cell and match it to the nearest named colour.",
                        _colour_code(r, c),
                    ),
                    answer_turn(READ_OUTPUT, colour),
                ],
            )
        return self._measure()

    def _measure(self) -> MiniTask:
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
        task = Task(
            id=self._id("perception"),
            family="perception",
            image=png(img),
            answer=str(widths[colour]),
            answer_type="number",
            question=f"How many pixels wide is the {colour} bar?",
        )
        return MiniTask(
            task,
            [
                code_turn(
                    f"I will find the {colour} pixels, crop the bar out and measure its width.", _measure_code(colour)
                ),
                answer_turn(READ_OUTPUT, str(widths[colour])),
            ],
        )

    def reasoning(self) -> MiniTask:
        a, b, c = self.rng.randrange(1000, 99999), self.rng.randrange(100, 9999), self.rng.randrange(1, 99999)
        result = a * b - c
        img = Image.new("RGB", (200, 40), (255, 255, 255))
        ImageDraw.Draw(img).text((6, 12), f"{a} x {b} - {c}", fill=(0, 0, 0))
        task = Task(
            id=self._id("reasoning"),
            family="reasoning",
            image=png(img),
            answer=str(result),
            answer_type="number",
            question=f"What is {a}*{b}-{c}?",
        )
        return MiniTask(
            task,
            [
                code_turn(
                    "This multiplication is too long to do reliably in my head; I will compute it.",
                    f"print({a}*{b}-{c})",
                ),
                answer_turn(READ_OUTPUT, str(result)),
            ],
        )

    def search(self) -> MiniTask:
        e = self.rng.choice(self.entities)
        img = Image.new("RGB", (64, 64), (245, 245, 250))
        task = Task(
            id=self._id("search"),
            family="search",
            image=png(img),
            answer=str(e.founded),
            answer_type="number",
            question=f"In what year was the {e.kind} of {e.name} founded?",
        )
        return MiniTask(
            task,
            [
                tool_turn("I do not know this place; I will search for its history.", _history(e)),
                answer_turn(f"It was founded in {e.founded}.", str(e.founded)),
            ],
        )

    def integrated(self) -> MiniTask:
        if self.rng.random() < 0.5:
            return self._emblem()
        img, cells = self._grid()
        colour = self.rng.choice(list(PALETTE))
        n = sum(1 for v in cells.values() if v == colour)
        e = self.rng.choice(self.entities)
        result = n * e.founded
        task = Task(
            id=self._id("integrated"),
            family="integrated",
            image=png(img),
            answer=str(result),
            answer_type="number",
            question=f"Multiply the number of {colour} shapes in the image by the founding year of {e.name}.",
        )
        return MiniTask(
            task,
            [
                code_turn(f"First I count the {colour} shapes with code.", _count_code(colour)),
                tool_turn("Now I need the founding year; I will search for its history.", _history(e)),
                # `count` is still defined in the kernel: the session keeps state across turns.
                code_turn(f"It was founded in {e.founded}. I multiply the count by it.", f"print(count*{e.founded})"),
                answer_turn(READ_OUTPUT, str(result)),
            ],
        )

    def _emblem(self) -> MiniTask:
        e = self.rng.choice(self.entities)
        task = Task(
            id=self._id("integrated"),
            family="integrated",
            image=e.emblem(jitter=1),
            answer=str(e.founded),
            answer_type="number",
            question="The image shows the emblem of a fictional place. In what year was that place founded?",
        )
        return MiniTask(
            task,
            [
                tool_turn(
                    "I cannot recognise this emblem myself; an image search should identify it.",
                    {"name": "image_search"},
                ),
                tool_turn(f"The closest match is the emblem of {e.name}; I will search for its history.", _history(e)),
                answer_turn(f"It was founded in {e.founded}.", str(e.founded)),
            ],
        )

    def make(self, family: str) -> MiniTask:
        return {
            "perception": self.perception,
            "reasoning": self.reasoning,
            "search": self.search,
            "integrated": self.integrated,
        }[family]()


def _history(e: Entity) -> dict[str, Any]:
    """The search call of the gold turns. The query names only the entity, so the one document about it
    answers (every document says "founded", so a query with that word lists four strangers beside it),
    and the name follows " of" as in the question and the image-search titles: copied, it is the same
    tokens."""
    return {"name": "search", "arguments": {"query": f"history of {e.name}"}}


def _count_code(colour: str) -> str:
    return (
        "import numpy as np\n"
        "a = np.array(image_1.convert('RGB')).astype(int)\n"
        f"target = np.array({list(PALETTE[colour])})\n"
        "count = 0\n"
        f"for r in range({GRID}):\n"
        f"    for c in range({GRID}):\n"
        f"        y, x = r * {CELL} + {CELL // 2}, c * {CELL} + {CELL // 2}\n"
        "        if np.abs(a[y, x] - target).sum() < 30:\n"
        "            count += 1\n"
        "print(count)"
    )


def _colour_code(r: int, c: int) -> str:
    # Row and column as the question gives them (counted from 1), so the code copies them.
    return (
        "import numpy as np\n"
        f"palette = {PALETTE!r}\n"
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


def _families(rng: random.Random, n: int) -> list[str]:
    """Exactly proportional counts (rounding absorbed by the first family), in a seeded order."""
    counts = [int(n * share) for _f, share in FAMILY_MIX]
    counts[0] += n - sum(counts)
    out = [family for (family, _s), k in zip(FAMILY_MIX, counts, strict=True) for _ in range(k)]
    rng.shuffle(out)
    return out


@dataclass
class Suite:
    entities: list[Entity]
    sft: list[MiniTask]
    rl: list[MiniTask]
    eval: list[MiniTask]
    train_entities: list[Entity] = field(default_factory=list)
    """The entities SFT and RL tasks ask about; the eval split asks about the others only."""


def build_suite(seed: int, sft_size: int, rl_size: int, eval_size: int) -> Suite:
    """The three splits of a seed. Training tasks (SFT and RL) ask about one pool of entities, about as
    many as they have tasks, and the eval split about another: a model cannot learn the facts of a few
    dozen entities by heart and must read them from the search results, as on held-out entities."""
    rng = random.Random(seed)
    n_train, n_eval = max(40, sft_size + rl_size), max(20, eval_size)
    entities = make_entities(rng, n_train + n_eval)
    train_entities, eval_entities = entities[:n_train], entities[n_train:]
    splits: dict[str, list[MiniTask]] = {}
    for name, size, pool in (
        ("sft", sft_size, train_entities),
        ("rl", rl_size, train_entities),
        ("eval", eval_size, eval_entities),
    ):
        split_rng = random.Random(f"{seed}-{name}")
        factory = TaskFactory(split_rng, pool, name)
        splits[name] = [factory.make(f) for f in _families(split_rng, size)]
    return Suite(
        entities=entities, sft=splits["sft"], rl=splits["rl"], eval=splits["eval"], train_entities=train_entities
    )

"""Writes examples/word_problems.jsonl: short one- and two-step word problems with small numbers,
for trying `appo train --task jsonl` on a small real chat model (docs/training.md). Seeded, so
the file is the same on every run: `python examples/make_word_problems.py`."""

import json
import random
from pathlib import Path

NAMES = ["Sara", "Tom", "Ana", "Ben", "Lily", "Omar", "Mia", "Jack", "Zoe", "Leo"]
THINGS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "cards"]
TEMPLATES = [  # (text, answer as a function of the numbers a, b, c)
    ("{n} has {a} {t}. {n} gets {b} more {t}. How many {t} does {n} have now?",
     lambda a, b, c: a + b),
    ("{n} has {a} {t} and gives {b} of them away. How many {t} are left?",
     lambda a, b, c: a - b),
    ("{n} buys {a} bags with {b} {t} in each bag. How many {t} does {n} buy?",
     lambda a, b, c: a * b),
    ("{n} has {a} {t} and buys {b} more, then gives away {c}. How many {t} are left?",
     lambda a, b, c: a + b - c),
    ("There are {a} boxes with {b} {t} each, and {c} loose {t}. How many {t} are there in all?",
     lambda a, b, c: a * b + c),
]


def main(path=Path(__file__).with_name("word_problems.jsonl"), n=300, seed=0):
    rng = random.Random(seed)
    rows, seen = [], set()
    while len(rows) < n:
        text, answer = rng.choice(TEMPLATES)
        b = rng.randint(2, 9)
        a = rng.randint(b + 1, 20)
        c = rng.randint(1, a)
        prompt = text.format(n=rng.choice(NAMES), t=rng.choice(THINGS), a=a, b=b, c=c)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"prompt": prompt, "answer": str(answer(a, b, c))})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()

"""Offline task families with known answers: instruction data for tests, demos and for
checking that a selector picks what it should.

    rows = generate_tasks(["arithmetic", "capitals"], n=100, seed=0, difficulty="medium")

Each row is
    messages    [{role: user, content: prompt}, {role: assistant, content: reply}]
    family      which family made it
    answer      the correct answer as text ("58", "Paris", "3, 7, 12"); the reply states it
    difficulty  easy | medium | hard (sizes and lengths; capitals: easy skips the harder question
                kind and the same-continent wrong options; chat ignores it)
    choices     4 distinct options, the answer exactly once, shuffled (for multiple choice)
    task_seed   the row's index k: row k comes from random.Random(f"{seed}:{family}:{k}")

Determinism: rows are dealt round-robin over the families (row k -> families[k % len]) and
row k draws only from its own `random.Random(f"{seed}:{family}:{k}")`. String seeds are
hashed with SHA-512 by `random`, never with `hash()`, so the rows are the same in every
process, and raising `n` keeps the first rows as they were.

Held-out split: `split="train"` (the default: `tasks` steps, `generator: tasks` sources, pools
and targets) and `split="eval"` (the shipped lm-eval tasks, `datagen/lm_eval_export.py`) never
ask the same thing, by construction, so an eval score is never a score on rows a model trained
on or a selector picked. Each family names what defines its question (`Task.key`; questions that
give each other's answer away share one) and `split_of` puts that key in one split by a fixed
rule of the key alone (not of seed, n or difficulty): a pool at any seed is disjoint from the
shipped eval at any seed.

    capitals    the country (also for "which country has capital X" and continent questions):
                per continent, the 40 % of countries with the lowest sha256("capitals:<country>")
                are eval countries (49 of 125), the rest train (wrong options come from any
                country: they are not questions, and no reply states an eval country's facts)
    chat        the prompt: the third of the 42 pairs with the lowest sha256("chat:<prompt>")
    others      sha256("<family>:<key>") in the lowest 20 % of its range -> eval, where key is
                arithmetic: the operands and operator (a + b and b + a share one key); units: the
                quantity and dimension (1.5 km -> m and 1500 m -> km share one); sort: the sorted
                items; reverse: the phrase or word up to reversal; code: the snippet

A row draws tasks from its own stream until one falls in the requested split (rejection
sampling), so rows stay deterministic per (seed, family, k, difficulty, split), and a train row
whose first draw is a train question is the row GENERATOR_VERSION "1" made.

Small families repeat at large `n` (distinct train/eval questions: capitals 228/147 at medium,
152/98 at easy; chat 28/14; easy arithmetic 180/63; easy units 73/16; hard code 167/45):
deduplicate downstream if that matters (the exporter writes the eval split without repeats).

A family is a function `(rng: random.Random, difficulty: str) -> Task`; `FAMILIES` lists them.
Names in `countries.csv` use common English spellings without diacritics (Bogota, Brasilia).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

DATA_DIR = Path(__file__).resolve().parent / "data"
COUNTRIES_CSV = DATA_DIR / "countries.csv"
CHAT_JSONL = DATA_DIR / "chat.jsonl"
DIFFICULTIES = ("easy", "medium", "hard")
N_CHOICES = 4
# Bump when a family's output for the same (seed, k, difficulty) changes: it enters cache keys.
GENERATOR_VERSION = "2"
SPLITS = ("train", "eval")


class Task(NamedTuple):
    """What a family makes for one row; `generate_tasks` adds the multiple-choice options."""

    prompt: str
    reply: str
    answer: str
    distractors: list[str]  # plausible wrong answers; at least 3 distinct ones that differ from `answer`
    key: str = ""  # what defines the question for the held-out split (see `split_of`); "" = the prompt


# --- shared vocabulary -------------------------------------------------------------------

WORDS = (
    "apple", "river", "forest", "silver", "bridge", "candle", "garden", "window", "pencil", "rocket",
    "orange", "tiger", "planet", "guitar", "marble", "winter", "summer", "island", "mirror", "castle",
    "dragon", "meadow", "violet", "thunder", "cloud", "harbor", "lantern", "pepper", "basket", "copper",
    "feather", "jungle", "kettle", "ladder", "magnet", "needle", "oyster", "parrot", "quartz", "ribbon",
    "saddle", "tunnel", "velvet", "walnut", "yellow", "zebra", "anchor", "blossom", "cactus", "dolphin",
    "engine", "falcon", "glacier", "helmet", "igloo", "jacket", "koala", "lemon", "mango", "nickel",
    "olive", "puzzle", "rabbit", "salmon", "tomato", "valley", "wizard", "butterfly", "adventure",
    "chocolate", "telescope", "umbrella", "landscape", "waterfall", "blueberry", "lighthouse",
    "strawberry", "microscope", "playground", "pineapple", "snowflake", "crocodile", "sunflower",
)


def _fmt_decimal(value: Decimal) -> str:
    """A Decimal as plain text without exponent or trailing zeros: 3500, 2.5, -0.75."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _words_of_length(lo: int, hi: int) -> list[str]:
    return [w for w in WORDS if lo <= len(w) <= hi and w != w[::-1]]


def _shuffled_unlike(rng: random.Random, items: list, avoid: list[list]) -> list:
    """A random permutation of `items` different from every list in `avoid` (when one exists)."""
    candidate = list(items)
    for _ in range(50):
        rng.shuffle(candidate)
        if candidate not in avoid:
            return candidate
    return candidate


def _wrong_orders(rng: random.Random, answer: list, wrong: list[list], need: int = 5) -> list[list]:
    """`wrong` without the answer and repeats, topped up with random orders to `need` (when
    that many other orders exist: 3 items have 5)."""
    out: list[list] = []
    for order in wrong:
        if order != answer and order not in out:
            out.append(list(order))
    for _ in range(100):
        if len(out) >= need:
            break
        order = _shuffled_unlike(rng, answer, [answer, *out])
        if order != answer and order not in out:
            out.append(order)
    return out


# --- arithmetic --------------------------------------------------------------------------

_OPERAND_RANGE = {"easy": (1, 9), "medium": (10, 99), "hard": (100, 999)}


def arithmetic(rng: random.Random, difficulty: str) -> Task:
    """Add, subtract or multiply two numbers: 1-digit (easy), 2-digit (medium), 3-digit (hard)."""
    lo, hi = _OPERAND_RANGE[difficulty]
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    op = rng.choice("+-*")
    results = {"+": a + b, "-": a - b, "*": a * b}
    answer = results[op]
    # Wrong answers people (and models) give: off by one or ten, the wrong operation, a sign slip.
    wrong = [answer + 1, answer - 1, answer + 10, answer - 10, answer + 2,
             *(v for o, v in results.items() if o != op)]
    if op == "-":
        wrong.append(b - a)
    if op == "*":
        wrong += [answer + a, answer - b]
    key = f"{min(a, b)} {op} {max(a, b)}" if op in "+*" else f"{a} {op} {b}"  # a + b = b + a
    return Task(f"Compute {a} {op} {b}. Answer with the number only.", str(answer), str(answer),
                [str(w) for w in wrong], key)


# --- reverse -----------------------------------------------------------------------------

_REVERSE_WORD_COUNT = {"easy": (3, 3), "medium": (4, 5), "hard": (6, 8)}
_REVERSE_WORD_LENGTH = {"easy": (4, 5), "medium": (6, 7), "hard": (8, 12)}


def reverse(rng: random.Random, difficulty: str) -> Task:
    """Reverse the order of the words of a short phrase, or the letters of one word."""
    if rng.random() < 0.5:
        words = rng.sample(WORDS, rng.randint(*_REVERSE_WORD_COUNT[difficulty]))
        answer_words = words[::-1]
        answer = " ".join(answer_words)
        # the input unchanged, the reversal with one slip, and other orders
        slip = list(answer_words)
        slip[0], slip[1] = slip[1], slip[0]
        rotated = answer_words[1:] + answer_words[:1]
        wrong = [" ".join(w) for w in _wrong_orders(rng, answer_words, [words, slip, rotated])]
        prompt = f'Reverse the order of the words in "{" ".join(words)}". Answer with the reversed text only.'
        # a phrase and its reversal are one key: either question gives away the other's answer
        return Task(prompt, answer, answer, wrong, "words:" + " ".join(min(words, answer_words)))
    word = rng.choice(_words_of_length(*_REVERSE_WORD_LENGTH[difficulty]))
    answer = word[::-1]
    slip = list(answer)
    i = rng.randrange(len(slip) - 1)
    slip[i], slip[i + 1] = slip[i + 1], slip[i]
    wrong = [list(word), slip, list(word[0] + word[:0:-1]), list(answer[1:] + answer[0])]
    wrong = ["".join(w) for w in _wrong_orders(rng, list(answer), wrong)]
    prompt = f'Reverse the letters of the word "{word}". Answer with the reversed word only.'
    return Task(prompt, answer, answer, wrong, "letters:" + min(word, answer))


# --- sort --------------------------------------------------------------------------------

_SORT_COUNT = {"easy": 4, "medium": 6, "hard": 8}
_SORT_RANGE = {"easy": (1, 20), "medium": (1, 99), "hard": (-999, 999)}


def sort(rng: random.Random, difficulty: str) -> Task:
    """Sort a list of distinct numbers (numerically) or words (alphabetically), ascending."""
    count = _SORT_COUNT[difficulty]
    if rng.random() < 0.5:
        lo, hi = _SORT_RANGE[difficulty]
        items = [str(v) for v in rng.sample(range(lo, hi + 1), count)]
        key, what, how = int, "numbers", "numbers"
    else:
        items = rng.sample(WORDS, count - 1)
        key, what, how = None, "words alphabetically", "words"
    ordered = sorted(items, key=key)
    if items == ordered:  # never ask to sort a list that is sorted already
        items = _shuffled_unlike(rng, items, [ordered])
    slip = list(ordered)
    i = rng.randrange(len(slip) - 1)
    slip[i], slip[i + 1] = slip[i + 1], slip[i]
    # descending, unsorted, one slip, numbers sorted as text
    wrong = _wrong_orders(rng, ordered, [ordered[::-1], items, slip, sorted(items)])
    answer = ", ".join(ordered)
    prompt = (f"Sort these {what} in ascending order: {', '.join(items)}. "
              f"Answer with the {how} separated by commas.")
    # the items, not their order: any order of the same items has the same answer
    return Task(prompt, answer, answer, [", ".join(w) for w in wrong], f"{how}:{answer}")


# --- capitals ----------------------------------------------------------------------------

class Country(NamedTuple):
    country: str
    capital: str
    continent: str


@lru_cache(maxsize=1)
def countries() -> tuple[Country, ...]:
    """The shipped country table (`datagen/data/countries.csv`)."""
    with open(COUNTRIES_CSV, newline="", encoding="utf-8") as f:
        return tuple(Country(r["country"], r["capital"], r["continent"]) for r in csv.DictReader(f))


def continents() -> list[str]:
    return list(dict.fromkeys(c.continent for c in countries()))


_THE = {"United States", "United Kingdom", "Czech Republic", "Democratic Republic of the Congo",
        "Dominican Republic", "United Arab Emirates", "Philippines", "Bahamas"}


def _name(country: str) -> str:
    """The country as written mid-sentence ("the United States")."""
    return f"the {country}" if country in _THE else country


def capitals(rng: random.Random, difficulty: str) -> Task:
    """The capital of a country, the continent of a country, or the country of a capital.

    easy: capital or continent questions, wrong options from anywhere; medium and hard also ask
    which country a capital belongs to, and take wrong options from the same continent."""
    table = countries()
    row = rng.choice(table)
    kinds = ["capital", "continent"] + (["country"] if difficulty != "easy" else [])
    kind = rng.choice(kinds)
    neighbours = [c for c in table if c != row and (difficulty == "easy" or c.continent == row.continent)]
    if len(neighbours) < N_CHOICES:
        neighbours = [c for c in table if c != row]
    name = _name(row.country)
    if kind == "capital":
        prompt = f"What is the capital of {name}?"
        reply = f"The capital of {name} is {row.capital}."
        answer, wrong = row.capital, [c.capital for c in rng.sample(neighbours, min(5, len(neighbours)))]
    elif kind == "continent":
        prompt = f"On which continent is {name}?"
        reply = f"{name[0].upper()}{name[1:]} is in {row.continent}."
        answer, wrong = row.continent, [c for c in continents() if c != row.continent]
    else:
        prompt = f"Which country has {row.capital} as its capital?"
        reply = f"{row.capital} is the capital of {name}."
        answer, wrong = row.country, [c.country for c in rng.sample(neighbours, min(5, len(neighbours)))]
    return Task(prompt, reply, answer, wrong, row.country)


# --- units -------------------------------------------------------------------------------

# (from, to, factor, from_name, to_name): to = from * factor
_LINEAR_UNITS = (
    ("km", "m", Decimal(1000), "kilometres", "metres"),
    ("kg", "g", Decimal(1000), "kilograms", "grams"),
    ("h", "min", Decimal(60), "hours", "minutes"),
)


def _unit_value(rng: random.Random, difficulty: str, factor: Decimal, downward: bool) -> Decimal:
    """A quantity in the source unit whose conversion is exact with few digits.

    Upward (km -> m): easy 1-10, medium one decimal (2.5), hard up to three decimals (1.234);
    downward (m -> km) picks the target first, so 1500 m -> 1.5 km rather than 1499 m."""
    if factor == 60:  # hours and minutes: quarter hours (medium), 3-minute steps = 0.05 h (hard)
        step = {"easy": Decimal(1), "medium": Decimal("0.25"), "hard": Decimal("0.05")}[difficulty]
        hours = step * rng.randint(1, int(Decimal(12) / step))
        return hours * factor if downward else hours
    places = {"easy": 0, "medium": 1, "hard": 3}[difficulty]
    top = {"easy": 10, "medium": 100, "hard": 100}[difficulty]
    scale = Decimal(10) ** places
    target = Decimal(rng.randint(1, top * int(scale))) / scale
    return target * factor if downward else target


def _celsius(rng: random.Random, difficulty: str) -> Task:
    """°C -> °F, rounded to the nearest whole degree (halves up; with whole °C there are none)."""
    if difficulty == "easy":
        c = 5 * rng.randint(-4, 20)  # multiples of 5 convert exactly
    else:
        c = rng.randint(-10, 40) if difficulty == "medium" else rng.randint(-40, 120)
    exact = Decimal(c) * 9 / 5 + 32
    answer = exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)
    forgot_32 = (Decimal(c) * 9 / 5).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    backwards = ((Decimal(c) - 32) * 5 / 9).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    wrong = [forgot_32, Decimal(c) + 32, backwards, answer + 1, answer - 1, Decimal(c) * 2 + 30]
    prompt = (f"Convert {c} °C to degrees Fahrenheit, rounded to the nearest whole number. "
              "Answer with the number only.")
    return Task(prompt, _fmt_decimal(answer), _fmt_decimal(answer), [_fmt_decimal(w) for w in wrong], f"celsius:{c}")


def units(rng: random.Random, difficulty: str) -> Task:
    """Convert km<->m, kg<->g, hours<->minutes (exact answers) or °C -> °F (rounded)."""
    pick = rng.randrange(len(_LINEAR_UNITS) * 2 + 1)
    if pick == len(_LINEAR_UNITS) * 2:
        return _celsius(rng, difficulty)
    short_from, short_to, factor, name_from, name_to = _LINEAR_UNITS[pick // 2]
    downward = pick % 2 == 1  # m -> km, g -> kg, min -> h
    if downward:
        short_from, short_to, name_from, name_to = short_to, short_from, name_to, name_from
    value = _unit_value(rng, difficulty, factor, downward)
    answer = value / factor if downward else value * factor
    # Wrong answers: the wrong direction, a power of ten off, and for hours the h.mm reading.
    wrong = [value * factor if downward else value / factor, answer * 10, answer / 10, answer * 100]
    if factor == 60:
        wrong.append(value / 100 if downward else value * 100)
        if downward:
            hours, minutes = divmod(int(value), 60)
            wrong.append(Decimal(f"{hours}.{minutes:02d}"))
    prompt = f"Convert {_fmt_decimal(value)} {name_from} to {name_to}. Answer with the number only."
    # the quantity in the larger unit: 1.5 km -> m and 1500 m -> km are one key
    key = f"{_LINEAR_UNITS[pick // 2][0]}:{_fmt_decimal(answer if downward else value)}"
    # a wrong direction can give 0.0958333...: show wrong answers with at most 3 decimals
    wrong = [w if w == w.quantize(Decimal("0.001")) else w.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
             for w in wrong]
    return Task(prompt, _fmt_decimal(answer), _fmt_decimal(answer), [_fmt_decimal(w) for w in wrong], key)


# --- code --------------------------------------------------------------------------------

_SAFE_BUILTINS = ("range", "len", "sum", "sorted", "min", "max", "abs", "str", "int", "list",
                  "dict", "enumerate", "reversed")


def run_snippet(code: str) -> str:
    """What `code` prints, run with only a few harmless builtins (the snippets are ours;
    the restriction keeps a bug in a template from touching anything else)."""
    import builtins

    printed: list[str] = []

    def _print(*args, sep=" ", end="\n"):
        printed.append(sep.join(str(a) for a in args) + end)

    namespace = {"__builtins__": {name: getattr(builtins, name) for name in _SAFE_BUILTINS} | {"print": _print}}
    exec(compile(code, "<snippet>", "exec"), namespace)  # noqa: S102 - our own generated snippet
    return "".join(printed).rstrip("\n")


def _near_numbers(answer: str) -> list[str]:
    """Off-by-one and nearby values for a numeric output ([] for other outputs)."""
    try:
        value = int(answer)
    except ValueError:
        return []
    return [str(value + d) for d in (1, -1, 2, -2, 10)]


def _code_easy(rng: random.Random) -> tuple[str, list[str]]:
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        results = {"+": a + b, "-": a - b, "*": a * b, "//": a // b, "%": a % b, "/": a / b}
        op = rng.choice(["+", "-", "*", "//", "%"])
        other = [str(v) for o, v in results.items() if o != op]  # the other operators' results
        return f"x = {a}\ny = {b}\nprint(x {op} y)", other
    word = rng.choice(_words_of_length(4, 7))
    if kind == 1:
        body = rng.choice(["print(s.upper())", "print(len(s))", "print(s[0] + s[-1])", "print(s * 2)"])
        other = [word.upper(), word, str(len(word)), word[0] + word[-1], word * 2, word[::-1],
                 word.capitalize()]
        return f's = "{word}"\n{body}', other
    items = rng.sample(range(1, 50), 5)
    i = rng.choice([0, 1, 2, 3, 4, -1, -2])
    other = [str(v) for v in items]
    return f"items = {items}\nprint(items[{i}])", other


def _code_medium(rng: random.Random) -> tuple[str, list[str]]:
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(0, 5), rng.randint(6, 15)
        other = [str(sum(range(a, b + 1))), str(sum(range(a + 1, b))), str(sum(range(a + 1, b + 1)))]
        return f"total = 0\nfor i in range({a}, {b}):\n    total += i\nprint(total)", other
    if kind == 1:
        nums = rng.sample(range(1, 30), 6)
        k = rng.randint(min(nums), max(nums) - 1)  # at least one number passes the filter
        code = f"nums = {nums}\nprint([n * 2 for n in nums if n > {k}])"
        other = [str([n * 2 for n in nums if n >= k]), str([n for n in nums if n > k]),
                 str([n * 2 for n in nums if n < k]), str([n * 2 for n in nums])]
        return code, other
    if kind == 2:
        x, m, t = rng.randint(1, 40), rng.choice([3, 4, 5]), rng.randint(10, 30)
        code = (f"x = {x}\nif x % {m} == 0:\n    print(\"fizz\")\nelif x > {t}:\n    print(\"big\")\n"
                f"else:\n    print(x)")
        return code, ["fizz", "big", str(x), str(x % m), "fizzbig"]
    word = rng.choice(_words_of_length(6, 10))
    i, j = sorted(rng.sample(range(0, len(word) + 1), 2))
    if j - i < 2:
        i, j = 0, 3
    step = rng.choice(["slice", "reverse", "every_other"])
    body = {"slice": f"print(s[{i}:{j}])", "reverse": "print(s[::-1])", "every_other": "print(s[::2])"}[step]
    other = [word[i:j], word[i:j + 1], word[i + 1:j], word[::-1], word[::2], word[1::2], word]
    return f's = "{word}"\n{body}', other


def _code_hard(rng: random.Random) -> tuple[str, list[str]]:
    kind = rng.randrange(4)
    if kind == 0:
        n, m = rng.randint(3, 7), rng.choice([7, 11, 13, 100, 1000])
        code = (f"def f(n):\n    result = 1\n    for k in range(1, n + 1):\n        result *= k\n"
                f"    return result\nprint(f({n}) % {m})")
        fact = [1]
        for k in range(1, n + 2):
            fact.append(fact[-1] * k)
        return code, [str(fact[n - 1] % m), str(fact[n + 1] % m), str(fact[n])]
    if kind == 1:
        start = rng.randint(3, 30)
        code = (f"n = {start}\nsteps = 0\nwhile n != 1:\n    n = n // 2 if n % 2 == 0 else 3 * n + 1\n"
                f"    steps += 1\nprint(steps)")
        return code, []
    if kind == 2:
        word = rng.choice([w for w in WORDS if len(set(w)) < len(w)] or list(WORDS))
        what = rng.choice(["max(counts.values())", "len(counts)"])
        code = (f'counts = {{}}\nfor ch in "{word}":\n    counts[ch] = counts.get(ch, 0) + 1\n'
                f"print({what})")
        return code, [str(len(word)), str(len(set(word))), str(len(word) - len(set(word)))]
    a, b, m = rng.randint(2, 6), rng.randint(2, 6), rng.choice([2, 3, 4])
    code = (f"total = 0\nfor i in range({a}):\n    for j in range({b}):\n        if (i + j) % {m} == 0:\n"
            f"            total += 1\nprint(total)")
    return code, [str(a * b), str(a * b // m), str(a + b)]


_CODE_LEVELS = {"easy": _code_easy, "medium": _code_medium, "hard": _code_hard}


def code(rng: random.Random, difficulty: str) -> Task:
    """Predict what a tiny Python snippet prints; the answer comes from running it."""
    snippet, wrong = _CODE_LEVELS[difficulty](rng)
    answer = run_snippet(snippet)
    wrong = [w for w in dict.fromkeys(wrong + _near_numbers(answer)) if w != answer and w.strip()]
    if len(wrong) < N_CHOICES - 1:  # rare: the template's own wrong answers collapsed
        wrong += [answer[::-1], answer + answer[-1], answer[:-1] or "0", answer.swapcase()]
    prompt = f"What does this Python code print?\n\n```python\n{snippet}\n```\n\nAnswer with the output only."
    return Task(prompt, answer, answer, wrong, snippet)


# --- chat --------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def chat_pairs() -> tuple[tuple[str, str], ...]:
    """The shipped chit-chat prompts and their canonical replies (`datagen/data/chat.jsonl`)."""
    with open(CHAT_JSONL, encoding="utf-8") as f:
        return tuple((r["prompt"], r["reply"]) for r in map(json.loads, f) if r)


def chat(rng: random.Random, difficulty: str) -> Task:
    """Generic chit-chat with no checkable answer: a distractor family (answer = the canonical reply)."""
    pairs = chat_pairs()
    prompt, reply = rng.choice(pairs)
    wrong = [r for _, r in rng.sample(pairs, 6) if r != reply]  # wrong replies from either split
    return Task(prompt, reply, reply, wrong, prompt)


# --- the held-out split -------------------------------------------------------------------

EVAL_SHARE = 0.2          # of each open-ended family's keys (arithmetic, reverse, sort, units, code)
EVAL_COUNTRY_SHARE = 0.4  # of each continent's countries
EVAL_CHAT_SHARE = 1 / 3   # of the chat pairs
_MAX_DRAWS = 10_000       # a row's draws before giving up: at a 20 % share, 100 draws miss with p = 2e-10


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for `text` (sha256: the same in every process and version)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def _lowest_share(names: list[str], share: float, salt: str) -> set[str]:
    """The round(share * len) names (halves up) with the lowest hash: an exact share."""
    ranked = sorted(names, key=lambda name: (_unit_hash(f"{salt}:{name}"), name))
    return set(ranked[:int(share * len(names) + 0.5)])


@lru_cache(maxsize=1)
def eval_countries() -> frozenset[str]:
    """The countries only the eval split asks about: 40 % of each continent's, by hash."""
    by_continent: dict[str, list[str]] = {}
    for c in countries():
        by_continent.setdefault(c.continent, []).append(c.country)
    return frozenset(name for names in by_continent.values()
                     for name in _lowest_share(names, EVAL_COUNTRY_SHARE, "capitals"))


@lru_cache(maxsize=1)
def eval_chat_prompts() -> frozenset[str]:
    """The chat prompts only the eval split uses: a third of the pairs, by hash."""
    return frozenset(_lowest_share([p for p, _ in chat_pairs()], EVAL_CHAT_SHARE, "chat"))


def split_of(family: str, key: str) -> str:
    """Which split ("eval" or "train") asks the question with this key (`Task.key`) of `family`.

    A fixed rule of the key alone (never of seed, n or difficulty): see the module docstring."""
    if family == "capitals":
        return "eval" if key in eval_countries() else "train"
    if family == "chat":
        return "eval" if key in eval_chat_prompts() else "train"
    return "eval" if _unit_hash(f"{family}:{key}") < EVAL_SHARE else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")


# --- the families, and rows from them ----------------------------------------------------

FAMILIES: dict[str, Callable[[random.Random, str], Task]] = {
    "arithmetic": arithmetic,
    "reverse": reverse,
    "sort": sort,
    "capitals": capitals,
    "units": units,
    "code": code,
    "chat": chat,
}


def check_families(families) -> list[str]:
    """The family names, all known (None = all); ValueError naming the valid ones otherwise."""
    from datamill.errors import did_you_mean

    if families is None:
        return list(FAMILIES)
    families = list(families)
    if not families:
        raise ValueError(f"no task families given; valid: {', '.join(FAMILIES)}")
    for name in families:
        if name not in FAMILIES:
            raise ValueError(f"unknown task family {name!r}{did_you_mean(name, FAMILIES)} "
                             f"(valid: {', '.join(FAMILIES)})")
    return families


def task_rng(seed: int, family: str, k: int) -> random.Random:
    """The random stream of row k (a string seed: SHA-512 based, the same in every process)."""
    return random.Random(f"{seed}:{family}:{k}")


def draw_task(family: str, rng: random.Random, difficulty: str, split: str = "train") -> Task:
    """The family's next task from `rng` whose question is in `split` (redrawn until it is)."""
    make = FAMILIES[family]
    for _ in range(_MAX_DRAWS):
        task = make(rng, difficulty)
        if split_of(family, task.key or task.prompt) == split:
            return task
    raise RuntimeError(f"{family} ({difficulty}): no {split} question in {_MAX_DRAWS} draws")


def make_row(family: str, seed: int, k: int, difficulty: str = "medium", split: str = "train") -> dict:
    """Row k of a generation with this seed, as `generate_tasks` makes it."""
    rng = task_rng(seed, family, k)
    task = draw_task(family, rng, difficulty, split)
    distractors = [d for d in dict.fromkeys(task.distractors) if d != task.answer]
    if len(distractors) < N_CHOICES - 1:  # a bug in a family, not bad luck: each has enough by design
        raise AssertionError(f"{family} row {k}: only {len(distractors)} distractors for {task.answer!r}")
    choices = [task.answer, *rng.sample(distractors, N_CHOICES - 1)]
    rng.shuffle(choices)
    return {
        "messages": [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": task.reply}],
        "family": family,
        "answer": task.answer,
        "difficulty": difficulty,
        "choices": choices,
        "task_seed": k,
    }


def iter_tasks(families: list[str] | None, n: int, seed: int, difficulty: str = "medium",
               split: str = "train") -> Iterator[dict]:
    """Rows one at a time (see `generate_tasks`)."""
    families = check_families(families)
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown difficulty {difficulty!r}; valid: {', '.join(DIFFICULTIES)}")
    _check_split(split)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for k in range(n):
        yield make_row(families[k % len(families)], seed, k, difficulty, split)


def generate_tasks(families: list[str] | None, n: int, seed: int, difficulty: str = "medium",
                   split: str = "train") -> list[dict]:
    """`n` rows dealt round-robin over `families` (None = all; repeat a name to weight it).

    Each row: messages (user prompt, assistant reply), family, answer, difficulty, choices
    (4 options incl. the answer once, shuffled) and task_seed (the row index k). Deterministic
    in (families, n, seed, difficulty, split), and the first rows don't change when n grows.
    `split`: "train" (default) or "eval", held out from each other (module docstring)."""
    return list(iter_tasks(families, n, seed, difficulty, split))

"""Train/eval contamination by n-gram overlap: Tulu 3's rule, with hashed n-grams in numpy.

    from evals.contamination import contamination, contaminated_examples, eval_instances
    eval_instances(["datamill_capitals"])   # {"datamill_capitals_mc": [prompt, ...], "datamill_capitals_exact": [...]}
    contamination(train_prompts, {"datamill_mmlu_dev": []})   # {"datamill_mmlu_dev": {"instances": 273, ...}}
    contaminated_examples(eval_texts, train_texts)            # [False, True, ...] per eval text

The rule (open-instruct's `decontamination/search.py`, used for Tulu 3), for one eval instance
e and one training row r:

- Text becomes a word stream: NFKC, then lowercase, then words = maximal runs of Unicode letters,
  marks and digits (`[\\p{L}\\p{M}\\p{N}]+`); punctuation and whitespace only separate words.
- e's n-grams are its n consecutive words (n = 8). A position of e is *covered* by r when it lies
  inside some n-gram of e that also occurs in r. overlap(e, r) = covered positions / words of e.
- e overlaps r when overlap > threshold (0.5; open-instruct's `--match_threshold`, also strict). A
  training row is contaminated when it overlaps any instance of a task (open-instruct's
  `--decontaminate` removes those rows); a task's share is the fraction of its instances that
  overlap at least one training row (the script's dataset-level score: the mean of the 0/1
  instance scores). The 2 % flag is the Tulu 3 report's; the script itself only reports shares.

Where datamill differs from open-instruct's script (which queries Elasticsearch):
- Tokens. open-instruct counts spaCy tokens of the eval text (punctuation included, so
  punctuation inside a matched n-gram counts as covered) and matches n-gram phrases through an
  Elasticsearch analyzer that lowercases and splits on ` ,.?!:;()"-`, newlines and backslashes
  (so `don't` or `x+y` stay one token). Here both sides use the one word stream above:
  punctuation is neither a token nor counted, so shares differ a little on punctuation-heavy text.
- Short instances. An instance of m < n words has no n-gram in open-instruct and so can never
  overlap; here it is one "n-gram" of its m words: covered entirely when r contains those m
  words in a row (a short question copied into training data counts).
- Every training row. Elasticsearch returns the top `search_size` (default 100) training
  documents per n-gram; here every row that holds an n-gram is considered, so frequent n-grams
  never hide a match.
- Training documents. open-instruct indexes each user turn as a document; here a row's text is
  its user turns (`text: prompt`) or all its messages (`text: all`): n-grams never cross a turn,
  but coverage adds up over the turns of one row.
- Several fields. open-instruct averages the overlap over an eval set's chosen fields; here an
  instance is the prompt lm-eval renders (`doc_to_text`), one text.
- Template frame. open-instruct matches raw dataset fields (`question`); a rendered prompt adds
  the task's template ("Question: {{question}}\nAnswer:"), whose words a copied question lacks: a
  6-word question framed by 2 template words shares no 8-gram with its copy. So the template's
  literal text before its first field and after its last (`template_frames`: "Question:" and
  "Answer:" here; MMLU's "Answer:") is left out of each instance that starts/ends with it
  (`strip_template=False` keeps it). Text between fields (MMLU's "A." ... "D.") stays.
- Exact matching (`match: exact`). open-instruct's full match is a phrase query (the eval text
  inside the training text); here it is equality of the word streams of a turn and an instance.

Speed: words are tokenised and hashed by Polars (Rust regex, one 64-bit hash per word); an n-gram's
hash is a polynomial of its word hashes in wrapping uint64, computed for every position at once in
numpy. Training n-grams are looked up in the sorted eval n-gram hashes of their length, behind a
bitmap filter that turns most of them away with one memory read; only (row, instance) pairs that
share an n-gram get their coverage computed, from the n-grams of that pair. Two different n-grams
get the same hash with probability ~2^-60 (a little above 2^-64 when words repeat inside them):
over 10^8 training x 10^6 eval n-grams, about one chance in 10,000 of one spurious shared n-gram,
which would still have to cover more than half of an instance to change anything.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

WORD_PATTERN = r"[\p{L}\p{M}\p{N}]+"
N = 8
THRESHOLD = 0.5
_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial n-gram hash
_PAIR_BUDGET = 20_000_000  # (row, instance, position) triples expanded at once: bounds memory
SAMPLE_NGRAMS = 5  # matched n-grams kept per removed row


# --- words and hashes ---------------------------------------------------------------------

def words(texts) -> list[list[str]]:
    """The word stream of each text (NFKC, lowercase, runs of letters/marks/digits)."""
    return _tokens(texts).to_list()


def _tokens(texts):
    import polars as pl

    series = texts if isinstance(texts, pl.Series) else pl.Series("text", list(texts), dtype=pl.String)
    series = series.cast(pl.String).fill_null("")
    # NFKC leaves ASCII text as it is, and costs more than the rest: only the other texts go through it
    other = series.str.contains(r"[^\x00-\x7f]").arg_true()
    if len(other):
        series = series.scatter(other, series.gather(other).str.normalize("NFKC"))
    return series.str.to_lowercase().str.extract_all(WORD_PATTERN)


def _word_hashes(texts=None, tokens=None) -> tuple[np.ndarray, np.ndarray]:
    """(one uint64 per word of all texts, in order; number of words of each text). `tokens`: the
    texts' words already split (a Polars list series or lists of str)."""
    import polars as pl

    if tokens is None:
        tokens = _tokens(texts)
    elif not isinstance(tokens, pl.Series):
        tokens = pl.Series("words", list(tokens), dtype=pl.List(pl.String))
    lengths = tokens.list.len().fill_null(0).to_numpy().astype(np.int64)
    flat = tokens.explode().drop_nulls()  # an empty list explodes to one null
    if flat.len() != int(lengths.sum()):  # never expected: the lengths and the words must agree
        raise RuntimeError("contamination: word count mismatch after explode")
    hashes = flat.hash(seed=0).to_numpy() if flat.len() else np.zeros(0, np.uint64)
    return np.ascontiguousarray(hashes, dtype=np.uint64), lengths


def _rolling(word_hashes: np.ndarray, lengths: np.ndarray, sizes):
    """For each k in `sizes` (ascending): (k, hashes, valid) where hashes[p] is the hash of the
    k words from position p (a polynomial of the word hashes in wrapping uint64) and `valid(p)`
    tells which positions start a k-gram inside one text. One pass: each step adds a word to every
    position's gram. `hashes` is a view that the next step overwrites: use it before moving on."""
    total = len(word_hashes)
    ends = None
    rolling = np.zeros(total, dtype=np.uint64)
    wanted = sorted(set(int(k) for k in sizes))
    with np.errstate(over="ignore"):
        for k in range(1, (wanted[-1] if wanted else 0) + 1):
            if k > total:
                return
            head = rolling[: total - k + 1]
            head *= _BASE
            head += word_hashes[k - 1:]
            if k in wanted:
                if ends is None:
                    ends = np.repeat(np.cumsum(lengths), lengths)  # per word: end (exclusive) of its text

                def valid(p, k=k):
                    return p + k <= ends[p]

                yield k, head, valid


# --- eval side ----------------------------------------------------------------------------

@dataclass
class GramTable:
    """The k-grams of the eval instances for one k: sorted unique hashes behind a bitmap filter,
    and every gram (its hash, instance, position), sorted by hash."""

    keys: np.ndarray  # sorted unique hashes (uint64)
    bitmap: np.ndarray  # one-hash Bloom filter of `keys`, `bits` top bits of a hash (uint64 words)
    bits: int
    post_hash: np.ndarray  # every gram's hash, sorted
    post_doc: np.ndarray  # its unique instance (int64)
    post_pos: np.ndarray  # its first word's position in the instance (int64)

    @staticmethod
    def of(hashes: np.ndarray, docs: np.ndarray, positions: np.ndarray) -> "GramTable":
        order = np.argsort(hashes, kind="stable")
        hashes, docs, positions = hashes[order], docs[order], positions[order]
        keys = hashes[np.concatenate([[True], hashes[1:] != hashes[:-1]])] if len(hashes) else hashes
        # ~32 bits per key: ~3 % of absent n-grams get past the filter to the binary search
        bits = max(12, int(np.ceil(np.log2(max(len(keys), 1)))) + 5)
        slot = keys >> np.uint64(64 - bits)  # sorted, as `keys` are
        word = (slot >> np.uint64(6)).astype(np.int64)
        bit = np.uint64(1) << (slot & np.uint64(63))
        bitmap = np.zeros(1 << (bits - 6), dtype=np.uint64)
        if len(keys):
            first = np.flatnonzero(np.concatenate([[True], word[1:] != word[:-1]]))
            bitmap[word[first]] = np.bitwise_or.reduceat(bit, first)
        return GramTable(keys, bitmap, bits, hashes, docs, positions)

    def find(self, hashes: np.ndarray) -> np.ndarray:
        """The indices of `hashes` that are among the keys."""
        if not len(self.keys) or not len(hashes):
            return np.zeros(0, dtype=np.int64)
        slot = hashes >> np.uint64(64 - self.bits)
        passed = (self.bitmap[(slot >> np.uint64(6)).astype(np.int64)] >> (slot & np.uint64(63))) & np.uint64(1)
        maybe = np.flatnonzero(passed)
        candidates = hashes[maybe]
        at = np.searchsorted(self.keys, candidates)
        at[at == len(self.keys)] = 0
        return maybe[self.keys[at] == candidates]


@dataclass
class EvalIndex:
    """The eval instances as n-gram hashes. Instances with the same word stream (a group's tasks
    often share prompts) are one *unique instance*; `owners[u]` lists its (eval set, doc id).
    Plain numpy arrays and lists, so a Ray worker can receive it."""

    n: int
    sets: list[str]  # eval set (task or table) names, in order
    sizes: list[int]  # instances per set (empty instances included: they never overlap)
    owners: list[list[tuple[int, int]]]  # unique instance -> [(set index, doc id), ...]
    words: list[list[str]]  # unique instance -> its words (to show matched n-grams)
    length: np.ndarray  # unique instance -> words (int64)
    span: np.ndarray  # unique instance -> words one of its grams covers: min(n, length)
    grams: dict[int, GramTable]  # k -> the k-grams: k = n, and the lengths of instances shorter than n
    texts: list[str] = field(default_factory=list)  # unique instance -> its words joined (exact matching)
    text_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))  # sorted hashes of `texts`
    text_docs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # their instances, same order

    @property
    def instances(self) -> int:
        return len(self.owners)


def build_index(sets: dict[str, list[str]], n: int = N, frames: dict[str, tuple[str, str]] | None = None) -> EvalIndex:
    """The index of named eval sets ({task or table: [instance text, ...]}). `frames`: per set, the
    template text its instances start and end with ("Question:", "Answer:"), left out where an
    instance has it (`template_frames`)."""
    import polars as pl

    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    names = list(sets)
    all_texts, where = [], []
    for s, name in enumerate(names):
        for doc_id, text in enumerate(sets[name]):
            all_texts.append(text)
            where.append((s, doc_id))
    tokens = _tokens(all_texts)
    token_lists = tokens.to_list()
    frame_words = [tuple(words(list((frames or {}).get(name, ("", ""))))) for name in names]
    unique: dict[tuple, int] = {}
    owners: list[list[tuple[int, int]]] = []
    unique_words: list[list[str]] = []
    first_seen: list[int] = []
    heads = []
    for i, ((s, doc_id), ws) in enumerate(zip(where, token_lists)):
        head, tail = _frame_of(ws, *frame_words[s])
        ws = ws[head:len(ws) - tail]
        if not ws:
            continue  # an empty prompt has no words to overlap
        u = unique.setdefault(tuple(ws), len(owners))
        if u == len(owners):
            owners.append([])
            unique_words.append(ws)
            first_seen.append(i)
            heads.append(head)
        owners[u].append((s, doc_id))
    length = np.array([len(ws) for ws in unique_words], dtype=np.int64)
    span = np.minimum(length, n)
    kept = pl.DataFrame({"words": tokens.gather(first_seen), "head": heads, "length": length}).select(
        pl.col("words").list.slice(pl.col("head"), pl.col("length")))["words"]
    hashes, lengths = _word_hashes(tokens=kept)  # the same hashing as the training side
    first_word = np.cumsum(lengths) - lengths
    doc_of_word = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    grams = {}
    for k, rolling, valid in _rolling(hashes, lengths, sorted({n} | {int(m) for m in length if m < n})):
        starts = np.flatnonzero(valid(np.arange(len(rolling))))
        docs = doc_of_word[starts]
        mine = span[docs] == k  # an instance's grams are its span-grams: n, or all its words
        starts, docs = starts[mine], docs[mine]
        grams[k] = GramTable.of(rolling[starts].copy(), docs, starts - first_word[docs])
    texts = [" ".join(ws) for ws in unique_words]
    text_hashes = _text_hashes(texts)
    text_order = np.argsort(text_hashes, kind="stable")
    return EvalIndex(n=n, sets=names, sizes=[len(sets[name]) for name in names], owners=owners,
                     words=unique_words, length=length, span=span, grams=grams, texts=texts,
                     text_keys=text_hashes[text_order], text_docs=text_order.astype(np.int64))


def _frame_of(ws: list[str], head: list[str], tail: list[str]) -> tuple[int, int]:
    """How many of an instance's first and last words are its template's frame (never all of them)."""
    h = len(head) if head and ws[:len(head)] == head else 0
    t = len(tail) if tail and len(ws) - h > len(tail) and ws[len(ws) - len(tail):] == tail else 0
    return (h, t) if h + t < len(ws) else (0, 0)


def _text_hashes(normalised: list[str]) -> np.ndarray:
    import polars as pl

    if not normalised:
        return np.zeros(0, np.uint64)
    return np.ascontiguousarray(pl.Series(normalised, dtype=pl.String).hash(seed=1).to_numpy(), dtype=np.uint64)


# --- training side ------------------------------------------------------------------------

@dataclass
class Matches:
    """What one scan found: every (training row, unique instance) pair that overlaps, and for
    each row's best pair (highest overlap; then the first instance) the positions of up to
    SAMPLE_NGRAMS matched n-grams."""

    row: np.ndarray  # int64, the caller's row numbers
    doc: np.ndarray  # int64, unique instance
    overlap: np.ndarray  # float64
    best_positions: dict[int, list[int]]  # row -> first word positions of matched grams (its best pair)

    @staticmethod
    def empty() -> "Matches":
        return Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64), {})

    @staticmethod
    def concat(parts: list["Matches"]) -> "Matches":
        if not parts:
            return Matches.empty()
        best: dict[int, list[int]] = {}
        for p in parts:
            best.update(p.best_positions)
        return Matches(np.concatenate([p.row for p in parts]), np.concatenate([p.doc for p in parts]),
                       np.concatenate([p.overlap for p in parts]), best)

    def best(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, doc, overlap) of each row's best pair, rows ascending."""
        if not len(self.row):
            return self.row, self.doc, self.overlap
        order = np.lexsort((self.doc, -self.overlap, self.row))
        row, doc, overlap = self.row[order], self.doc[order], self.overlap[order]
        first = np.concatenate([[True], row[1:] != row[:-1]])
        return row[first], doc[first], overlap[first]


def scan(index: EvalIndex, rows, texts, *, threshold: float = THRESHOLD, match: str = "ngram") -> Matches:
    """Every (training row, eval instance) pair where the instance overlaps the row. `texts` are
    the rows' segments (turns: a list or a Polars string series), `rows` the row number of each;
    n-grams never cross segments, coverage adds up over a row's segments. A plain function of
    plain values."""
    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows) or not index.instances:
        return Matches.empty()
    if match == "exact":
        return _scan_exact(index, rows, texts)
    word_hashes, lengths = _word_hashes(texts)
    row_of_word = np.repeat(rows, lengths)
    found = []  # (k, row, hash) of each k-gram of a row that is an eval gram
    for k, rolling, valid in _rolling(word_hashes, lengths, list(index.grams)):
        at = index.grams[k].find(rolling)
        at = at[valid(at)]
        found.append((k, row_of_word[at], rolling[at].copy()))
    hit_row, hit_doc_lo, hit_doc_hi = [], [], []
    post_doc, post_pos, offset = [], [], 0
    for k, row, hashes in found:
        table = index.grams[k]
        order = np.lexsort((hashes, row))  # one (row, gram) is enough
        row, hashes = row[order], hashes[order]
        if len(row):
            distinct = np.concatenate([[True], (row[1:] != row[:-1]) | (hashes[1:] != hashes[:-1])])
            row, hashes = row[distinct], hashes[distinct]
        hit_row.append(row)
        hit_doc_lo.append(np.searchsorted(table.post_hash, hashes, side="left") + offset)
        hit_doc_hi.append(np.searchsorted(table.post_hash, hashes, side="right") + offset)
        post_doc.append(table.post_doc)
        post_pos.append(table.post_pos)
        offset += len(table.post_hash)
    if not found:
        return Matches.empty()
    row, lo, hi = np.concatenate(hit_row), np.concatenate(hit_doc_lo), np.concatenate(hit_doc_hi)
    if not len(row):
        return Matches.empty()
    order = np.argsort(row, kind="stable")
    row, lo, hi = row[order], lo[order], hi[order]
    post_doc, post_pos = np.concatenate(post_doc), np.concatenate(post_pos)
    parts = [_pairs(index, row[a:b], lo[a:b], hi[a:b], post_doc, post_pos, threshold)
             for a, b in _chunks(hi - lo, row)]
    return Matches.concat(parts)


def _chunks(counts: np.ndarray, row: np.ndarray):
    """Consecutive slices of the hits, whole rows each, of at most _PAIR_BUDGET expanded postings
    (a single row may exceed it)."""
    total = np.cumsum(counts)
    start, n = 0, len(counts)
    while start < n:
        base = total[start - 1] if start else 0
        stop = int(np.searchsorted(total, base + _PAIR_BUDGET, side="right"))
        stop = max(stop, start + 1)
        while stop < n and row[stop] == row[stop - 1]:
            stop += 1
        yield start, stop
        start = stop


def _pairs(index: EvalIndex, hit_row, lo, hi, post_doc, post_pos, threshold: float) -> Matches:
    """Coverage of every (row, instance) pair that shares a gram, from that pair's shared grams."""
    counts = hi - lo
    total = int(counts.sum())
    if not total:
        return Matches.empty()
    row = np.repeat(hit_row, counts)
    offsets = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total, dtype=np.int64)
    doc, pos = post_doc[offsets], post_pos[offsets]
    order = np.lexsort((pos, doc, row))
    row, doc, pos = row[order], doc[order], pos[order]
    new = np.concatenate([[True], (row[1:] != row[:-1]) | (doc[1:] != doc[:-1])])
    group_start = np.flatnonzero(new)
    span = index.span[doc]
    # the union of the pair's grams [pos, pos + span): each gram adds the words before the next one
    step = np.empty(total, dtype=np.int64)
    step[:-1] = np.minimum(pos[1:] - pos[:-1], span[:-1])
    last = np.concatenate([group_start[1:] - 1, [total - 1]])
    step[last] = span[last]
    covered = np.add.reduceat(step, group_start)
    g_row, g_doc = row[group_start], doc[group_start]
    overlap = covered / index.length[g_doc]
    keep = overlap > threshold
    if not keep.any():
        return Matches.empty()
    kept = np.flatnonzero(keep)
    matches = Matches(g_row[kept], g_doc[kept], overlap[kept].astype(np.float64), {})
    # each row's best pair (as Matches.best picks it): where its grams are
    best = kept[np.lexsort((g_doc[kept], -overlap[kept], g_row[kept]))]
    best = best[np.concatenate([[True], g_row[best][1:] != g_row[best][:-1]])]
    ends = np.append(group_start[1:], total)
    for g in best.tolist():
        a = group_start[g]
        matches.best_positions[int(g_row[g])] = pos[a:min(ends[g], a + SAMPLE_NGRAMS)].tolist()
    return matches


def _scan_exact(index: EvalIndex, rows: np.ndarray, texts) -> Matches:
    """Pairs whose word streams are equal (a segment and an instance), overlap 1.0."""
    normalised = _tokens(texts).list.join(" ")
    hashes = np.ascontiguousarray(normalised.hash(seed=1).to_numpy(), dtype=np.uint64)
    at = np.searchsorted(index.text_keys, hashes)
    at[at == len(index.text_keys)] = 0
    found = np.flatnonzero(index.text_keys[at] == hashes) if len(index.text_keys) else np.zeros(0, np.int64)
    pairs = set()
    for i in found.tolist():
        text = normalised[i]
        j = int(at[i])
        while j < len(index.text_keys) and index.text_keys[j] == hashes[i]:  # equal hashes: compare the texts
            d = int(index.text_docs[j])
            if text and index.texts[d] == text:
                pairs.add((int(rows[i]), d))
            j += 1
    if not pairs:
        return Matches.empty()
    row, doc = (np.array(v, dtype=np.int64) for v in zip(*sorted(pairs)))
    matches = Matches(row, doc, np.ones(len(row)), {})
    for r, d, _ in zip(*matches.best()):
        matches.best_positions[int(r)] = [0]
    return matches


def matched_ngrams(index: EvalIndex, doc: int, positions: list[int], match: str = "ngram") -> list[str]:
    """The matched n-grams of a pair as text (from the instance's words)."""
    ws = index.words[doc]
    if match == "exact":
        return [" ".join(ws)]
    span = int(index.span[doc])
    return [" ".join(ws[p:p + span]) for p in positions]


# --- eval instances from lm-eval -----------------------------------------------------------

def eval_instances(tasks, include_paths=(), *, work_dir: Path | None = None) -> dict[str, list[str]]:
    """{task: [prompt, ...]} for lm-eval tasks (groups expand to their member tasks), built
    offline through lm-eval's TaskManager over the shipped tasks and `include_paths`: the docs
    lm-eval evaluates (`eval_docs`: test split, else validation) rendered by `doc_to_text`. For
    multiple-choice tasks that is the prompt without the choices (unless the task's template puts
    them in the prompt, as MMLU's does). Cached per process."""
    return {task: list(prompts) for task, prompts, _ in _tasks(tasks, include_paths, work_dir)}


def template_frames(tasks, include_paths=(), *, work_dir: Path | None = None) -> dict[str, tuple[str, str]]:
    """{task: (text before the first field of its `doc_to_text` template, text after the last)}:
    ("Question: ", "\nAnswer:") for "Question: {{question}}\nAnswer:"; ("", "") for a template
    that is a function, a feature name, or has logic ({% if %}) at its ends."""
    return {task: frame for task, _, frame in _tasks(tasks, include_paths, work_dir)}


def _tasks(tasks, include_paths, work_dir):
    folders = tuple(str(Path(p).resolve()) for p in include_paths)
    # the shipped tasks alone are read in place: where a copy of your folders would go is no matter
    under = str(work_dir) if work_dir and folders else None
    for name in tasks:
        yield from _instances(str(name), folders, under)


@lru_cache(maxsize=None)
def _instances(name: str, include_paths: tuple[str, ...], work_dir: str | None) -> tuple[tuple[str, tuple, tuple], ...]:
    import logging

    from evals.harness import _drop_notices_for_cli_users, task_manager

    for logger in ("lm_eval.api.task", "lm_eval.evaluator", "lm_eval.tasks"):
        logging.getLogger(logger).addFilter(_drop_notices_for_cli_users)
    user = getattr(os, "getuid", lambda: 0)()
    under = Path(work_dir) if work_dir else Path(tempfile.gettempdir()) / f"datamill-lm-eval-tasks-{user}"
    manager = task_manager([Path(p) for p in include_paths], work_dir=under)
    if hasattr(manager, "load"):  # lm-eval >= 0.4.10: a flat {task name: Task}
        leaves = manager.load([name])["tasks"].items()
    else:
        from lm_eval.tasks import get_task_dict

        leaves = _leaves(get_task_dict([name], manager))
    return tuple((task_name, tuple(_prompt(task, doc) for doc in task.eval_docs), _frame(task))
                 for task_name, task in leaves)


def _leaves(task_dict):
    """(name, Task) for every task of lm-eval's possibly nested {group: {task: Task}} dict."""
    for key, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaves(value)
        elif value is not None:
            yield (key if isinstance(key, str) else getattr(value, "task_name", str(key))), value


def _frame(task) -> tuple[str, str]:
    """The literal text at the two ends of a task's `doc_to_text` Jinja template."""
    import itertools

    import jinja2
    from jinja2 import nodes

    template = getattr(getattr(task, "config", None), "doc_to_text", None)
    if not isinstance(template, str) or "{{" not in template:
        return "", ""
    try:
        body = jinja2.Environment().parse(template).body
    except jinja2.TemplateError:
        return "", ""
    if len(body) != 1 or not isinstance(body[0], nodes.Output):
        return "", ""

    def literal(parts) -> list[str]:
        return [node.data for node in itertools.takewhile(lambda node: isinstance(node, nodes.TemplateData), parts)]

    parts = body[0].nodes
    return "".join(literal(parts)), "".join(reversed(literal(reversed(parts))))


def _prompt(task, doc) -> str:
    text = task.doc_to_text(doc)
    if isinstance(text, int):  # the prompt is one of the choices (winogrande's style)
        text = task.doc_to_choice(doc)[text]
    return "" if text is None else str(text)


# --- the functions offered to other stages -----------------------------------------------

def contamination(texts: list[str], tasks: dict[str, list[str]], *, n: int = N,
                  threshold: float = THRESHOLD, strip_template: bool = True) -> dict[str, dict]:
    """How much of each eval task the training prompts `texts` contain: {task: {"instances",
    "overlapping", "share"}}, `tasks` being {task name: [its include folders]} (groups expand to
    their member tasks). Offered as `datamill.registry.function("contamination")`."""
    sets: dict[str, list[str]] = {}
    frames: dict[str, tuple[str, str]] = {}
    for name, folders in tasks.items():
        sets.update(eval_instances([name], folders))
        frames.update(template_frames([name], folders) if strip_template else {})
    index = build_index(sets, n, frames)
    found = scan(index, np.arange(len(texts)), list(texts), threshold=threshold)
    overlapping = overlapping_instances(index, found.doc)
    return {name: {"instances": index.sizes[s], "overlapping": len(overlapping[s]),
                   "share": len(overlapping[s]) / index.sizes[s] if index.sizes[s] else 0.0}
            for s, name in enumerate(index.sets)}


def contaminated_examples(eval_texts: list[str], train_texts: list[str], n: int = N,
                          threshold: float = THRESHOLD, frame: tuple[str, str] = ("", "")) -> list[bool]:
    """Per eval text: does it overlap any training text (the same rule and index as `decontaminate`).
    `frame`: the template text the eval texts start and end with (`template_frames`), left out."""
    index = build_index({"eval": list(eval_texts)}, n, {"eval": frame})
    found = scan(index, np.arange(len(train_texts)), list(train_texts), threshold=threshold)
    hit = overlapping_instances(index, found.doc)[0]
    return [i in hit for i in range(len(eval_texts))]


def overlapping_instances(index: EvalIndex, docs: np.ndarray) -> list[set[int]]:
    """Per eval set: the doc ids of its instances among the unique instances `docs`."""
    out: list[set[int]] = [set() for _ in index.sets]
    for d in np.unique(docs).tolist():
        for s, doc_id in index.owners[d]:
            out[s].add(doc_id)
    return out

"""From instruction rows to training batches: chat template, loss masks, mixtures, packing.

Labels follow the Hugging Face convention: `labels[i]` is the token at position i, predicted
from positions < i, and -100 where no loss is taken. Position 0 of every example is -100, so a
packed row never asks one example to predict the next one's first token.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

IGNORE = -100
# Used when a tokenizer has no chat template (e.g. a base model): the Tulu format LESS trains with.
FALLBACK_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


class TemplateError(ValueError):
    """The chat template cannot mark assistant tokens (it is not incremental)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def assistant_spans(tokenizer, messages: list[dict], loss_on: str,
                    first_turn: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry the loss.

    An assistant turn's span runs from the end of the prompt that precedes it (rendered with the
    generation prompt) to the end of the turn, end-of-turn token included so that the model
    learns to stop; trailing whitespace is left out. Turns before `first_turn` carry no loss (a
    preference pair's completion starts after its prompt's turns)."""
    full = render(tokenizer, messages, generation_prompt=False)
    if loss_on == "all":
        return full, [(0, len(full))]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first_turn:
            continue
        prompt = render(tokenizer, messages[:i], generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False).rstrip()
        if not full.startswith(prompt) or not full.startswith(upto):
            raise TemplateError("the chat template renders a conversation differently from its prefixes, so "
                                "assistant tokens cannot be located; use `loss_on: all`")
        spans.append((len(prompt), len(upto)))
    if loss_on == "last_turn":
        spans = spans[-1:]
    return full, spans


def encode(tokenizer, value, loss_on: str, max_len: int, first_turn: int = 0) -> Example:
    """One row (a conversation, or plain text) -> ids and labels, truncated to max_len tokens.
    `first_turn`: assistant turns before it carry no loss (see `encode_completion`)."""
    if isinstance(value, str):  # plain text: every token carries the loss
        text, spans = value + (tokenizer.eos_token or ""), None
    else:
        text, spans = assistant_spans(tokenizer, [{"role": m["role"], "content": m["content"]} for m in value],
                                      loss_on, first_turn)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=spans is not None)
    ids = list(encoded["input_ids"])
    if spans is None:
        labels = list(ids)
    else:
        labels = [IGNORE] * len(ids)
        span_iter = sorted(spans)
        for t, (start, end) in enumerate(encoded["offset_mapping"]):
            if end > start and any(a <= start < b for a, b in span_iter):
                labels[t] = ids[t]
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    if labels:
        labels[0] = IGNORE
    return Example(ids, labels, truncated)


def encode_completion(tokenizer, prompt: list[dict], completion: list[dict], max_len: int) -> Example:
    """A preference pair's side: prompt + completion rendered by the chat template, labels on the
    completion's assistant turns only (the tokens whose log-probability DPO compares)."""
    return encode(tokenizer, list(prompt) + list(completion), "assistant", max_len, first_turn=len(prompt))


# --------------------------------------------------------------------------- data order


def epoch_order(sizes: list[int], weights: list[float] | None, seed: int, epoch: int) -> list[tuple[int, int]]:
    """(table index, row index) for one epoch, shuffled by (seed, epoch).

    Without weights: every row of every table once. With mixture weights: the epoch has as many
    examples as all tables together, table i contributing round(w_i / sum(w) * total) of them:
    its rows in a fresh shuffle, repeated as often as needed."""
    rng = random.Random(f"{seed}:{epoch}")
    total = sum(sizes)
    order: list[tuple[int, int]] = []
    for t, size in enumerate(sizes):
        want = size if weights is None else round(weights[t] / sum(weights) * total)
        if size == 0 or want == 0:
            continue
        rows: list[int] = []
        while len(rows) < want:
            block = list(range(size))
            rng.shuffle(block)
            rows.extend(block)
        order.extend((t, r) for r in rows[:want])
    rng.shuffle(order)
    return order


# --------------------------------------------------------------------------- rows and batches


def pack(lengths: list[int], max_len: int, window: int = 512) -> list[list[int]]:
    """Group example indices into rows of at most max_len tokens.

    Best-fit decreasing inside consecutive windows of the (already shuffled) order: rows come out
    ~full while the data order stays random at the scale of a window. Free room is kept sorted,
    so each example finds the tightest row that fits in O(log rows)."""
    rows: list[list[int]] = []
    for start in range(0, len(lengths), window):
        chunk = sorted(range(start, min(start + window, len(lengths))), key=lambda i: -lengths[i])
        bins: list[list[int]] = []
        rooms: list[tuple[int, int]] = []  # (free tokens, bin index), ascending
        for i in chunk:
            j = bisect.bisect_left(rooms, (lengths[i], -1))
            if j == len(rooms):
                bins.append([i])
                bisect.insort(rooms, (max_len - lengths[i], len(bins) - 1))
            else:
                room, b = rooms.pop(j)
                bins[b].append(i)
                bisect.insort(rooms, (room - lengths[i], b))
        rows.extend(bins)
    return rows


def micro_batches(rows_or_examples: list[list[int]], lengths: list[int], *, packed: bool, max_len: int,
                  batch_size: int, batch_tokens: int | None, seed: int) -> list[list[list[int]]]:
    """Micro-batches, each a list of rows (a row is a list of example indices).

    Packed rows are all max_len long and are shuffled: batch_tokens // max_len rows per batch. Padded batches
    (one example per row) group similar lengths: the order is sorted by length inside windows of
    64 batches, batches are cut by count or by padded tokens, and the batches are shuffled."""
    if packed:
        # pack() leaves rows longest-first within each window: shuffle them, or every window would
        # train its longest examples first (a length curriculum nobody asked for).
        rows = list(rows_or_examples)
        random.Random(seed).shuffle(rows)
        per = max(1, batch_tokens // max_len) if batch_tokens else batch_size
        return [rows[i:i + per] for i in range(0, len(rows), per)]
    return _similar_lengths([[row] for row in rows_or_examples], lengths, batch_size, batch_tokens, seed)


def _similar_lengths(units: list[list[list[int]]], lengths: list[int], batch_size: int, batch_tokens: int | None,
                     seed: int) -> list[list[list[int]]]:
    """Padded micro-batches of units (rows of one example each that must share a batch: one row, or
    a pair's two sides) of similar lengths: sorted by their longest row inside windows of 64
    batches, cut by `batch_size` units or by `batch_tokens` padded tokens, then shuffled."""
    longest = [max(lengths[row[0]] for row in unit) for unit in units]
    if batch_tokens:
        mean_len = sum(n * len(unit) for n, unit in zip(longest, units)) / max(len(units), 1)
        per_batch = max(1, int(batch_tokens // max(mean_len, 1)))
    else:
        per_batch = batch_size
    window = 64 * per_batch
    batches: list[list[list[int]]] = []
    for start in range(0, len(units), window):
        chunk = sorted(range(start, min(start + window, len(units))), key=lambda u: longest[u])
        batch: list[list[int]] = []
        count = 0  # units in `batch`
        for u in chunk:  # ascending lengths: the unit being added is the batch's longest
            rows = len(batch) + len(units[u])
            full = (count >= batch_size) if not batch_tokens else (longest[u] * rows > batch_tokens)
            if batch and full:
                batches.append(batch)
                batch, count = [], 0
            batch += units[u]
            count += 1
        if batch:
            batches.append(batch)
    random.Random(seed).shuffle(batches)
    return batches


def pair_batches(units: list[int], lengths: list[int], *, packed: bool, max_len: int, batch_size: int,
                 batch_tokens: int | None, seed: int) -> list[list[list[int]]]:
    """Micro-batches of preference pairs: pair p is examples 2p (chosen) and 2p+1 (rejected), and
    both sides of a pair always share a micro-batch (the loss compares them).

    Packed: a pair is one unit of rows twice max_len long (each side is at most max_len), so chosen
    and rejected sit side by side with restarting position ids; `pack` fills the rows. Padded: one
    side per row; pairs of similar lengths are batched together, `batch_size` pairs (or
    `batch_tokens` padded tokens) per micro-batch. Either way a micro-batch's examples, read row
    by row, alternate chosen, rejected (what `preference.split_sides` relies on)."""
    if packed:
        unit_len = [lengths[2 * p] + lengths[2 * p + 1] for p in units]
        rows = [[i for j in row for i in (2 * units[j], 2 * units[j] + 1)] for row in pack(unit_len, 2 * max_len)]
        return micro_batches(rows, lengths, packed=True, max_len=2 * max_len, batch_size=batch_size,
                             batch_tokens=batch_tokens, seed=seed)
    return _similar_lengths([[[2 * p], [2 * p + 1]] for p in units], lengths, batch_size, batch_tokens, seed)


def collate(batch: list[list[int]], examples: list[Example], labels: list[list[int]], *, packed: bool,
            pad_id: int, row_len: int | None = None) -> dict:
    """Tensors for one micro-batch.

    input_ids, labels, position_ids [B, T]; seq_len [B, T] (the length of the example each token
    belongs to, 0 on padding: NEFTune's L); segment [B, T] (which of the micro-batch's examples,
    counted row by row, the token belongs to; -1 on padding: per-sequence sums for preference
    losses); attention_mask [B, T] for padded batches only. Packed
    rows carry no attention mask: position ids that restart at 0 tell the model where each
    example begins (transformers builds the block-diagonal mask from them)."""
    import torch

    width = row_len if packed and row_len else max(sum(len(examples[i].input_ids) for i in row) for row in batch)
    shape = (len(batch), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    lab = torch.full(shape, IGNORE, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    seq_len = torch.zeros(shape, dtype=torch.long)
    segment = torch.full(shape, -1, dtype=torch.long)
    count = 0
    for b, row in enumerate(batch):
        at = 0
        for i in row:
            n = len(examples[i].input_ids)
            ids[b, at:at + n] = torch.tensor(examples[i].input_ids)
            lab[b, at:at + n] = torch.tensor(labels[i])
            pos[b, at:at + n] = torch.arange(n)
            seq_len[b, at:at + n] = n
            segment[b, at:at + n] = count
            count += 1
            at += n
        pos[b, at:] = torch.arange(width - at)  # padding: one more "sequence" that attends to itself
    out = {"input_ids": ids, "labels": lab, "position_ids": pos, "seq_len": seq_len, "segment": segment}
    if not packed:
        out["attention_mask"] = (seq_len > 0).long()
    return out

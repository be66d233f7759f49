"""Parsers: a generator model's raw text -> canonical chat messages, or a ParseError saying why not.

A generator prompt asks the model to think aloud first (list topics, subtopics) and then write
the example in a tagged format. Every parser therefore applies a *final-block rule*: the example
is the LAST complete tagged block, so numbered topic lists and false starts before it are
ignored. Tags are matched leniently, the way small models actually write them:

    Question: ...     **Question:** ...     ### Question 1: ...     question - no: needs a colon
    Q: ...            The question is: ...  - **Answer**: ...    Problem: ...    AI Assistant: ...

Tags inside fenced code blocks (```) are never tags: a program may well print "Answer:".

    qa               Question: / Answer:                     -> [user, assistant]
    code             the same, text kept verbatim (code fences intact; an unclosed fence is an error)
    multiple_choice  Question: + options A-D + Answer: <letter> -> user = question + options,
                                                               assistant = "<letter>) <option>" (+ explanation)
    dialog           User: / Assistant: turns, alternating, >= 2 -> [user, assistant, user, ...]

`parse(name, text)` dispatches by parser name through the registry `PARSERS`. Add your own with
one decorator (or under the `datamill.parsers` entry-point group of an installed package), and
prompt files may name it in `parser:`:

    @PARSERS.register("tsv")
    def parse_tsv(text: str) -> list[dict]: ...
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from datamill.registry import Registry


class ParseError(ValueError):
    """The text holds no usable example. `reason` is for people; `kind` is a short label for counts."""

    def __init__(self, reason: str, kind: str):
        self.reason = reason
        self.kind = kind
        super().__init__(reason)


PARSERS: Registry[Callable[[str], list[dict]]] = Registry(
    "parser", group="datamill.parsers", check=callable, expects="a function of the model's text")
ParserName = PARSERS.name_type()  # the `parser` field of a prompt file: a name, checked and listed in the schema


# Markdown decorations small models put around tags: list bullets, headings, quotes, bold/italics.
# One character (or one "12." number) per repetition: no nested quantifiers, so no catastrophic
# backtracking on lines like "**********" that end up not being tags.
_LEAD = r"(?:[ \t]*(?:[-*+>#]|\d+[.)]))*[ \t]*"
_EMPH = r"(?:\*\*|__|\*|_)?"


def _tag_pattern(words: str) -> re.Pattern:
    """A tag at the start of a line: optional decoration, optional 'The', a tag word, an optional
    number ('Question 2'), optional 'is', then a colon, with bold markers anywhere around it."""
    return re.compile(
        rf"^{_LEAD}{_EMPH}[ \t]*(?:the[ \t]+)?(?P<word>{words})(?:[ \t]*#?\d+)?(?:[ \t]+is)?"
        rf"[ \t]*{_EMPH}[ \t]*[:：][ \t]*{_EMPH}[ \t]*",
        re.IGNORECASE | re.MULTILINE,
    )


_QUESTION = _tag_pattern(r"question|q|instruction|prompt|problem")
_ANSWER = _tag_pattern(r"(?:correct[ \t]+|final[ \t]+)?answer|a|response|solution")
# Multiple choice: "A: Paris" is an option, so the one-letter tags Q:/A: are not tags there.
_MC_QUESTION = _tag_pattern(r"question|instruction|prompt|problem")
# ... and "The correct answer is B)" counts without a colon when a capital option letter follows.
_MC_ANSWER = re.compile(
    rf"^{_LEAD}{_EMPH}[ \t]*(?:the[ \t]+)?(?:correct[ \t]+|final[ \t]+)?(?:answer|solution)(?:[ \t]+is)?"
    rf"[ \t]*{_EMPH}[ \t]*(?:[:：]|(?=(?-i:\(?[A-E]\b)))[ \t]*{_EMPH}[ \t]*",
    re.IGNORECASE | re.MULTILINE,
)
_USER = _tag_pattern(r"user|human")
_ASSISTANT = _tag_pattern(r"(?:ai[ \t]+)?assistant|ai|bot")
_FENCE = re.compile(r"^[ \t]*```", re.MULTILINE)
# An option line: "A) text", "A. text", "(A) text", "**A:** text", "- B) text".
_OPTION = re.compile(rf"^{_LEAD}{_EMPH}[ \t]*\(?(?P<letter>[A-E])[ \t]*[).:\]]{_EMPH}[ \t]+(?P<text>\S.*)$",
                     re.MULTILINE)
_LETTER = re.compile(r"^\W*\(?(?P<letter>[A-Ea-e])\b[ \t]*[).:\]]?[ \t]*(?P<rest>.*)", re.DOTALL)


@dataclass(frozen=True)
class _Tag:
    role: str  # "q" / "a" / "user" / "assistant"
    start: int  # where the tag begins
    end: int  # where its content begins


def _fenced_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every fenced code block; an unclosed fence runs to the end of the text."""
    marks = [m.start() for m in _FENCE.finditer(text)]
    spans = []
    for i in range(0, len(marks), 2):
        spans.append((marks[i], marks[i + 1] if i + 1 < len(marks) else len(text)))
    return spans


def _find_tags(text: str, patterns: dict[str, re.Pattern]) -> list[_Tag]:
    """All tags in text order, skipping those inside fenced code blocks."""
    fences = _fenced_spans(text)
    tags = []
    for role, pattern in patterns.items():
        for m in pattern.finditer(text):
            if not any(a <= m.start() < b for a, b in fences):
                tags.append(_Tag(role, m.start(), m.end()))
    return sorted(tags, key=lambda t: t.start)


_STRAY = re.compile(r"^(?:\*\*|__)\s*|\s*(?:\*\*|__)$")


def _clean(text: str) -> str:
    """Strip whitespace and stray bold markers left at either end by the tag match."""
    text = text.strip()
    previous = None
    while previous != text:
        previous = text
        text = _STRAY.sub("", text).strip()
    return text


def _unquote(text: str) -> str:
    """'"What is X?"' -> 'What is X?' (small models like to quote the whole question)."""
    for a, b in (('"', '"'), ("“", "”")):
        if len(text) >= 2 and text.startswith(a) and text.endswith(b) and a not in text[1:-1] and b not in text[1:-1]:
            return text[1:-1].strip()
    return text


def _last_pair(text: str, question_tag: re.Pattern = _QUESTION,
               answer_tag: re.Pattern = _ANSWER) -> tuple[str, str]:
    """(question, answer) texts of the last Question tag followed by an Answer tag.
    The answer runs to the next Question tag or the end of the text."""
    tags = _find_tags(text, {"q": question_tag, "a": answer_tag})
    if not tags:
        raise ParseError("no 'Question:' or 'Answer:' tag found", "no_tags")
    questions = [i for i, t in enumerate(tags) if t.role == "q"]
    if not questions:
        raise ParseError("no 'Question:' tag found before the answer", "no_question_tag")
    for qi in reversed(questions):
        following = tags[qi + 1:]
        answer_at = next((j for j, t in enumerate(following) if t.role == "a"), None)
        next_q = next((j for j, t in enumerate(following) if t.role == "q"), None)
        if answer_at is None or (next_q is not None and next_q < answer_at):
            continue
        q, a = tags[qi], following[answer_at]
        end = following[next_q].start if next_q is not None else len(text)
        return text[q.end:a.start], text[a.end:end]
    raise ParseError("no 'Answer:' tag found after the question", "no_answer_tag")


@PARSERS.register("qa")
def parse_qa(text: str) -> list[dict]:
    """`Question: ... Answer: ...` -> [user, assistant]."""
    question, answer = _last_pair(text)
    question, answer = _unquote(_clean(question)), _unquote(_clean(answer))
    if not question:
        raise ParseError("empty question", "empty_question")
    if not answer:
        raise ParseError("empty answer", "empty_answer")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@PARSERS.register("code")
def parse_code(text: str) -> list[dict]:
    """Like qa, but the texts are kept verbatim (indentation, fences) and a code fence left open
    (the model ran out of tokens mid-program) is an error."""
    question, answer = _last_pair(text)
    question, answer = question.strip("\n").rstrip(), answer.strip("\n").rstrip()
    if not question.strip():
        raise ParseError("empty question", "empty_question")
    if not answer.strip():
        raise ParseError("empty answer", "empty_answer")
    for part, name in ((question, "question"), (answer, "answer")):
        if len(_FENCE.findall(part)) % 2:
            raise ParseError(f"unclosed code fence in the {name} (output cut off?)", "unclosed_fence")
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


@PARSERS.register("multiple_choice")
def parse_multiple_choice(text: str) -> list[dict]:
    """Question + options A-D (E optional) + `Answer: <letter>` -> user = question and options,
    assistant = "<letter>) <option text>", followed by the model's explanation if it gave one."""
    section, answer = _last_pair(text, _MC_QUESTION, _MC_ANSWER)
    options: dict[str, str] = {}
    first_option = None
    for m in _OPTION.finditer(section):
        letter = m.group("letter").upper()
        if letter in options:  # a second list: the final-block rule says the later one counts
            options, first_option = {}, None
        options[letter] = _clean(m.group("text"))
        if first_option is None:
            first_option = m.start()
    missing = [x for x in "ABCD" if not options.get(x)]
    if missing:
        raise ParseError(f"missing options: {', '.join(missing)} (expected lines 'A) ...' to 'D) ...')",
                         "missing_options")
    question = _clean(section[:first_option])
    if not question:
        raise ParseError("empty question", "empty_question")
    m = _LETTER.match(_clean(answer))
    if not m:
        raise ParseError("no answer letter after 'Answer:' (expected one of A-D)", "no_answer_letter")
    letter = m.group("letter").upper()
    if letter not in options:
        raise ParseError(f"answer '{letter}' is not one of the options {', '.join(sorted(options))}",
                         "answer_not_an_option")
    rest = _clean(m.group("rest"))
    chosen = options[letter]
    if rest.lower().startswith(chosen.lower()):  # "B) Paris. Because ..." -> explanation "Because ..."
        rest = _clean(rest[len(chosen):].lstrip(" .,:;-"))
    listing = "\n".join(f"{x}) {options[x]}" for x in sorted(options))
    reply = f"{letter}) {chosen}" + (f"\n\n{rest}" if rest else "")
    return [{"role": "user", "content": f"{question}\n\n{listing}"}, {"role": "assistant", "content": reply}]


@PARSERS.register("dialog")
def parse_dialog(text: str) -> list[dict]:
    """`User:` / `Assistant:` turns from the first User tag on, alternating; at least one exchange.
    A last user turn with no reply (cut off) is dropped."""
    tags = _find_tags(text, {"user": _USER, "assistant": _ASSISTANT})
    first = next((i for i, t in enumerate(tags) if t.role == "user"), None)
    if first is None:
        raise ParseError("no 'User:' turn found", "no_user_turn")
    tags = tags[first:]
    messages = []
    for i, tag in enumerate(tags):
        end = tags[i + 1].start if i + 1 < len(tags) else len(text)
        content = _clean(text[tag.end:end])
        expected = "user" if i % 2 == 0 else "assistant"
        if tag.role != expected:
            raise ParseError(f"turns do not alternate: turn {i + 1} is {tag.role}, expected {expected}",
                             "turns_not_alternating")
        if not content:
            if i == len(tags) - 1 and tag.role == "user":
                break
            raise ParseError(f"empty turn {i + 1} ({tag.role})", "empty_turn")
        messages.append({"role": tag.role, "content": content})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    if len(messages) < 2:
        raise ParseError("no 'Assistant:' reply to the first user turn", "no_assistant_turn")
    return messages


def parse(parser: str, text: str) -> list[dict]:
    """Messages from a model's text with the named parser; raises ParseError."""
    if not text or not text.strip():
        raise ParseError("empty output", "empty_output")
    return PARSERS.get(parser)(text)

"""Read YAML safely while remembering where every value came from.

`load_yaml(path)` returns the data and a map from each value's path (a tuple of keys and
list indexes) to its (line, column), 1-based, so that errors can point at the spot.
Duplicate keys, which PyYAML silently collapses, are errors here.

A spec is small, so anything large is refused before it can cost time or memory: a file over
MAX_BYTES, nesting deeper than MAX_DEPTH, and a document with more than MAX_NODES values once
its aliases are expanded (as everything that walks the data sees them). PyYAML has no such
limits: a 460-byte "billion laughs" alias bomb ran out of memory, 5,000 nested `[` overflowed
Python's stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from datamill.errors import SpecError

MAX_BYTES = 1024 * 1024
MAX_DEPTH = 100
MAX_NODES = 100_000


@dataclass
class YamlDoc:
    data: object  # None when the file holds no document (empty, or only comments)
    file: str
    positions: dict[tuple, tuple[int, int]] = field(default_factory=dict)

    def where(self, loc: tuple) -> str:
        """'file:line:col' for the deepest part of `loc` that exists in the file."""
        for cut in range(len(loc), -1, -1):
            pos = self.positions.get(tuple(loc[:cut]))
            if pos:
                return f"{self.file}:{pos[0]}:{pos[1]}"
        return self.file


def load_yaml(path: str | Path) -> YamlDoc:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise SpecError(f"{path}: the file is {size:,} bytes, over the limit of {MAX_BYTES:,} bytes (1 MiB) "
                        "for a spec; keep data in source files (`path:`) and prompts in prompt files")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise SpecError(f"{path}:{line}: invalid UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start} "
                        "(a spec must be saved as UTF-8)") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, file: str) -> YamlDoc:
    doc = YamlDoc(data=None, file=file)
    problems: list[str] = []
    try:
        doc.data = _compose_and_construct(text, lambda root: _walk(root, (), doc, problems))
    except _Refused as e:
        raise SpecError(f"{file}:{e.mark.line + 1}:{e.mark.column + 1}: {e.message}") from None
    except yaml.reader.ReaderError as e:  # a control character; PyYAML gives only its offset
        line = text.count("\n", 0, e.position) + 1
        raise SpecError(f"{file}:{line}: invalid YAML: character #x{e.character:04x} "
                        "(a control character) is not allowed") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise SpecError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{file}: invalid YAML: {e}") from None
    if problems:
        raise SpecError(problems)
    return doc


def parse_value(text: str, origin: str):
    """A value typed on the command line (`--set a.b=[1, 2]`), under the same limits as a file.
    Text that is not valid YAML comes back as it is (the schema then judges it as text)."""
    try:
        return _compose_and_construct(text)
    except _Refused as e:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise SpecError(f"{origin}={shown}: {e.message}") from None
    except yaml.YAMLError:
        return text


class _Refused(Exception):
    """A document over the limits; `mark` is where it crossed them."""

    def __init__(self, message: str, mark):
        self.message, self.mark = message, mark
        super().__init__(message)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts, while composing, how many values the document has with every alias
    expanded and how deep it nests, and stops at the node that crosses a limit. Composing is cheap
    even for a bomb (an alias is the anchored node object again): the cost comes later, in whatever
    walks the data, so this is where the size must be judged."""

    def __init__(self, text: str):
        super().__init__(text)
        self._open = 0  # collections being composed around the current node
        self._count = 0  # values so far, aliases expanded
        self._size: dict[yaml.Node, tuple[int, int]] = {}  # composed node -> (values, levels), expanded

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None:  # (an undefined alias is PyYAML's error, raised below)
                if node not in self._size:
                    raise _Refused(f"alias *{event.anchor} is used inside its own anchor (a recursive "
                                   "structure, which a spec cannot hold)", event.start_mark)
                values, levels = self._size[node]
                self._add(values, event.start_mark, f"alias *{event.anchor} ({values:,} values)")
                if self._open + levels > MAX_DEPTH:
                    raise _Refused(f"alias *{event.anchor} nests the spec deeper than {MAX_DEPTH} levels "
                                   "(the limit)", event.start_mark)
            return super().compose_node(parent, index)
        mark = self.peek_event().start_mark
        if self._open >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels (the limit)", mark)
        before = self._count
        self._add(1, mark, "this value")
        self._open += 1
        node = super().compose_node(parent, index)
        self._open -= 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        levels = 1 + max((self._size[c][1] for c in children), default=0)
        self._size[node] = (self._count - before, levels)
        return node

    def _add(self, values: int, mark, what: str) -> None:
        self._count += values
        if self._count > MAX_NODES:
            raise _Refused(f"{what} brings the spec past {MAX_NODES:,} values (the limit, counting each use "
                           "of an alias in full): anchors and aliases are for sharing small blocks", mark)

    def construct_object(self, node, deep=False):
        # PyYAML lets a bad scalar escape as a bare ValueError ("month must be in 1..12" for
        # `2024-13-01`); give it the node's place like its other errors.
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, OverflowError) as e:
            kind = str(node.tag).rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as {kind}: {e}", node.start_mark) from None


def _compose_and_construct(text: str, visit=lambda root: None):
    """The data of `text` (None when it holds no document): composed once, `visit`ed, and built
    from that same node tree."""
    loader = _BoundedLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        visit(root)  # before constructing, which rewrites the nodes of merge keys (`<<`)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def _walk(node, path: tuple, doc: YamlDoc, problems: list[str]) -> None:
    doc.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key == "<<":  # merge key: its values are merged by the loader
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    f"{doc.file}:{line}:{key_node.start_mark.column + 1}: "
                    f"{'.'.join(map(str, path + (key,)))}: duplicate key '{key}' (first defined on line {seen[key]})"
                )
                continue
            seen[key] = line
            doc.positions[path + (key,)] = (line, key_node.start_mark.column + 1)
            _walk_value(value_node, path + (key,), doc, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), doc, problems)


def _walk_value(node, path: tuple, doc: YamlDoc, problems: list[str]) -> None:
    # A key's own position is kept (errors about a key point at the key); children get theirs.
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
        key_pos = doc.positions[path]
        _walk(node, path, doc, problems)
        doc.positions[path] = key_pos

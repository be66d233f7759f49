"""Read YAML safely while remembering where every value came from.

`load_yaml(path)` returns the data and a map from each value's path (a tuple of keys and
list indexes) to its (line, column), 1-based, so that errors can point at the spot.
Duplicate keys, which PyYAML silently collapses, are errors here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from datamill.errors import SpecError


@dataclass
class YamlDoc:
    data: object
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
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


def parse_yaml(text: str, file: str) -> YamlDoc:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise SpecError(f"{where}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{file}: invalid YAML: {e}") from None
    doc = YamlDoc(data={} if data is None else data, file=file)
    problems: list[str] = []
    if root is not None:
        _walk(root, (), doc, problems)
    if problems:
        raise SpecError(problems)
    return doc


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

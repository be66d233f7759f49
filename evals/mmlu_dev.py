"""`datamill_mmlu_dev`: a small real benchmark that works offline, from data lm-eval itself ships.

lm-evaluation-harness (MIT) carries the MMLU dev questions (Hendrycks et al., MIT) inside its
flan chain-of-thought prompts, `lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json`: five
per subject, 57 subjects, each with its four choices and "The answer is (X)". This module parses
them into an ordinary 4-choice task (MMLU's own prompt format, scored on the letters A-D, as
lm-eval's `mmlu` task does):

    python -m evals.mmlu_dev evals/tasks        # writes datamill_mmlu_dev.yaml + data/mmlu_dev_test.jsonl

The prompts' JSON lost some LaTeX backslashes to escapes ("\\frac" became a form feed + "rac");
those control characters are turned back into the backslash sequences they were. Questions whose
choices do not parse are left out (the count is printed).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

LETTERS = "ABCD"
_CHOICES = re.compile(r"^\(A\) (?P<A>.*?) \(B\) (?P<B>.*?) \(C\) (?P<C>.*?) \(D\) (?P<D>.*?)\s*$", re.S)
_ANSWER = re.compile(r"answer is \(?([ABCD])\)?")
_LOST_ESCAPES = {"\x0c": "\\f", "\r": "\\r", "\x08": "\\b", "\x07": "\\a", "\x0b": "\\v", "\t": "\\t"}


def source_file() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "flan_cot_fewshot" / "_cot_prompts.json"


def parse(prompts: dict[str, str]) -> tuple[list[dict], int]:
    """(questions, how many were left out) from the subject -> prompt text mapping."""
    docs, skipped = [], 0
    for subject, text in sorted(prompts.items()):
        for value, escape in _LOST_ESCAPES.items():
            text = text.replace(value, escape)
        for block in re.split(r"\n\nQ: ", "\n\n" + text.split("\n\n", 1)[1])[1:]:
            question_part, _, answer_part = block.partition("\nA: ")
            question, _, choice_line = question_part.rpartition("\n")
            choices, answer = _CHOICES.match(choice_line), _ANSWER.search(answer_part)
            if not (question.strip() and choices and answer):
                skipped += 1
                continue
            doc = {"subject": subject, "question": question.strip(),
                   "choices": [choices.group(letter).strip() for letter in LETTERS],
                   "label": LETTERS.index(answer.group(1))}
            doc["id"] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
            docs.append(doc)
    return docs, skipped


TASK_YAML = """\
# MMLU dev questions (57 subjects x up to 5), parsed by evals/mmlu_dev.py from the copy that
# lm-evaluation-harness ships; 4 choices, scored on the answer letter like lm-eval's `mmlu`.
task: datamill_mmlu_dev
custom_dataset: !function utils.load_split
dataset_kwargs:
  name: mmlu_dev
test_split: test
output_type: multiple_choice
doc_to_text: "{{question.strip()}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: label
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
metadata:
  version: 1.0
  source: lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json
"""


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the datamill_mmlu_dev task into a task folder.")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    docs, skipped = parse(json.loads(source_file().read_text(encoding="utf-8")))
    data = args.out_dir / "data" / "mmlu_dev_test.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (args.out_dir / "datamill_mmlu_dev.yaml").write_text(TASK_YAML)
    print(f"datamill_mmlu_dev: {len(docs)} questions from {len({d['subject'] for d in docs})} subjects "
          f"({skipped} left out: choices or answer did not parse)")


if __name__ == "__main__":
    main()

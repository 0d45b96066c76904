"""Multiple-choice evaluation sets in the MMLU format: question, choices, answer.

Prompts follow the original MMLU evaluation (Hendrycks et al.), which the QLoRA and QA-LoRA
papers score: a header line naming the subject, k solved examples ("k-shot"), then the item:

    The following are multiple choice questions (with answers) about <subject>.

    <question>
    A. <choice 0>
    B. <choice 1>
    ...
    Answer:

The model's answer is the letter whose continuation (" A", " B", ...) has the highest
log-likelihood after the prompt (`lorabench.evaluate.mc_accuracy`). The answer column may be
an index into the choices, a letter, or the text of one choice; anything else is refused. The
k-shot examples come from `task.mc_shots_split` (MMLU's dev split), the first k of the item's
subject when the table has a `subject` column; when that split is the evaluated one, an item
is never its own shot.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from typing import Any

from lorabench.data.hf import load_table, require_columns
from lorabench.data.tokenizer import Tokenizer
from lorabench.errors import ConfigError

LETTERS = string.ascii_uppercase  # answer letters, in choice order
SUBJECT_COLUMN = "subject"  # MMLU's per-item subject (optional)


@dataclass
class MCItem:
    context: list[int]  # the prompt's tokens (bos if the tokenizer adds one, header, shots, item, "Answer:")
    options: list[list[int]]  # tokens of each continuation " A", " B", ...
    gold: int  # index of the right choice


@dataclass
class MCSet:
    items: list[MCItem]
    source: str  # the dataset it came from, for messages


@dataclass
class Question:
    question: str
    choices: list[str]
    gold: int
    subject: str


def answer_index(answer: Any, choices: list[str], where: str) -> int:
    """The index of `answer` (an index, a letter or a choice's text) among `choices`, else one line."""
    n = len(choices)
    if isinstance(answer, bool):
        answer = str(answer)
    if isinstance(answer, (int, float)) and float(answer).is_integer() and 0 <= int(answer) < n:
        return int(answer)
    text = str(answer).strip()
    if text.isdigit() and int(text) < n:
        return int(text)
    if len(text) == 1 and text in LETTERS[:n]:
        return LETTERS.index(text)
    if text in choices:
        return choices.index(text)
    raise ConfigError(
        f"task.mc_answer_field: {where}: answer {answer!r} is not among its {n} choices "
        f"(expected an index 0..{n - 1}, a letter {LETTERS[0]}..{LETTERS[n - 1]} or a choice's text)"
    )


def as_choices(value: Any, where: str) -> list[str]:
    """A row's choices: a list, or a JSON list in a string (CSV files)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, list) or not 2 <= len(value) <= len(LETTERS):
        raise ConfigError(f"task.mc_choices_field: {where}: expected a list of 2..{len(LETTERS)} choices, got {value!r}")
    return [str(c) for c in value]


def read_questions(table: Any, cfg: Any, source: str) -> list[Question]:
    """Rows of an MMLU-format table as checked questions."""
    columns = {"task.mc_question_field": cfg.mc_question_field, "task.mc_choices_field": cfg.mc_choices_field,
               "task.mc_answer_field": cfg.mc_answer_field}
    require_columns(table, columns, source)
    has_subject = SUBJECT_COLUMN in table.column_names
    out = []
    for i, row in enumerate(table):
        where = f"item {i} of {source}"
        choices = as_choices(row[cfg.mc_choices_field], where)
        subject = str(row[SUBJECT_COLUMN]) if has_subject else cfg.mc_subject
        out.append(Question(str(row[cfg.mc_question_field]), choices, answer_index(row[cfg.mc_answer_field], choices, where), subject))
    return out


def header(subject: str) -> str:
    """MMLU's first line (subject names like high_school_physics are spelled with spaces)."""
    about = f" about {subject.replace('_', ' ').strip()}" if subject.strip() else ""
    return f"The following are multiple choice questions (with answers){about}.\n\n"


def render(q: Question, with_answer: bool) -> str:
    """One question in MMLU's layout; a shot carries its answer letter and a blank line."""
    lines = [q.question.strip()] + [f"{LETTERS[j]}. {c}" for j, c in enumerate(q.choices)]
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {LETTERS[q.gold]}\n\n" if with_answer else text


def shots_for(q: Question, index: int, pool: list[Question], same_split: bool, k: int) -> list[Question]:
    """The first k pool questions of q's subject (any subject if too few), never q itself."""
    usable = [p for j, p in enumerate(pool) if not (same_split and j == index)]
    same = [p for p in usable if p.subject == q.subject]
    return (same + [p for p in usable if p.subject != q.subject])[:k]


def load_mc(cfg: Any, tok: Tokenizer) -> MCSet:
    """The MC eval set of `task.mc_dataset`, tokenized into prompts and letter continuations."""
    source = str(cfg.mc_dataset)
    ds = load_table(cfg.mc_dataset, cfg.mc_config, key="task.mc_dataset")
    if cfg.mc_split not in ds:
        raise ConfigError(f"task.mc_split: '{cfg.mc_split}' not in the splits {list(ds)} of {source}")
    questions = read_questions(ds[cfg.mc_split], cfg, source)
    if cfg.mc_size:
        questions = questions[: cfg.mc_size]
    pool: list[Question] = []
    if cfg.mc_shots:
        if cfg.mc_shots_split not in ds:
            raise ConfigError(f"task.mc_shots_split: '{cfg.mc_shots_split}' not in the splits {list(ds)} of {source}")
        pool = questions if cfg.mc_shots_split == cfg.mc_split and not cfg.mc_size else read_questions(ds[cfg.mc_shots_split], cfg, source)
        if len(pool) < cfg.mc_shots + (cfg.mc_shots_split == cfg.mc_split):
            raise ConfigError(f"task.mc_shots: {cfg.mc_shots} shots asked for, but split '{cfg.mc_shots_split}' of {source} has {len(pool)} items")
    bos = [tok.bos_id] if getattr(tok, "adds_bos", True) else []
    items = []
    for i, q in enumerate(questions):
        shots = shots_for(q, i, pool, cfg.mc_shots_split == cfg.mc_split, cfg.mc_shots) if cfg.mc_shots else []
        prompt = header(q.subject) + "".join(render(s, True) for s in shots) + render(q, False)
        options = [tok.encode(f" {LETTERS[j]}") for j in range(len(q.choices))]
        items.append(MCItem(bos + tok.encode(prompt), options, q.gold))
    if not items:
        raise ConfigError(f"task.mc_dataset: {source} split '{cfg.mc_split}' has no items")
    return MCSet(items, source)

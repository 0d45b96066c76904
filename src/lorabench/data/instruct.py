"""Instruction tuning in the Alpaca format (instruction / optional input / output columns).

Each row becomes one prompt/answer example, rendered either with the Stanford Alpaca prompt
(`task.template=alpaca`) or with the tokenizer's own chat template (`task.template=chat`: the
instruction, plus the input if any, as one user turn, and the generation prompt). Training
takes the loss on the response tokens (and the closing eos) only: the prompt is masked. Each
example is one sequence, right-padded to the longest in its batch (not packed: packing
unrelated examples into one row would let them attend to each other, unless every kernel
honours per-example boundaries).
"""

from __future__ import annotations

from typing import Any

from lorabench.data.hf import train_eval_tables
from lorabench.data.synthetic import Example
from lorabench.errors import ConfigError

# The prompts of Stanford Alpaca's training code (a published data format; the response follows).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")  # task.template values


def alpaca_prompt(instruction: str, context: str) -> str:
    """The Alpaca prompt of one row (the no-input variant when `context` is empty)."""
    if context.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=context)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def chat_prompt(hf_tokenizer: Any, instruction: str, context: str) -> str:
    """The tokenizer's chat template over one user turn, ending with the assistant's generation prompt."""
    if not getattr(hf_tokenizer, "chat_template", None):
        raise ConfigError("task.template: 'chat' needs a tokenizer with a chat template; this model's has none (use alpaca)")
    user = f"{instruction}\n\n{context}" if context.strip() else instruction
    return hf_tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)


def load_instruct_examples(cfg: Any, seed: int, hf_tokenizer: Any) -> tuple[list[Example], list[Example]]:
    """Train and eval examples of an Alpaca-format dataset; the input column may be absent."""
    if cfg.template not in TEMPLATES:
        raise ConfigError(f"task.template: expected one of {list(TEMPLATES)}, got '{cfg.template}'")
    columns = {"task.instruction_field": cfg.instruction_field, "task.output_field": cfg.output_field}
    train, evals = train_eval_tables(cfg, seed, columns)
    has_input = cfg.input_field in train.column_names

    def render(row: dict[str, Any]) -> Example:
        instruction = str(row[cfg.instruction_field])
        context = "" if not has_input or row.get(cfg.input_field) is None else str(row[cfg.input_field])
        if cfg.template == "chat":
            prompt = chat_prompt(hf_tokenizer, instruction, context)
        else:
            prompt = alpaca_prompt(instruction, context)
        return Example(prompt, str(row[cfg.output_field]))

    return [render(r) for r in train], [render(r) for r in evals]

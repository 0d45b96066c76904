"""Data formats through HF `datasets` from local fixture files (json, jsonl, csv, parquet):
Alpaca instructions (template and chat template, prompt masked), packed raw text (exact
blocks, perplexity), MMLU-format multiple choice (prompts, letter log-likelihoods against a
per-choice recomputation) and the one-line errors for bad files. Nothing touches the network."""

from __future__ import annotations

import json
import math
import string
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tokenizers import Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from transformers import PreTrainedTokenizerFast

from lorabench.config import TaskConfig
from lorabench.data import build_task
from lorabench.data.instruct import alpaca_prompt
from lorabench.data.mc import MCItem, MCSet
from lorabench.data.tokenizer import HFTokenizer
from lorabench.errors import ConfigError
from lorabench.evaluate import continuation_logprobs, evaluate, mc_accuracy, mc_choice_scores
from tests.helpers import run_tiny, tiny_llama

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = [c for c in string.printable if c not in "\r\x0b\x0c"]
CHAT = (  # SmolLM2's template, without the default system turn
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def printable_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character (newline and capitals included), bos added, a chat template."""
    itos = SPECIALS + CHARS
    backend = BackendTokenizer(models.WordLevel({t: i for i, t in enumerate(itos)}, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIALS)
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT
    return tok


TOK = HFTokenizer(printable_tokenizer())
ALPACA = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Name a colour.", "input": "", "output": "Blue"},
] + [{"instruction": f"Repeat {w}.", "input": "", "output": w} for w in ("cat", "dog", "sun", "sea", "map", "cup")]


def task_cfg(**kw: object):
    cfg = OmegaConf.structured(TaskConfig)
    cfg.update({"train_size": 100, "eval_size": 100, "max_length": 512, **kw})
    return cfg


def write(path: Path, rows: list[dict]) -> Path:
    """Rows as the file type its suffix names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    return path


# ---- instruction tuning ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_alpaca_rows_become_template_prompts_with_loss_on_the_response_only(tmp_path: Path, suffix: str) -> None:
    f = write(tmp_path / f"alpaca{suffix}", ALPACA)
    data = build_task(task_cfg(name="instruct", dataset=str(f), eval_size=2), TOK, seed=0)
    assert len(data.train) + len(data.eval) == len(ALPACA)
    by_output = {e.answer: e for e in data.train_examples + data.eval_examples}
    assert by_output["5"].prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
    )
    assert by_output["Blue"].prompt == (  # an empty input (NaN in csv/parquet too) gives the no-input prompt
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a colour.\n\n### Response:\n"
    )
    batch = data.collate(data.train)
    for row, (ex, enc) in enumerate(zip(data.train_examples, data.train)):
        ids = [1] + TOK.encode(ex.prompt) + TOK.encode(ex.answer) + [TOK.eos_id]
        assert enc.ids == ids and enc.n_prompt == 1 + len(ex.prompt)  # one token per character, bos first
        labels = batch["labels"][row]
        assert (labels[: enc.n_prompt] == -100).all() and (labels[len(ids):] == -100).all()
        assert labels[enc.n_prompt : len(ids)].tolist() == TOK.encode(ex.answer) + [TOK.eos_id]
    assert int((batch["labels"] != -100).sum()) == sum(len(e.answer) + 1 for e in data.train_examples)


def test_chat_template_prompts_keep_their_special_tokens_and_no_extra_bos(tmp_path: Path) -> None:
    f = write(tmp_path / "alpaca.jsonl", ALPACA)
    data = build_task(task_cfg(name="instruct", dataset=str(f), template="chat", eval_size=2), TOK, seed=0)
    ex, enc = data.train_examples[0], data.train[0]
    user = ex.prompt.split("\n", 1)[1].rsplit("<|im_end|>", 1)[0]
    assert ex.prompt == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    im_start, im_end = SPECIALS.index("<|im_start|>"), SPECIALS.index("<|im_end|>")
    assert enc.ids[0] == im_start and enc.ids.count(im_start) == 2 and enc.ids.count(im_end) == 1
    assert enc.n_prompt == 2 + len(ex.prompt) - 2 * len("<|im_start|>") - len("<|im_end|>") + 1
    no_input = next(e for e in data.train_examples + data.eval_examples if e.answer == "Blue")
    assert "<|im_start|>user\nName a colour.<|im_end|>" in no_input.prompt


def test_instruct_file_without_a_configured_column_is_one_line(tmp_path: Path) -> None:
    f = write(tmp_path / "no_output.csv", [{"instruction": "x", "input": "", "response": "y"}] * 4)
    with pytest.raises(ConfigError) as e:
        build_task(task_cfg(name="instruct", dataset=str(f)), TOK, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("task.output_field:") and str(f) in msg and "'output'" in msg


# ---- packed raw text ------------------------------------------------------------------------------
def test_text_is_packed_into_full_blocks_in_document_order(tmp_path: Path) -> None:
    docs = [f"Document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(40)]
    f = write(tmp_path / "c4.parquet", [{"text": d, "url": "x"} for d in docs])
    data = build_task(task_cfg(name="text", dataset=str(f), max_length=32, generate=False, loss_on="all", eval_size=8), TOK, seed=0)
    assert all(len(e.ids) == 32 and e.n_prompt == 0 for e in data.train + data.eval)
    assert len(data.eval) == 8
    # the train blocks are exactly the first ⌊n/32⌋ pieces of the stream doc + eos, doc + eos, ... of the train docs
    text = TOK.tok.decode([t for e in data.train for t in e.ids], skip_special_tokens=False)
    train_docs = [d for d in text.split("</s>") if d]
    assert all(d in docs for d in train_docs[:-1]) and len(train_docs) > 10
    eval_text = TOK.tok.decode([t for e in data.eval for t in e.ids], skip_special_tokens=False)
    eval_docs = {d for d in eval_text.split("</s>")[1:-1]}
    assert eval_docs and not eval_docs & set(train_docs)  # held-out documents, not held-out blocks of the same docs
    batch = data.collate(data.train[:3])
    assert (batch["attention_mask"] == 1).all() and (batch["labels"][:, 1:] == batch["input_ids"][:, 1:]).all()


def test_text_perplexity_is_the_exponent_of_the_mean_token_loss(tmp_path: Path) -> None:
    f = write(tmp_path / "c4.jsonl", [{"text": f"Line {i} of a small corpus."} for i in range(60)])
    data = build_task(task_cfg(name="text", dataset=str(f), max_length=24, generate=False, loss_on="all", eval_size=5), TOK, seed=0)
    model = tiny_llama(vocab=TOK.vocab_size, max_pos=64).eval()
    got = evaluate(model, data, batch_size=2, device=torch.device("cpu"), generate=False)
    with torch.no_grad():  # independent: HF's own shifted loss per block (every block has 23 predicted tokens)
        losses = [float(model(input_ids=torch.tensor([e.ids]), labels=torch.tensor([e.ids])).loss) for e in data.eval]
    assert got["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_text_without_its_column_and_text_with_generation_are_one_line(tmp_path: Path) -> None:
    f = write(tmp_path / "docs.jsonl", [{"content": "abc"}] * 5)
    with pytest.raises(ConfigError, match=r"^task.text_field: dataset .*docs.jsonl has no column 'text'"):
        build_task(task_cfg(name="text", dataset=str(f), generate=False, loss_on="all"), TOK, seed=0)
    from lorabench.data import validate_task

    with pytest.raises(ConfigError, match="^task.generate: packed text is scored by perplexity only"):
        validate_task(task_cfg(name="text", dataset=str(f), generate=True))


# ---- multiple choice ------------------------------------------------------------------------------
MC = [
    {"question": "What is 2+2?", "choices": ["3", "4", "5", "6"], "answer": "1", "subject": "arithmetic"},
    {"question": "Capital of France?", "choices": ["Paris", "Rome", "Oslo", "Bern"], "answer": "A", "subject": "geography"},
    {"question": "What is 3+4?", "choices": ["7", "8", "9", "1"], "answer": "7", "subject": "arithmetic"},
    {"question": "Largest ocean?", "choices": ["Arctic", "Pacific"], "answer": "B", "subject": "geography"},
    {"question": "What is 5-1?", "choices": ["2", "3", "4"], "answer": "C", "subject": "arithmetic"},
]  # answers as an index, a letter or a choice's text (one type per column: strings)
MC_INT = [{**r, "answer": g} for r, g in zip(MC, [1, 0, 0, 1, 2])]  # MMLU's own type: an int index


def mc_task(path: Path, **kw: object):
    return build_task(task_cfg(name="instruct", dataset=str(write(path.with_name("alpaca.jsonl"), ALPACA)),
                               mc_dataset=str(path), mc_split="train", mc_shots_split="train", **kw), TOK, seed=0)


def test_mc_prompts_follow_mmlu_zero_and_k_shot(tmp_path: Path) -> None:
    f = write(tmp_path / "mmlu.jsonl", MC)
    zero = mc_task(f).mc
    assert [it.gold for it in zero.items] == [1, 0, 0, 1, 2]  # index, letter, choice text
    assert TOK.decode(zero.items[0].context) == (
        "The following are multiple choice questions (with answers) about arithmetic.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert zero.items[0].context[0] == 1  # bos, as the tokenizer adds it
    assert [TOK.decode(o) for o in zero.items[3].options] == [" A", " B"]
    two = mc_task(f, mc_shots=2).mc
    assert TOK.decode(two.items[2].context) == (  # the first two arithmetic items other than itself
        "The following are multiple choice questions (with answers) about arithmetic.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "What is 5-1?\nA. 2\nB. 3\nC. 4\nAnswer: C\n\n"
        "What is 3+4?\nA. 7\nB. 8\nC. 9\nD. 1\nAnswer:"
    )


def test_mc_accuracy_equals_a_per_choice_recomputation(tmp_path: Path) -> None:
    data = mc_task(write(tmp_path / "mmlu.json", MC * 4), mc_shots=1)
    model = tiny_llama(seed=3, vocab=TOK.vocab_size, max_pos=512).eval()
    scores = mc_choice_scores(model, data.mc, batch_size=3, pad_id=TOK.pad_id, device=torch.device("cpu"))
    right = 0
    with torch.no_grad():
        for item, sc in zip(data.mc.items, scores):
            ref = []
            for opt in item.options:  # one unpadded sequence per choice, summed log-probs of its tokens
                ids = torch.tensor([item.context + opt])
                logp = F.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                ref.append(sum(float(logp[len(item.context) + k - 1, t]) for k, t in enumerate(opt)))
            assert sc == pytest.approx(ref, abs=1e-4)
            right += int(ref.index(max(ref)) == item.gold)
    assert mc_accuracy(model, data.mc, 7, TOK.pad_id, torch.device("cpu")) == right / len(data.mc.items)
    assert evaluate(model, data, 4, torch.device("cpu"), generate=False)["mc_accuracy"] == right / len(data.mc.items)


def test_single_token_letters_are_read_from_one_forward(tmp_path: Path) -> None:
    model = tiny_llama(seed=5, vocab=40).eval()
    g = torch.Generator().manual_seed(0)
    items = [MCItem(torch.randint(3, 40, (n,), generator=g).tolist(), [[10], [11], [12], [13]], n % 4) for n in (5, 9, 2, 7)]
    fast = mc_choice_scores(model, MCSet(items, "x"), 3, 0, torch.device("cpu"))
    rows = [(it.context + o, 1) for it in items for o in it.options]
    slow = continuation_logprobs(model, rows, 16, 0, torch.device("cpu"))
    assert [s for sc in fast for s in sc] == pytest.approx(slow, abs=1e-4)


def test_mc_csv_with_json_choices(tmp_path: Path) -> None:
    rows = [{**r, "choices": json.dumps(r["choices"])} for r in MC]
    data = mc_task(write(tmp_path / "mmlu.csv", rows))
    assert [it.gold for it in data.mc.items] == [1, 0, 0, 1, 2] and len(data.mc.items[4].options) == 3


@pytest.mark.parametrize("answer", [4, "E", "eight", -1])
def test_mc_answer_not_among_the_choices_is_one_line(tmp_path: Path, answer: object) -> None:
    rows = [(MC_INT if isinstance(answer, int) else MC)[0], {**MC[2], "answer": answer}]
    with pytest.raises(ConfigError) as e:
        mc_task(write(tmp_path / "bad.jsonl", rows))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("task.mc_answer_field: item 1 of ") and "bad.jsonl" in msg
    assert f"answer {answer!r} is not among its 4 choices" in msg


def test_mc_file_without_choices_column_and_too_few_shots_are_one_line(tmp_path: Path) -> None:
    f = write(tmp_path / "nochoices.jsonl", [{"question": "q", "options": ["a", "b"], "answer": 0}])
    with pytest.raises(ConfigError, match=r"^task.mc_choices_field: dataset .*nochoices.jsonl has no column 'choices'"):
        mc_task(f)
    with pytest.raises(ConfigError, match="^task.mc_shots: 5 shots asked for, but split 'train' of .* has 5 items"):
        mc_task(write(tmp_path / "mmlu.jsonl", MC), mc_shots=5)


# ---- a job end to end -----------------------------------------------------------------------------
def test_a_job_on_alpaca_reports_mc_accuracy_before_and_after(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model_dir = tmp_path / "model"
    printable_tokenizer().save_pretrained(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                                 bos_token_id=1, eos_token_id=2, pad_token_id=0)).save_pretrained(model_dir)
    alpaca, mmlu = write(tmp_path / "alpaca.jsonl", ALPACA), write(tmp_path / "mmlu.parquet", MC_INT)
    summary = run_tiny(
        tmp_path / "run", "model=hf", f"model.name_or_path={model_dir}", "model.dtype=fp32", "task=instruct",
        f"task.dataset={alpaca}", "task.eval_size=2", f"task.mc_dataset={mmlu}", "task.mc_split=train",
        "task.mc_shots=1", "task.mc_shots_split=train",
    )
    assert summary["status"] == "completed"
    assert summary["eval/mc_accuracy_base"] in {k / 5 for k in range(6)}
    assert summary["eval/mc_accuracy"] in {k / 5 for k in range(6)}


def test_prompts_start_with_bos_only_when_the_tokenizer_adds_one(tmp_path: Path) -> None:
    raw = printable_tokenizer()
    raw._tokenizer.post_processor = None  # SmolLM2-like: encode() adds no bos
    no_bos = HFTokenizer(raw)
    assert (TOK.adds_bos, no_bos.adds_bos) == (True, False)
    f = write(tmp_path / "alpaca.jsonl", ALPACA)
    with_bos = build_task(task_cfg(name="instruct", dataset=str(f), eval_size=2), TOK, seed=0)
    without = build_task(task_cfg(name="instruct", dataset=str(f), eval_size=2, mc_dataset=str(write(tmp_path / "mc.jsonl", MC)),
                                  mc_split="train"), no_bos, seed=0)
    assert [e.ids[1:] for e in with_bos.train] == [e.ids for e in without.train]
    context = without.mc.items[0].context
    assert context == no_bos.encode(TOK.decode(context)) and TOK.decode(context).startswith("The following are")


def test_over_long_examples_are_refused_or_dropped(tmp_path: Path) -> None:
    rows = ALPACA + [{"instruction": "Write a long answer.", "input": "", "output": "x" * 600}] * 3
    f = write(tmp_path / "alpaca.jsonl", rows)
    with pytest.raises(ConfigError, match=r"^task.max_length: an example needs \d+ tokens, more than 512$"):
        build_task(task_cfg(name="instruct", dataset=str(f), eval_size=2), TOK, seed=0)
    data = build_task(task_cfg(name="instruct", dataset=str(f), eval_size=2, drop_long=True), TOK, seed=0)
    assert len(data.train) + len(data.eval) == len(ALPACA)  # the three long rows, wherever they fell, are gone
    assert all(len(e.ids) <= 512 for e in data.train + data.eval)
    assert [e.answer for e in data.train_examples] == [TOK.decode(e.ids[e.n_prompt:]) for e in data.train]

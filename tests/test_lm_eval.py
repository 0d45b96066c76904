"""lm-eval's HFLM scores the harness's model object on a local multiple-choice task exactly as an
independent log-likelihood argmax over the choices does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorabench.data.tokenizer import CharTokenizer
from lorabench.errors import ConfigError
from tests.helpers import tiny_llama

pytest.importorskip("lm_eval")
TASK = "lorabench_fixture_mc"
QUESTIONS = [  # only characters of the tiny vocabulary
    ("12+7=", ["19", "21", "18"]), ("3+3=", ["6", "9", "33"]), ("ab;ba:", ["yes", "no"]),
    ("9-4=", ["5", "13", "4", "1"]), ("cat,", ["dog", "cow", "owl"]), ("x>y?", ["true", "false"]),
    ("2+2=", ["4", "22", "5"]), ("red|", ["blue", "green", "pink"]), ("7+1=", ["8", "71"]),
    ("q.z=", ["zq", "qz", "z"]), ("11-1=", ["10", "0", "12"]), ("sun,", ["moon", "star", "sky"]),
]


def write_task(root: Path, answers: list[int], task: str = TASK) -> Path:
    """A jsonl of MC items and an lm-eval YAML over it (0-shot, accuracy) in `root`; returns root."""
    rows = [{"question": q, "choices": c, "answer": a} for (q, c), a in zip(QUESTIONS, answers)]
    data = root / f"{task}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / f"{task}.yaml").write_text(
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


def choice_logprobs(model: torch.nn.Module, question: str, choices: list[str]) -> list[float]:
    """Σ log p(continuation | question) for " " + each choice, no special tokens: written out here."""
    tok = CharTokenizer()
    out = []
    for c in choices:
        ctx, cont = tok.encode(question), tok.encode(" " + c)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
        out.append(float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont))))
    return out


def model_argmax(model: torch.nn.Module) -> list[int]:
    return [max(range(len(c)), key=lambda i, lp=choice_logprobs(model, q, c): lp[i]) for q, c in QUESTIONS]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_lm_eval_accuracy_equals_an_independent_loglikelihood_argmax(tmp_path: Path) -> None:
    """Three answer keys against one model: its own argmax (acc 1), never it (0), 4 of 12 (1/3)."""
    from lorabench.lm_eval_bridge import lm_eval_scores

    model = tiny_llama(vocab=50).eval()
    best = model_argmax(model)
    wrong = [(b + 1) % len(c) for b, (_, c) in zip(best, QUESTIONS)]
    mixed = [b if i % 3 == 0 else w for i, (b, w) in enumerate(zip(best, wrong))]
    expected = {}
    for name, answers, acc in (("best", best, 1.0), ("wrong", wrong, 0.0), ("mixed", mixed, 4 / 12)):
        write_task(tmp_path, answers, f"{TASK}_{name}")
        expected |= {f"lm_eval/{TASK}_{name}/acc": pytest.approx(acc, abs=1e-12),
                     f"lm_eval/{TASK}_{name}/sample_len": 12}
    assert lm_eval_scores(model, CharTokenizer().tok, [f"{TASK}_{n}" for n in ("best", "wrong", "mixed")],
                          tmp_path) == expected
    with pytest.raises(ConfigError) as e:  # (the same include dir: lm-eval indexes its tasks once)
        lm_eval_scores(model, CharTokenizer().tok, ["no_such_task"], tmp_path)
    assert "\n" not in str(e.value) and str(e.value).startswith("--lm-eval: unknown task(s) ['no_such_task']")


def test_a_missing_include_dir_is_one_line(tmp_path: Path) -> None:
    from lorabench.lm_eval_bridge import lm_eval_scores

    with pytest.raises(ConfigError) as e:
        lm_eval_scores(tiny_llama(vocab=50), CharTokenizer().tok, [TASK], tmp_path / "nope")
    assert str(e.value) == f"--lm-eval-include: {tmp_path / 'nope'} is not a directory of task YAMLs"


def test_lorabench_eval_scores_a_run_with_lm_eval(tmp_path: Path, capsys) -> None:
    from lorabench.eval_cli import main, rebuild_run
    from tests.test_export import trained_run

    run_dir = trained_run(tmp_path / "run", "strategy.merge=16bit", "trainer.max_steps=2")
    _, trainer = rebuild_run(run_dir)
    best = model_argmax(trainer.model.eval())
    answers = [b if i % 2 else (b + 1) % len(QUESTIONS[i][1]) for i, b in enumerate(best)]  # 6 of 12 right
    tasks = write_task(tmp_path, answers)
    for flag, suffix in (([], ""), (["--merged"], "_merged")):  # the 16-bit merge is exact: same argmax
        capsys.readouterr()
        assert main([str(run_dir), "--lm-eval", TASK, "--lm-eval-include", str(tasks), *flag]) == 0
        printed = json.loads(capsys.readouterr().out)
        assert printed == {f"lm_eval/{TASK}/acc{suffix}": 0.5, f"lm_eval/{TASK}/sample_len{suffix}": 12}
    assert json.loads((run_dir / "eval.json").read_text())[f"lm_eval/{TASK}/acc_merged"] == 0.5

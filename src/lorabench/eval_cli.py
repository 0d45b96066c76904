"""`lorabench-eval <run_dir> [--merged] [--lm-eval TASKS] [--export gguf|peft --out PATH]`: score a
finished run again without training, score it with lm-eval, or export it for another runtime.

Why: a run's numbers must be reproducible from its run dir alone. The job's composed config
(`.hydra/config.yaml`, written by Hydra for every job) rebuilds the model exactly as the job
did (`build_trainer`: same backbone, quantization, seeded wrap and task data); the strategy's
`final_state.pt` puts the trained tensors back (`load_artifacts`); the trainer's own
`evaluate` scores it. `--merged` scores the strategy's merged model instead (as the job's
`eval/*_merged`). Metrics go to stdout and into `<run_dir>/eval.json` (keys as in summary.json).
`--lm-eval TASKS` scores the same model with EleutherAI's lm-eval (`HFLM` around the model object;
local task YAMLs with `--lm-eval-include DIR`); keys `lm_eval/<task>/<metric>`, also in eval.json.
`--export peft --out DIR` writes the base as the run left it (HF dir) and the PEFT adapter.
`--export gguf --out FILE` writes the merged model (QA-LoRA: INT-N merged into its zero points)
as GGUF, which llama.cpp and transformers load (docs/export.md); a width or group size the format
cannot hold is refused in one line. `--export hqq --out DIR` writes it for the `hqq` package. Bad input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from lorabench.errors import ConfigError

RUN_CONFIG = Path(".hydra") / "config.yaml"  # the job's composed config, inside its run dir
EVAL_FILE = "eval.json"  # scores written back into the run dir

log = logging.getLogger("lorabench")


def load_run_config(run_dir: Path) -> DictConfig:
    """The job's config (typed by the schema), with run_dir pointing at `run_dir`."""
    from lorabench.checks import validate
    from lorabench.config import LorabenchConfig
    from lorabench.strategies.base import FINAL_STATE

    if not run_dir.is_dir():
        raise ConfigError(f"run_dir: {run_dir} is not a directory")
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"run_dir: {path} does not exist (not a run dir written by lorabench)")
    if not (run_dir / FINAL_STATE).is_file():
        raise ConfigError(f"run_dir: {run_dir / FINAL_STATE} does not exist (the run did not complete)")
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(LorabenchConfig), OmegaConf.load(path))
    except Exception as e:  # noqa: BLE001 - a YAML or schema error becomes one line naming the file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a lorabench config: {first}") from e
    assert isinstance(cfg, DictConfig)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    validate(cfg)
    return cfg


def rebuild_run(run_dir: Path, device: Optional[str] = None) -> tuple[DictConfig, Any]:
    """(the run's config, its Trainer with the final state loaded): the model exactly as the
    job left it (`build_trainer`, no setup(): no optimizer, no resume; then `load_artifacts`)."""
    import torch

    from lorabench.training.job import build_trainer, pick_device

    cfg = load_run_config(run_dir)
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    trainer = build_trainer(cfg, pick_device(device or cfg.trainer.device), run_dir=run_dir)
    trainer.strategy.load_artifacts(trainer.model, run_dir)
    return cfg, trainer


def run_merged_model(cfg: DictConfig, trainer: Any, flag: str) -> Any:
    """The strategy's merged model (as the job's `eval/*_merged` scores it), or one line naming `flag`."""
    model = trainer.strategy.merged_for_eval(trainer.model, Path(cfg.run_dir))
    if model is None:
        raise ConfigError(
            f"{flag}: strategy '{cfg.strategy.name}' has no merged model for this run "
            f"(strategy.merge={cfg.strategy.get('merge', 'none')})"
        )
    return model


def evaluate_run(run_dir: Path, merged: bool = False, device: Optional[str] = None) -> dict[str, float]:
    """Rebuild the run's model, load its final state and score it; keys as in its summary
    (`eval/<metric>`, or `eval/<metric>_merged` with `merged`)."""
    cfg, trainer = rebuild_run(run_dir, device)
    if not merged:
        return {f"eval/{k}": v for k, v in trainer.evaluate().items()}
    return {f"eval/{k}_merged": v for k, v in trainer.evaluate(run_merged_model(cfg, trainer, "--merged")).items()}


def lm_eval_run(run_dir: Path, tasks: list[str], include: Optional[Path] = None, merged: bool = False,
                fewshot: Optional[int] = None, device: Optional[str] = None) -> dict[str, float]:
    """The run's model (base + adapter as trained, or with `merged` the merged model) scored by
    lm-eval's HFLM on `tasks`; keys `lm_eval/<task>/<metric>` (+ `_merged`)."""
    from lorabench.lm_eval_bridge import lm_eval_scores

    if not tasks:
        raise ConfigError("--lm-eval: expected a comma-separated list of task names")
    cfg, trainer = rebuild_run(run_dir, device)
    model = run_merged_model(cfg, trainer, "--merged") if merged else trainer.model
    scores = lm_eval_scores(model.eval(), trainer.data.tok.tok, tasks, include, num_fewshot=fewshot)
    return {f"{k}_merged" if merged else k: v for k, v in scores.items()}


EXPORT_FORMATS = ("gguf", "hqq", "peft")  # --export choices (docs/export.md)


def export_run(run_dir: Path, fmt: str, out: Optional[Path], device: Optional[str] = None) -> dict[str, Any]:
    """Write the run's model for another tool; returns what was written.

    gguf: the merged model (QA-LoRA: INT-N merged into its zeros) as one GGUF file;
    hqq: the merged INT-N model as an hqq dir (any width and group size, exact);
    peft: `out/base/` (HF model dir: the base as the run left it) + `out/adapter/` (PEFT LoRA).
    """
    if out is None:
        raise ConfigError(f"--out: --export {fmt} needs an output path (--out PATH)")
    cfg, trainer = rebuild_run(run_dir, device)
    if fmt == "peft":
        from lorabench.adapters.lora import lora_layers
        from lorabench.adapters.peft_format import write_peft_checkpoint

        s = cfg.strategy
        if not lora_layers(trainer.model) or "rank" not in s:
            raise ConfigError(f"--export peft: strategy '{s.name}' has no LoRA adapter to export")
        config = {"r": s.rank, "lora_alpha": s.alpha, "lora_dropout": s.dropout,
                  "use_rslora": bool(s.get("rslora", False)), "fan_in_fan_out": False}
        write_peft_checkpoint(trainer.model, out, config)
        return {"export/format": fmt, "export/path": str(out), "export/adapted_layers": len(lora_layers(trainer.model))}
    from lorabench.quant.export_gguf import export_gguf
    from lorabench.quant.export_hqq import export_hqq

    model = run_merged_model(cfg, trainer, f"--export {fmt}").eval()
    counts = (export_gguf if fmt == "gguf" else export_hqq)(model, trainer.data.tok.tok, out)
    return {"export/format": fmt, "export/path": str(out), **{f"export/{k}": v for k, v in counts.items()}}


def write_eval(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """Merge `metrics` into `<run_dir>/eval.json` (so plain and merged scores sit side by side)."""
    from lorabench.utils import atomic_write_text

    path = run_dir / EVAL_FILE
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = {}
    atomic_write_text(path, json.dumps({**old, **metrics}, indent=2, sort_keys=True) + "\n")
    return path


def main(argv: Optional[list[str]] = None) -> int:
    """Console-script entry point; returns the exit code."""
    parser = argparse.ArgumentParser(prog="lorabench-eval", description="Score a finished lorabench run without training.")
    parser.add_argument("run_dir", type=Path, help="a run dir (holds .hydra/config.yaml and final_state.pt)")
    parser.add_argument("--merged", action="store_true", help="score the strategy's merged model (as eval/*_merged)")
    parser.add_argument("--export", choices=EXPORT_FORMATS, default=None, help="write the merged model in this format (with --out)")
    parser.add_argument("--out", type=Path, default=None, help="where --export writes (gguf: a file; hqq, peft: a dir)")
    parser.add_argument("--lm-eval", default=None, metavar="TASKS", help="score with EleutherAI lm-eval on these comma-separated tasks")
    parser.add_argument("--lm-eval-include", type=Path, default=None, metavar="DIR", help="a dir of local lm-eval task YAMLs")
    parser.add_argument("--lm-eval-fewshot", type=int, default=None, metavar="K", help="k-shot (default: each task's own)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="default: the run's trainer.device")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.export:
            print(json.dumps(export_run(args.run_dir, args.export, args.out, args.device), indent=2, sort_keys=True))
            return 0
        if args.lm_eval is not None:
            tasks = [t.strip() for t in args.lm_eval.split(",") if t.strip()]
            metrics = lm_eval_run(args.run_dir, tasks, args.lm_eval_include, args.merged, args.lm_eval_fewshot, args.device)
        else:
            metrics = evaluate_run(args.run_dir, merged=args.merged, device=args.device)
    except ConfigError as e:
        print(f"lorabench-eval: error: {e}", file=sys.stderr)
        return 2
    write_eval(args.run_dir, metrics)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

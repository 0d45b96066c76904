"""Every experiment preset composes and validates for every job of its sweep.

Each job of each sweep is expanded from the file's `hydra.sweeper.params` exactly as Hydra's basic
sweeper does, then composed and validated like a run: an invalid combination must be fixed in the
preset, never found after other jobs have trained. Jobs that differ only in the seed share one
composition (Hydra takes ~0.3 s per compose); the seed is then set as the plain value it is.
"""

from __future__ import annotations

import copy
import functools

import pytest
import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # Hydra's own product expansion
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from lorabench.checks import validate
from tests.helpers import CONF, compose_cfg

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
JOBS = {"compare": 21, "rank_sweep": 84, "lr_sweep": 75, "memory_scaling": 30, "qalora_table1": 21,
        "relora_table2": 10, "relora_capacity": 15, "qlora_paper": 1, "lora_vs_full": 18, "lora_vs_full_smollm2": 15, "qlora_nf4": 12,
        "qalora_table1_smollm2": 27}


def sweep_jobs(name: str) -> list[list[str]]:
    """The override list of every job `lorabench -m experiment=<name>` launches (one job without params)."""
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    params = (yaml.safe_load(text).get("hydra") or {}).get("sweeper", {}).get("params") or {}
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    batches = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    return [list(job) for batch in batches for job in batch] or [[]]


@functools.lru_cache(maxsize=None)
def composed(name: str, job: tuple[str, ...]) -> DictConfig:
    """`lorabench experiment=<name> <job>` composed (cached: the read-only tests share it)."""
    return compose_cfg(f"experiment={name}", *job)


def job_cfg(name: str, job: list[str]) -> DictConfig:
    """The config of one sweep job: composed without its seed, which is then set."""
    seeds = [o.split("=", 1)[1] for o in job if o.startswith("seed=")]
    cfg = composed(name, tuple(o for o in job if not o.startswith("seed=")))
    if not seeds:
        return cfg
    cfg = copy.deepcopy(cfg)
    OmegaConf.update(cfg, "seed", int(seeds[0]))
    return cfg


def test_every_experiment_has_a_job_count() -> None:
    assert EXPERIMENTS == sorted(JOBS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_the_experiment_composes_and_validates(name: str) -> None:
    lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith("# Run: lorabench ") and f"experiment={name}" in lines[1]
    jobs = sweep_jobs(name)
    assert len(jobs) == JOBS[name]
    for job in jobs:
        cfg = job_cfg(name, job)
        assert cfg.seed == int(dict(o.split("=", 1) for o in job).get("seed", cfg.seed))
        try:
            validate(cfg)
        except Exception as e:  # name the job that fails
            raise AssertionError(f"experiment={name} {' '.join(job)}: {e}") from e


def test_compare_covers_every_strategy_and_three_seeds() -> None:
    jobs = {tuple(sorted(j)) for j in sweep_jobs("compare")}
    strategies = {"full", "lora", "qlora", "qalora", "relora", "peft_lora", "peft_qlora"}
    assert jobs == {tuple(sorted([f"strategy={s}", f"seed={k}"])) for s in strategies for k in (0, 1, 2)}


def test_rank_sweep_keeps_alpha_fixed() -> None:
    seen = set()
    for job in sweep_jobs("rank_sweep"):
        if "seed=0" not in job:
            continue
        cfg = job_cfg("rank_sweep", job)
        seen.add((cfg.strategy.name, cfg.strategy.rank, cfg.strategy.alpha))
    ranks = (1, 2, 4, 8, 16, 32, 64)
    assert seen == {(s, r, 16.0) for s in ("lora", "qlora", "qalora", "relora") for r in ranks}


def test_lr_sweep_brackets_each_tuned_lr_by_a_half_decade() -> None:
    grid = sorted({job_cfg("lr_sweep", j).optim.lr for j in sweep_jobs("lr_sweep") if "seed=0" in j})
    assert grid == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]
    for strategy in ("full", "lora", "qlora", "qalora", "relora"):
        tuned = compose_cfg(f"strategy={strategy}").optim.lr
        assert any(g <= tuned / 3 for g in grid) and any(g >= tuned * 3 for g in grid), strategy


def test_memory_scaling_grows_the_backbone_without_pretraining() -> None:
    shapes = set()
    for job in sweep_jobs("memory_scaling"):
        cfg = job_cfg("memory_scaling", job)
        assert cfg.model.pretrain_steps == 0 and cfg.trainer.max_steps == 50
        shapes.add((cfg.model.hidden_size, cfg.model.intermediate_size, cfg.model.num_layers))
    assert shapes == {(h, 1024, n) for h in (128, 256, 512) for n in (2, 4)}


def cells(name: str) -> dict[str, DictConfig]:
    """The seed-0 job of each cell of a cell sweep, by cell name."""
    out = {}
    for job in sweep_jobs(name):
        d = dict(o.split("=", 1) for o in job)
        if d.get("seed", "0") == "0":
            cell = next(v for k, v in d.items() if k.startswith("+experiment/"))
            out[cell] = job_cfg(name, job)
    return out


def test_lora_vs_full_is_full_against_lora_ranks_at_fixed_alpha() -> None:
    c = cells("lora_vs_full")
    assert c["full"].strategy.name == "full" and "rank" not in c["full"].strategy
    assert {k: (v.strategy.name, v.strategy.rank, v.strategy.alpha) for k, v in c.items() if k != "full"} == {
        **{f"lora_r{r}": ("lora", r, 16.0) for r in (1, 4, 16, 64)}, "lora_r16_embed": ("relora", 16, 16.0)}
    embed = c["lora_r16_embed"].strategy  # ReLoRA's trainable set, one cycle: no restart within the run
    assert embed.reset_every == c["lora_r16_embed"].trainer.max_steps and embed.warm_start_steps == 0
    assert {v.model.source for v in c.values()} == {"tiny"}  # the embedded default (model.pretrain_seed=1: a second backbone)


def test_lora_vs_full_smollm2_is_the_same_cells_on_smollm2() -> None:
    tiny, real = cells("lora_vs_full"), cells("lora_vs_full_smollm2")
    assert sorted(real) == ["full", "lora_r1", "lora_r16", "lora_r4", "lora_r64"]
    for k, v in real.items():  # the tiny preset's strategy node (and so its tuned lr), on SmolLM2's setting
        assert OmegaConf.to_container(v.strategy) == OmegaConf.to_container(tiny[k].strategy), k
        assert (v.model.source, v.task.name, v.trainer.max_steps, v.trainer.threads) == ("gguf", "sort", 60, 1)


def test_qlora_nf4_cells_differ_only_in_the_base_format() -> None:
    c = cells("qlora_nf4")
    assert c["lora"].strategy.name == "lora"
    assert {k: (v.strategy.quant_type, v.strategy.double_quant) for k, v in c.items() if k != "lora"} == {
        "nf4_dq": ("nf4", True), "nf4": ("nf4", False), "fp4": ("fp4", True)}
    for v in c.values():  # SmolLM2, one lr (lora's and qlora's tuned 3e-3), one rank for every cell
        assert (v.model.source, v.strategy.lr, v.strategy.rank, v.trainer.max_steps) == ("gguf", 3e-3, 8, 60)


def test_qalora_table1_smollm2_pairs_each_qalora_cell_with_its_qlora_baseline() -> None:
    c = cells("qalora_table1_smollm2")
    for bits in (3, 2):
        for q, suffix in (("rtn", ""), ("hqq", "_hqq")):
            qa, ql = c[f"qalora_int{bits}{suffix}"].strategy, c[f"qlora_intn{bits}{suffix}"].strategy
            assert (qa.name, qa.bits, qa.group_size, qa.quantizer, qa.merge) == ("qalora", bits, 32, q, "zeros")
            assert (ql.name, ql.merge_bits, ql.merge_group_size, ql.merge_quantizer, ql.merge) == ("qlora", bits, 32, q, "intn")
    assert c["qlora_16bit"].strategy.merge == "16bit"
    assert {v.model.source for v in c.values()} == {"gguf"}


def test_experiment_files_comment_every_key() -> None:
    for name in ("compare", "rank_sweep", "lr_sweep", "memory_scaling", "lora_vs_full", "qlora_nf4",
                 "qalora_table1_smollm2", "lora_vs_full_smollm2"):
        body = [ln for ln in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")]
        leaves = [ln for ln in body if not ln.rstrip().endswith(":")]
        assert leaves and all(" # " in ln for ln in leaves), name

"""Structured-config schemas of every group but `strategy`, for Hydra's ConfigStore.

A strategy's schema is the dataclass in its own file (so adding a strategy touches nothing
else); `lorabench.checks` registers them all and validates a composed config before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class ModelConfig:
    source: str = "tiny"  # tiny: the embedded Llama (shipped weights for the default keys) | hf: any AutoModelForCausalLM | gguf: a GGUF file converted once to an HF dir
    name_or_path: Optional[str] = None  # hf only: hub id or local model dir
    gguf_file: Optional[str] = None  # gguf only: a .gguf path or <python package>:<file> inside an installed package
    gradient_checkpointing: bool = False  # recompute each block's activations in backward (large models: less memory, ~30% more compute)
    dtype: str = "fp32"  # fp32 | bf16: dtype of the (unquantized) base weights
    hidden_size: int = 256  # tiny: model width (multiple of 64 so INT-N groups of 32/64 divide it)
    intermediate_size: int = 512  # tiny: MLP width (multiple of 64)
    num_layers: int = 4  # tiny: decoder blocks
    num_heads: int = 4  # tiny: attention heads
    max_position_embeddings: int = 128  # tiny: longest sequence the model sees
    pretrain_steps: int = 1500  # tiny: full-rank pretraining steps (0 = random init, for from-scratch runs)
    pretrain_batch_size: int = 64  # tiny: sequences per pretraining step
    pretrain_lr: float = 2e-3  # tiny: peak AdamW lr of the pretraining cosine schedule
    pretrain_seed: int = 0  # tiny: seed of init and corpus (part of the cache key)
    pretrain_families: list[str] = field(default_factory=lambda: ["add", "reverse", "copy", "kv"])  # tiny: task families mixed into the corpus
    cache_dir: str = "${oc.env:LORABENCH_CACHE,${oc.env:HOME,/tmp}/.cache/lorabench}"  # where tiny backbones of non-shipped recipes are pretrained to


@dataclass
class TaskConfig:
    name: str = "sort"  # a synthetic family (sort, add, reverse, copy, kv, caesar), corpus (pretraining mixture), facts (a fixed random key→value table to memorize), hf (prompt/answer), instruct (Alpaca) or text (packed raw text)
    families: list[str] = field(default_factory=lambda: ["add", "reverse", "copy", "kv"])  # corpus only: families mixed
    difficulty_min: int = 4  # smallest difficulty (list length, digits, pairs: per family)
    difficulty_max: int = 14  # largest difficulty
    train_size: int = 20000  # training examples generated (seeded); epochs reshuffle them
    eval_size: int = 300  # held-out examples, disjoint from training
    loss_on: str = "answer"  # answer: loss on answer tokens only | all: every token (pretraining)
    generate: bool = True  # score exact match by greedy generation (off for perplexity-only tasks)
    max_length: int = 128  # tokens per example after tokenization (longer ones are refused, or dropped with drop_long)
    drop_long: bool = False  # drop (and log) examples longer than max_length instead of refusing the task (real datasets)
    dataset: Optional[str] = None  # hf/instruct/text: datasets name or local file (json/jsonl/csv/parquet)
    dataset_config: Optional[str] = None  # hf/instruct/text: dataset config name
    train_split: str = "train"  # hf/instruct/text: split to train on
    eval_split: str = "test"  # hf/instruct/text: split to evaluate on (a seeded holdout of train if absent)
    prompt_field: str = "prompt"  # hf only: column holding the prompt
    answer_field: str = "answer"  # hf only: column holding the answer
    instruction_field: str = "instruction"  # instruct only: Alpaca's instruction column
    input_field: str = "input"  # instruct only: Alpaca's optional context column (absent or empty = none)
    output_field: str = "output"  # instruct only: the response column (the only tokens with loss)
    template: str = "alpaca"  # instruct only: alpaca (Stanford Alpaca's prompt) | chat (the tokenizer's chat template)
    text_field: str = "text"  # text only: column of raw documents, packed into blocks of max_length tokens
    table_seed: int = 0  # facts only: seed of the fixed key→value table (the run seed never changes it)
    mc_dataset: Optional[str] = None  # an MMLU-format eval set (datasets name or local file): adds eval/mc_accuracy to any task
    mc_config: Optional[str] = None  # mc: dataset config name (e.g. an MMLU subject)
    mc_split: str = "test"  # mc: split scored (a local file's only split is train)
    mc_shots: int = 0  # mc: solved examples before each question (0-shot, 5-shot, ...)
    mc_shots_split: str = "dev"  # mc: split the shots come from (MMLU: dev); the scored split never gives an item itself
    mc_size: int = 0  # mc: at most this many items (0 = all)
    mc_subject: str = ""  # mc: subject named in the header when the table has no subject column
    mc_question_field: str = "question"  # mc: question column
    mc_choices_field: str = "choices"  # mc: column of the choice list (a JSON list string in CSV)
    mc_answer_field: str = "answer"  # mc: right choice as an index, a letter or the choice's text


@dataclass
class OptimConfig:
    lr: float = "${strategy.lr}"  # type: ignore[assignment]  # peak lr; defaults to the strategy's tuned lr
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    scheduler: str = "cosine"  # constant | cosine | any schedule registered in lorabench.schedules
    warmup_steps: int = 10  # linear warmup steps
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    restart_every: int = 0  # jagged schedules: steps between restarts (0 = none)
    restart_warmup_steps: int = 0  # jagged schedules: re-warmup steps after each restart
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    name: str = "adamw"  # adamw (torch) | paged_adamw_32bit | paged_adamw_8bit (bitsandbytes, CUDA only)


@dataclass
class TrainerConfig:
    max_steps: int = 200  # optimizer steps
    batch_size: int = 32  # sequences per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    eval_every: int = 100  # steps between evaluations (0 = only before and after training)
    eval_batch_size: int = 150  # sequences per evaluation batch
    checkpoint_every: int = 50  # steps between checkpoints in the run dir (0 = never)
    log_every: int = 10  # steps between train metric logs
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # torch CPU threads (0 = torch's default)
    progress: bool = True  # show a progress bar
    overwrite: bool = False  # true: clear a run dir that already holds a run (completed or not) and start afresh


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | none (local metrics.jsonl and summary.json are always written)
    mode: str = "offline"  # offline | online | disabled (W&B mode)
    project: str = "lorabench"  # W&B project
    entity: Optional[str] = None  # W&B entity (team or user)
    group: Optional[str] = None  # W&B group; default: the sweep dir name, so a multirun is one group
    job_type: str = "finetune"  # W&B job type (finetune, pretrain, benchmark)
    name: Optional[str] = None  # W&B run name; default: strategy-r<rank>-seed<seed>
    tags: list[str] = field(default_factory=list)  # extra W&B tags (strategy and seed are added)


@dataclass
class PathsConfig:
    root_dir: str = "${oc.env:LORABENCH_ROOT,.}"  # where outputs/ and data/ live (default: the working dir)
    output_dir: str = "${paths.root_dir}/outputs"  # runs/, multirun/ and debug/ run dirs go under it
    cache_dir: str = "${oc.env:LORABENCH_CACHE,${oc.env:HOME,/tmp}/.cache/lorabench}"  # pretrained tiny backbones (model.cache_dir)
    data_dir: str = "${paths.root_dir}/data"  # local datasets (e.g. task=hf task.dataset=${paths.data_dir}/x.jsonl)


@dataclass
class ExtrasConfig:
    print_config: bool = True  # print the resolved config as a tree when a run starts


@dataclass
class LorabenchConfig:
    model: ModelConfig = MISSING  # backbone
    strategy: Any = MISSING  # validated against the strategy's own dataclass (see strategies/)
    task: TaskConfig = MISSING  # data and metrics
    optim: OptimConfig = MISSING  # optimizer and schedule
    trainer: TrainerConfig = MISSING  # loop, eval and checkpoint cadence
    logger: LoggerConfig = MISSING  # W&B and local files
    paths: PathsConfig = field(default_factory=PathsConfig)  # output, cache and data dirs
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)  # conveniences around a run (config printout)
    seed: int = 0  # one seed drives data, init (adapters included) and dropout
    run_dir: str = "."  # where this job writes (Hydra's run dir by default)
    optimized_metric: Optional[str] = "eval/accuracy"  # summary key the app returns to sweepers (Optuna)


# group name -> schema, stored as `<group>/<group>_schema` (each group's YAMLs extend it)
GROUP_SCHEMAS: dict[str, type] = {
    "model": ModelConfig,
    "task": TaskConfig,
    "optim": OptimConfig,
    "trainer": TrainerConfig,
    "logger": LoggerConfig,
    "paths": PathsConfig,
    "extras": ExtrasConfig,
}

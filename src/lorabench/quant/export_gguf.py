"""Export a merged Llama model (INT-N linears, e.g. QA-LoRA merged into its zero points) to GGUF,
the file format llama.cpp, ollama and transformers (with the `gguf` package) load.

Why GGUF Q4_1: its blocks of 32 weights carry an fp16 scale `d` and an fp16 minimum `m`,
`w = d·q + m` with `q ∈ [0, 15]`, which is the harness's `w = s·(q − z)` with `d = s`, `m = −s·z`.
A block of 32 lies inside one quantization group whenever `g` is a multiple of 32, and INT2/INT3
codes are INT4 codes that use part of the range, so INT2/3/4 with `g ∈ {32, 64, …}` are held
exactly except for rounding `m = −s·z'` to fp16 (codes and scales are copied bit for bit).
Anything else (INT8, g = 16, …) is refused in one line pointing to `--export hqq`: GGUF's other
types either have no minimum (Q8_0) or quantize their scales (the K-quants), so they cannot
hold the fractional z'.
Every other tensor is written as F32 (exact). docs/export.md has the details and measured logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lorabench.errors import ConfigError
from lorabench.quant.intn import IntNLinear, unpack_codes

Q4_1_BLOCK = 32  # weights per GGUF Q4_1 block (ggml's QK4_1)
Q4_1_MAX_BITS = 4  # Q4_1 codes are 4-bit: INT2/3/4 codes fit unchanged
SPM_SPACE = "\u2581"  # SentencePiece's visible space, how GGUF's "llama" vocab spells ' '
TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # GGUF token types (llama.cpp's LLAMA_TOKEN_TYPE_*)


def check_gguf_exportable(model: nn.Module) -> None:
    """One ConfigError line for what GGUF Q4_1 cannot hold: a non-Llama model, an INT-N layer of
    another width or group size, or a linear that is neither INT-N nor float."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) != "llama":
        raise ConfigError(
            f"--export gguf: the model is '{getattr(cfg, 'model_type', type(model).__name__)}', "
            "the GGUF exporter writes Llama-family models only"
        )
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ConfigError(f"--export gguf: rope_type '{rope.get('rope_type')}' is not exported (default RoPE only)")
    for name, m in model.named_modules():
        if isinstance(m, IntNLinear):
            if m.bits > Q4_1_MAX_BITS or m.group_size % Q4_1_BLOCK:
                raise ConfigError(
                    f"--export gguf: layer '{name}' is INT{m.bits} with group_size {m.group_size}; GGUF Q4_1 holds "
                    f"INT2/3/4 with group_size a multiple of {Q4_1_BLOCK}; --export hqq holds every width and group size"
                )
        elif getattr(m, "is_quantized_linear", False) or type(m).__name__.startswith("Linear4bit"):
            raise ConfigError(f"--export gguf: layer '{name}' is a {type(m).__name__}, which has no GGUF mapping")


def q4_1_blocks(layer: IntNLinear) -> np.ndarray:
    """The layer's weight as GGUF Q4_1 bytes, (out, in/32 · 20) uint8.

    Packed by hand: gguf's `quants.Q4_1` chooses its own min/max per block and cannot take
    given codes. ggml's block_q4_1 is `{fp16 d; fp16 m; uint8 qs[16]}`, with `qs[j]` holding
    code j in its low nibble and code j + 16 in its high nibble.
    """
    out, n = layer.out_features, layer.in_features
    blocks = n // Q4_1_BLOCK
    q = unpack_codes(layer.qweight, layer.bits, n).to(torch.int32).cpu().view(out, blocks, Q4_1_BLOCK)
    group = torch.arange(blocks) * Q4_1_BLOCK // layer.group_size  # the group each block lies in
    s = layer.scales.cpu().t()[:, group]  # (out, blocks) fp16, bit for bit
    m32 = -(s.float() * layer.zero_points().cpu().t()[:, group])
    m = m32.half()
    if not bool(torch.isfinite(m).all()):
        raise ConfigError(f"--export gguf: a zero point times its scale exceeds fp16 (max |s·z| = {float(m32.abs().max()):.4g})")
    nibbles = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)  # (out, blocks, 16)
    d_bytes = s.contiguous().view(torch.uint8).view(out, blocks, 2)
    m_bytes = m.contiguous().view(torch.uint8).view(out, blocks, 2)
    return torch.cat([d_bytes, m_bytes, nibbles], dim=-1).reshape(out, blocks * 20).numpy()


def rope_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Reorder q/k rows from HF's half-split RoPE layout to GGUF's interleaved one (what llama.cpp's
    converter does; transformers undoes it on load). Rows move whole, so Q4_1 blocks stay intact."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def add_hparams(writer: Any, cfg: Any) -> None:
    """The llama.* keys llama.cpp and transformers read."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    writer.add_vocab_size(cfg.vocab_size)


def add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int) -> None:
    """tokenizer.ggml.*: a character-level WordLevel vocabulary (the tiny backbone's) as a GGUF
    "llama" vocab (one token per character, no merges), a byte-level BPE one as "gpt2" with its
    merges. llama.cpp refuses a file without the model type and token list (and, for gpt2, the
merges); transformers' tokenizer loader reads the same keys (its model loader needs none)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = spec["model"]["type"]
    vocab = dict(spec["model"]["vocab"])
    special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    vocab.update({t["content"]: t["id"] for t in spec.get("added_tokens", [])})
    by_id = {i: t for t, i in vocab.items()}
    if sorted(by_id) != list(range(vocab_size)):
        raise ConfigError(f"--export gguf: the tokenizer's ids do not cover 0..{vocab_size - 1} (the model's vocab_size)")
    tokens = [by_id[i] for i in range(vocab_size)]
    types = [TOKEN_CONTROL if t in special else TOKEN_NORMAL for t in tokens]
    if kind == "WordLevel":
        writer.add_tokenizer_model("llama")
        writer.add_token_list([t.replace(" ", SPM_SPACE) for t in tokens])
        writer.add_token_scores([0.0] * vocab_size)
        writer.add_add_space_prefix(False)
    elif kind == "BPE":
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
    else:
        raise ConfigError(f"--export gguf: tokenizer model '{kind}' is not exported (WordLevel or BPE only)")
    writer.add_token_types(types)
    for setter, tid in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                        (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if tid is not None:
            setter(int(tid))
    writer.add_add_bos_token(False)  # the harness adds no special tokens when it encodes


def export_gguf(model: nn.Module, tokenizer: Any, path: Path) -> dict[str, int]:
    """Write `model` (+ `tokenizer`) to the GGUF file `path` atomically; INT-N linears as Q4_1,
    everything else F32. Returns counts: `q4_1_tensors`, `f32_tensors`, `bytes` (file size)."""
    import gguf

    check_gguf_exportable(model)
    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    add_hparams(writer, cfg)
    add_tokenizer(writer, tokenizer, cfg.vocab_size)
    intn = {n: m for n, m in model.named_modules() if isinstance(m, IntNLinear)}
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1 if intn else gguf.LlamaFileType.ALL_F32)
    counts = {"q4_1_tensors": 0, "f32_tensors": 0}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for key, tensor in model.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        if tied and module == "lm_head":
            continue  # llama.cpp and transformers reuse token_embd when output.weight is absent
        if module in intn and suffix != "qweight":
            if suffix == "bias":
                writer.add_tensor(f"{gguf_name(names, module)}.bias", tensor.detach().float().cpu().numpy())
                counts["f32_tensors"] += 1
            continue  # scales and zeros are inside the Q4_1 blocks
        target = gguf_name(names, module)
        if module in intn:
            data, qtype, suffix = q4_1_blocks(intn[module]), gguf.GGMLQuantizationType.Q4_1, "weight"
            counts["q4_1_tensors"] += 1
        else:
            data, qtype = tensor.detach().float().cpu().numpy(), None
            counts["f32_tensors"] += 1
        if module.endswith("self_attn.q_proj"):
            data = rope_permute(data, cfg.num_attention_heads)
        elif module.endswith("self_attn.k_proj"):
            data = rope_permute(data, cfg.num_key_value_heads)
        writer.add_tensor(f"{target}.{suffix}", np.ascontiguousarray(data), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {**counts, "bytes": path.stat().st_size}


def gguf_name(names: Any, module: str) -> str:
    """The GGUF tensor name of an HF module (gguf's own name map); unknown modules are refused."""
    name = names.get_name(module)
    if name is None:
        raise ConfigError(f"--export gguf: module '{module}' has no GGUF tensor name in the Llama layout")
    return name


def llama_cpp_scores(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits (len(ids) × vocab) for the token ids, through llama-cpp-python, with
    weight repacking off.

    llama-cpp-python builds llama.cpp from source with -march=native; on a VM whose CPU reports AMX
    but does not let processes use it, the repacked ("extra buffer type") AMX matmul dies of SIGILL,
    on SmolLM2's own GGUF too (seen with 0.3.35 and 0.3.36). Unpacked, llama.cpp runs its plain Q4_1
    kernels on the file as written. `Llama` takes no such option, so its default model params are
    wrapped while it loads. Run it in a process of its own where a crash must not end the caller.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def no_repack() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = no_repack
    try:
        runtime = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=256, n_threads=1)
    finally:
        lib.llama_model_default_params = defaults
    try:
        runtime.eval(ids)
        return np.array(runtime.scores[: len(ids)])
    finally:
        runtime.close()

"""Export a checkpoint as a GGUF file for llama.cpp, Ollama and LM Studio, written with gguf-py.

Equal widths in every layer: architecture `llama`. Widths that differ per layer: llama.cpp's `deci`
architecture, whose loader reads `attention.head_count`, `attention.head_count_kv` and
`feed_forward_length` as per-layer arrays, so every layer keeps exactly its pruned width.
The file is written under a temporary name and renamed, so a failed export leaves nothing under
the final name.
"""

from __future__ import annotations

import math
import os
from hashlib import sha256
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from llm_prune.errors import UserError
from llm_prune.model_files import TOKENIZER_BYTES, read_config, read_json
from llm_prune.paths import check_replaceable_file, full_disk

GGUF_DTYPES = ("f32", "f16", "q8_0")
EXPORTABLE_TYPES = ("llama", "mistral")  # the families llama.cpp runs as `llama` / `deci`

# llama.cpp names the BPE pre-tokenizer (its regex and space handling) by a hash of how the HF
# tokenizer splits this text; the text and hashes follow llama.cpp's convert_hf_to_gguf.py.
_PRE_TOKENIZER_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
    "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def check_dtype(dtype: str) -> str:
    if dtype not in GGUF_DTYPES:
        raise UserError(f"unsupported GGUF dtype '{dtype}': use one of {', '.join(GGUF_DTYPES)}", param="dtype")
    return dtype


ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # the rope scalings the GGUF keys describe


def gguf_refusal(config, folder: str | Path | None = None) -> str | None:
    """Why llama.cpp cannot run this model from our export (the model card says it too); None
    when it can. `folder`, the model's files, lets its tokenizer be judged as well."""
    from llm_prune.families import base_model_type

    base = base_model_type(config)
    if base not in EXPORTABLE_TYPES:
        return (f"GGUF export supports {', '.join(EXPORTABLE_TYPES)} models, not '{base}'; the Hugging Face "
                f"checkpoint folder is what serves it (transformers; vLLM with --portable)")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "GGUF export: models with attention or MLP biases are not supported"
    act = getattr(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):  # llama.cpp's llama/deci graphs gate the MLP with SiLU only
        return f"GGUF export: llama.cpp runs these models with a SiLU MLP, and this one uses '{act}'"
    rope_type = _rope_type(config)
    if rope_type not in ROPE_TYPES:
        return f"GGUF export: rope scaling '{rope_type}' is not supported"
    if folder is not None and (Path(folder) / "tokenizer.json").is_file():
        try:
            _tokenizer_json(Path(folder))
        except UserError as exc:
            return exc.message
    return None


def check_exportable(config, folder: str | Path | None = None) -> None:
    """Fail early (before pruning or training) for models llama.cpp cannot run from our export."""
    refusal = gguf_refusal(config, folder)
    if refusal is not None:
        raise UserError(refusal, param="gguf")


def _checkpoint_dir(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    if not path.is_dir():
        raise UserError(f"{checkpoint} is not a directory: give a Hugging Face checkpoint folder", param="checkpoint")
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        raise UserError(f"{checkpoint} is not a checkpoint: it needs config.json and *.safetensors",
                        param="checkpoint")
    return path


def _tokenizer_json(path: Path) -> dict:
    f = path / "tokenizer.json"
    if not f.is_file():
        raise UserError(f"{path} has no tokenizer.json: GGUF export needs the fast (byte-level BPE) tokenizer",
                        param="checkpoint")
    try:
        data = read_json(f, TOKENIZER_BYTES)
    except UserError as exc:  # not a regular file, too large, not UTF-8 or not JSON
        raise UserError(f"{f} is not a tokenizer file: {exc.message.replace(str(f), 'it')}",
                        param="checkpoint") from None
    if not isinstance(data, dict) or not isinstance(data.get("model") or {}, dict) or \
            not isinstance(data.get("decoder") or {}, dict):
        raise UserError(f"{f} is not a tokenizer file: expected an object with \"model\" and \"decoder\" objects",
                        param="checkpoint")
    model = data.get("model") or {}
    decoder = (data.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder != "ByteLevel":
        raise UserError("GGUF export supports byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, ...); "
                        "this one is SentencePiece-like", param="checkpoint")
    return data


def pre_tokenizer_name(tokenizer, tok_json: dict) -> str:
    digest = sha256(str(tokenizer.encode(_PRE_TOKENIZER_PROBE)).encode()).hexdigest()
    if digest in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[digest]
    pre = tok_json.get("pre_tokenizer") or {}
    # A bare ByteLevel pre-tokenizer with its default regex splits exactly as GPT-2 does.
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    raise UserError(f"GGUF export: unknown BPE pre-tokenizer (probe hash {digest[:12]}); llama.cpp would "
                    f"split text differently from this tokenizer", param="checkpoint")


def vocab_entries(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types, padded to the embedding rows."""
    from gguf import TokenType

    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(max(vocab_size, len(vocab))):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        tok = by_id[i]
        if tok in added:
            # Special tokens are matched verbatim by llama.cpp (CONTROL), others as user-defined text.
            types.append(TokenType.CONTROL if decoder[i].special else TokenType.USER_DEFINED)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(tok)
    return tokens, types


def _rope(config) -> tuple[float, dict]:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def _rope_type(config) -> str:
    params = _rope(config)[1]
    return params.get("rope_type", params.get("type", "default")) or "default"


def llama3_rope_factors(theta: float, head_dim: int, params: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1's rope scaling; llama.cpp reads them as `rope_freqs`."""
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_ctx = params.get("original_max_position_embeddings", 8192)
    out = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _rope_rotate_half_to_pairs(w: torch.Tensor, hd: int) -> torch.Tensor:
    """HF rotates the two halves of each head; llama.cpp rotates adjacent pairs: reorder the rows."""
    return w.reshape(-1, 2, hd // 2, w.shape[-1]).transpose(1, 2).reshape(w.shape)


def _tensor(writer, name: str, t: torch.Tensor, dtype: str) -> None:
    from gguf import GGMLQuantizationType, quants

    data = t.detach().to(torch.float32).cpu().numpy()
    if data.ndim == 1 or dtype == "f32":
        writer.add_tensor(name, data)  # norms and rope factors stay f32, as llama.cpp expects
    elif dtype == "f16" or data.shape[-1] % 32:  # Q8_0 blocks are 32 wide; narrower rows stay f16
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, quants.quantize(data, GGMLQuantizationType.Q8_0),
                          raw_dtype=GGMLQuantizationType.Q8_0)


def _write(model, tokenizer, src: Path, tmp: Path, dtype: str) -> dict:
    import gguf

    from llm_prune.families import family_for, head_dim, layer_shapes

    config = model.config
    check_exportable(config)
    fam = family_for(model)
    hd = head_dim(config)
    shapes = layer_shapes(model)
    uniform = len({(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size) for s in shapes}) == 1
    arch = "llama" if uniform else "deci"
    tok_json = _tokenizer_json(src)
    theta, rope = _rope(config)
    rope_type = _rope_type(config)

    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(str((read_config(src / "config.json").get("llm_prune") or {}).get("base_model")
                   or src.name) + " (llm-prune)")
    from llm_prune.card import card_license

    licensed = card_license(src / "README.md")  # the base model's, which the card carries over
    for key, add in (("license", w.add_license), ("license_name", w.add_license_name),
                     ("license_link", w.add_license_link)):
        if key in licensed:
            add(licensed[key])
    w.add_block_count(len(shapes))
    context = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    if isinstance(window, int) and 0 < window < context:
        # llama.cpp's llama/deci graphs attend to every earlier token; up to the window that is what
        # the model computes, past it it is not: the file's training context is the window.
        context = window
    w.add_context_length(context)
    w.add_embedding_length(int(config.hidden_size))
    heads = [s.num_attention_heads for s in shapes]
    kv = [s.num_key_value_heads for s in shapes]
    ff = [s.intermediate_size for s in shapes]
    w.add_head_count(heads[0] if uniform else heads)
    w.add_head_count_kv(kv[0] if uniform else kv)
    w.add_feed_forward_length(ff[0] if uniform else ff)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(theta)
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rope["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    w.add_file_type(int(file_type))
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    emb = model.get_input_embeddings().weight
    tokens, types = vocab_entries(tokenizer, emb.shape[0])
    if len(tokens) != emb.shape[0]:
        raise UserError(f"GGUF export: tokenizer has {len(tokens)} tokens but the embedding {emb.shape[0]} rows",
                        param="checkpoint")
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(tokenizer, tok_json))
    w.add_token_list(tokens)
    w.add_token_types(types)
    # Merges, BOS/EOS/PAD ids, add_bos and the chat template, read from the checkpoint's own files.
    special = gguf.SpecialVocab(src, load_merges=True, n_vocab=len(tokens))
    # Whether to prepend BOS/append EOS is what the HF tokenizer does, not llama.cpp's per-type default.
    probe = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1] == tokenizer.eos_token_id
    special.add_to_gguf(w, quiet=True)

    _tensor(w, "token_embd.weight", emb, dtype)
    if rope_type == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(theta, hd, rope))
    for i, layer in enumerate(fam.layers(model)):
        q, k, v, o = fam.qkvo(layer)
        gate, up, down = fam.gate_up_down(layer)
        for name, t in (("attn_norm", layer.input_layernorm.weight),
                        ("attn_q", _rope_rotate_half_to_pairs(q.weight, hd)),
                        ("attn_k", _rope_rotate_half_to_pairs(k.weight, hd)),
                        ("attn_v", v.weight), ("attn_output", o.weight),
                        ("ffn_norm", layer.post_attention_layernorm.weight),
                        ("ffn_gate", gate.weight), ("ffn_up", up.weight), ("ffn_down", down.weight)):
            _tensor(w, f"blk.{i}.{name}.weight", t, dtype)
    _tensor(w, "output_norm.weight", model.model.norm.weight, dtype)
    head = model.get_output_embeddings().weight
    if head.data_ptr() != emb.data_ptr():  # tied heads reuse token_embd in llama.cpp
        _tensor(w, "output.weight", head, dtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {"architecture": arch, "layers": len(shapes), "uniform": uniform, "context_length": context}


def _check_not_checkpoint_file(src: Path, out: Path) -> None:
    """Refuse to write over a file of the checkpoint being exported (its weights, config, tokenizer):
    --force is for an older export, not for the input. Earlier .gguf exports in the folder may go."""
    try:
        in_src = out.parent.resolve() == src.resolve()
        own = [f for f in src.iterdir() if f.is_file() and not f.name.endswith(".gguf")]
        clash = (in_src and any(f.name == out.name for f in own)) or \
            (out.exists() and any(f.samefile(out) for f in own))
    except OSError:
        return  # an unreadable path is reported by the checks that follow
    if clash:
        raise UserError(f"output {out} is a file of the checkpoint {src} being exported; give another file name, "
                        f"e.g. {src / 'model.gguf'}", param="output")


def export_gguf(checkpoint: str | Path, out: str | Path, dtype: str = "f16", force: bool = False) -> dict:
    """Write CHECKPOINT as OUT (a .gguf file); returns {"path", "architecture", "dtype", "bytes", ...}."""
    from llm_prune.models import load_model

    check_dtype(dtype)
    src = _checkpoint_dir(checkpoint)
    out = Path(out)
    try:
        is_dir, exists, parent = out.is_dir(), out.exists(), out.parent.is_dir()
    except (OSError, ValueError) as exc:  # a name longer than the file system takes, a NUL byte
        raise UserError(f"output {str(out)[:80]!r} is not usable: {getattr(exc, 'strerror', None) or exc}",
                        param="output") from None
    if is_dir:
        raise UserError(f"output {out} is a directory; give a .gguf file name", param="output")
    check_replaceable_file(out)  # --force replaces an older export, never a device, a pipe or a link
    _check_not_checkpoint_file(src, out)
    if exists and not force:
        raise UserError(f"output {out} exists; pass --force to overwrite it", param="output")
    if not parent:
        raise UserError(f"output folder {out.parent} does not exist", param="output")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:  # the folder takes a new file (read-only or immutable folders, /proc, /sys): known before loading
        tmp.open("xb").close()
        tmp.unlink()
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}", param="output") from None
    _tokenizer_json(src)
    try:  # refuse what llama.cpp cannot run before loading the weights (load_model reports a bad file)
        raw = read_config(src / "config.json")
    except UserError:
        raw = None
    if isinstance(raw, dict) and isinstance(raw.get("model_type"), str):
        check_exportable(SimpleNamespace(**{k: v for k, v in raw.items() if isinstance(k, str)}))
    model, tokenizer = load_model(str(src), dtype=torch.float32)
    try:
        with torch.no_grad():
            info = _write(model, tokenizer, src, tmp, dtype)
        os.replace(tmp, out)
    except OSError as exc:  # the disk filled up, the folder went away meanwhile
        full = full_disk(exc, out)
        if full is not None:  # the machine's disk, not the output named: said as `prune` says it
            raise full
        raise UserError(f"could not write {out}: {exc.strerror or exc}", param="output") from None
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "dtype": dtype, "bytes": out.stat().st_size, **info}

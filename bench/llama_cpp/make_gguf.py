"""GGUF files of the text stack llama_mm runs text-only: a llama.cpp `llama` model with the self-attention layers of
an Mllama checkpoint (its weights, not new random ones), then llama-quantize to Q8_0 and Q4_0, with and without
`--pure`.

Mllama run without an image skips its cross-attention layers, so the text-only model is: the embedding table (its
first vocab_size rows; the extra `<|image|>` rows are never read as text), the self-attention decoder layers in
order, the final norm and lm_head, llama3 rope. The GGUF carries exactly that: blk.i = the i-th self-attention layer,
q/k rows permuted into llama.cpp's rope layout as llama.cpp's convert_hf_to_gguf.py does, `rope_freqs` the llama3
factors, and a `none` tokenizer with vocab_size dummy tokens (llama-bench feeds random token ids; nothing tokenizes).

    python bench/llama_cpp/make_gguf.py --checkpoint DIR --out DIR   # writes bf16, f16, q8_0[_pure], q4_0[_pure]
"""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import LlamaCpp, build  # noqa: E402

# GGUF name of each tensor of a self-attention decoder layer (llama.cpp's `llama` arch) -> Mllama's name in the layer
LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# the formats compared: GGUF file stem -> llama-quantize type and its extra arguments (None: written here directly)
FORMATS = {
    "bf16": None, "f16": None,
    "q8_0": ("Q8_0", []), "q8_0_pure": ("Q8_0", ["--pure"]),
    "q4_0": ("Q4_0", []), "q4_0_pure": ("Q4_0", ["--pure"]),
}


def gguf_module(llama: LlamaCpp):
    """llama.cpp's own gguf-py, of the same commit as the binaries."""
    sys.path.insert(0, str(llama.gguf_py))
    import gguf

    return gguf


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half rope layout -> llama.cpp's interleaved one: the rows of each head reordered (pairs (j,
    j + D/2) become (2j, 2j + 1)), as convert_hf_to_gguf.py's LlamaModel.permute."""
    out_features = w.shape[0]
    return w.reshape(n_head, 2, out_features // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def text_only_tensors(checkpoint: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(TextConfig, {GGUF name: tensor in HF [out, in] layout}) for the text stack run without an image."""
    from llama_mm.config import MllamaConfig
    from llama_mm.weights import load_checkpoint

    t = MllamaConfig.from_pretrained(checkpoint).text
    ckpt = load_checkpoint(checkpoint)
    lm = "language_model.model."
    out = {"token_embd.weight": ckpt[lm + "embed_tokens.weight"][:t.vocab_size],  # (vocab, hidden)
           "output_norm.weight": ckpt[lm + "norm.weight"],
           "output.weight": ckpt["language_model.lm_head.weight"]}  # (vocab, hidden)
    self_layers = [i for i in range(t.num_hidden_layers) if i not in t.cross_attention_layers]
    for blk, layer in enumerate(self_layers):
        for gguf_name, hf_name in LAYER_TENSORS.items():
            w = ckpt[f"{lm}layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = rope_permute(w, t.num_attention_heads)
            elif gguf_name == "attn_k":
                w = rope_permute(w, t.num_key_value_heads)
            out[f"blk.{blk}.{gguf_name}.weight"] = w
    # llama.cpp divides each rope frequency by its factor: factor = default frequency / llama3 frequency
    default = dataclasses.replace(t.rope, rope_type="default")
    out["rope_freqs.weight"] = default.inv_freq(t.head_dim) / t.rope.inv_freq(t.head_dim)
    return t, out


def write_gguf(checkpoint: Path, path: Path, dtype: str, llama: LlamaCpp) -> Path:
    """The text-only model as GGUF in `dtype` ("bf16" or "f16"; norms and rope factors in f32)."""
    gguf = gguf_module(llama)
    t, tensors = text_only_tensors(checkpoint)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("llama_mm text-only benchmark stack")
    w.add_file_type({"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16}[dtype])
    w.add_vocab_size(t.vocab_size)
    w.add_context_length(t.max_position_embeddings)
    w.add_embedding_length(t.hidden_size)
    w.add_block_count(t.num_hidden_layers - len(t.cross_attention_layers))
    w.add_feed_forward_length(t.intermediate_size)
    w.add_head_count(t.num_attention_heads)
    w.add_head_count_kv(t.num_key_value_heads)
    w.add_rope_dimension_count(t.head_dim)
    w.add_rope_freq_base(t.rope.theta)
    w.add_layer_norm_rms_eps(t.rms_norm_eps)
    w.add_tokenizer_model("none")
    for name, tensor in tensors.items():
        if tensor.dim() == 1:
            w.add_tensor(name, tensor.float().numpy())
        elif dtype == "f16":
            w.add_tensor(name, tensor.to(torch.float16).numpy())
        else:  # numpy has no bfloat16: the raw 16-bit words, typed BF16
            w.add_tensor(name, tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy(),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def quantize(llama: LlamaCpp, src: Path, dst: Path, qtype: str, extra: list[str]) -> Path:
    done = subprocess.run(["nice", "-n", "10", str(llama.tool("llama-quantize")), *extra, str(src), str(dst), qtype,
                           "2"], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"llama-quantize {src} -> {qtype} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    return dst


def tensor_summary(path: Path, llama: LlamaCpp) -> dict:
    """What the file holds: the type of each tensor role (blk.N.* grouped: `blk.*.attn_q`), the file's bytes, and
    the weight bytes one decode step reads (every tensor, but one row of token_embd)."""
    gguf = gguf_module(llama)
    reader = gguf.GGUFReader(str(path))
    types: dict[str, set[str]] = {}
    step_bytes = 0
    for t in reader.tensors:
        role = t.name if not t.name.startswith("blk.") else "blk.*." + t.name.split(".", 2)[2]
        types.setdefault(role.removesuffix(".weight"), set()).add(t.tensor_type.name)
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1  # ggml order: shape[0] is the row length
        step_bytes += t.n_bytes // rows if t.name == "token_embd.weight" else int(t.n_bytes)
    return {"file_bytes": path.stat().st_size,
            "tensor_types": {role: "/".join(sorted(ts)) for role, ts in sorted(types.items())},
            "weight_bytes_read_per_token": step_bytes}


def make_all(checkpoint: Path, out: Path, llama: LlamaCpp) -> dict[str, Path]:
    """Every file of FORMATS under `out` (quantized from the bf16 file, the checkpoint's own precision); a file
    already there is kept (delete `out` to remake them)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for stem, how in FORMATS.items():
        path = out / f"text_{stem}.gguf"
        if path.exists():
            files[stem] = path
            continue
        part = path.with_suffix(".part")  # renamed when complete: an interrupted run leaves no file to reuse
        if how is None:
            write_gguf(checkpoint, part, stem, llama)
        else:
            quantize(llama, files["bf16"], part, *how)
        files[stem] = part.rename(path)
        print(f"wrote {path}", flush=True)
    return files


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="an Mllama checkpoint directory")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    llama = build()
    for stem, path in make_all(args.checkpoint, args.out, llama).items():
        print(stem, tensor_summary(path, llama))


if __name__ == "__main__":
    main()

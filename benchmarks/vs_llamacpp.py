"""ternlm against llama.cpp (through llama-cpp-python) on BitNet b1.58 2B4T shapes, side by side in one run.

    pip install gguf==0.19.0
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" pip install llama-cpp-python==0.3.36   # ~4 min on 2 cores
    python benchmarks/vs_llamacpp.py [--threads 1 2] [--reps 3] [--pp512] [--formats tq2_0 tq1_0]
                                     [--heads f16 q8_0 q6_k] [--cache DIR]

The random 2B4T-shaped model (benchmarks/make_2b4t_shapes.py) is written once to --cache (default
~/.cache/ternlm-bench/), and the SAME ternary weights once per (format, head) as a llama.cpp GGUF: arch `bitnet`,
TQ2_0/TQ1_0 projections holding ternary x per-tensor scale (the same scale in every 256-block), F32 norms, the tied
embedding/head `token_embd` in F16, Q8_0 or Q6_K, and a dummy 128256-token vocab (the benchmark feeds token ids).
llama.cpp's `bitnet` arch is the SiLU-gated 1bitLLM variant while 2B4T uses relu²: the weights read and the matmuls
done are the same, so the speed comparison holds although the logits differ.

pp = one batch of --pp tokens from an empty context; tg = 64 single-token steps after it (greedy argmax), like
llama-bench. Engines alternate within each rep and the medians of --reps are reported; the machine is shared, so
compare figures from one run only. Decode ceiling = measured bandwidth (ternlm.kernels.read_bandwidth: one pass over
1 GiB with all threads, best of 3) / bytes read per token.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time
from pathlib import Path

import gguf  # gguf==0.19.0
import llama_cpp  # llama-cpp-python==0.3.36
import numpy as np
from bench_decode import bench as bench_ternlm
from make_2b4t_shapes import CONFIG
from make_2b4t_shapes import main as make_model
from safetensors.numpy import load_file

import ternlm
from ternlm import kernels
from ternlm.formats.hf import unpack_hf

QT = gguf.GGMLQuantizationType
FORMATS = {"tq2_0": QT.TQ2_0, "tq1_0": QT.TQ1_0}
FILE_TYPES = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}
HEADS = {"f16": QT.F16, "q8_0": QT.Q8_0, "q6_k": QT.Q6_K}
TERNLM_HEADS = {"f16": "float"}  # ternlm.load(head=...) names, where they differ; "float" keeps the F16 checkpoint
GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.attn_sub_norm": "attn_sub_norm",
    "mlp.ffn_sub_norm": "ffn_sub_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """(rows, cols) float32 -> ggml block_q6_K bytes (gguf-py has no Q6_K quantizer). Plain absmax, exact layout."""
    n = x.size // 256
    b = x.reshape(n, 16, 16)
    sub = np.abs(b).max(-1) / 31  # (n, 16) step per 16-value sub-block
    d = (sub.max(-1, keepdims=True) / 127).astype(np.float16)
    sc = np.round(sub / np.maximum(d.astype(np.float32), 1e-30)).clip(-128, 127).astype(np.int8)
    step = np.maximum(d.astype(np.float32) * sc, 1e-30)[..., None]
    q = (np.round(b / step).clip(-32, 31) + 32).astype(np.uint8).reshape(n, 256)
    lo, hi = (q & 15).reshape(n, 2, 2, 64), (q >> 4).reshape(n, 2, 4, 32)
    ql = lo[:, :, 0] | lo[:, :, 1] << 4
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6
    return np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d.view(np.uint8)],
                          axis=-1).reshape(x.shape[0], -1)


def quantize(x: np.ndarray, qtype: QT, rows: int = 8192) -> np.ndarray:
    """gguf.quants.quantize (or Q6_K above), a block of rows at a time to bound the float32 copies."""
    q = quantize_q6_k if qtype == QT.Q6_K else lambda a: gguf.quants.quantize(a, qtype)
    return np.concatenate([q(x[i:i + rows].astype(np.float32)) for i in range(0, len(x), rows)])


def write_gguf(hf: Path, out: Path, fmt: str, head: str) -> None:
    c = CONFIG
    dim, heads, vocab = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    w = gguf.GGUFWriter(str(out) + ".tmp", "bitnet")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(dim)
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_dimension_count(dim // heads)
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_vocab_size(vocab)
    w.add_file_type(FILE_TYPES[fmt])
    w.add_tokenizer_model("gpt2")  # ids only: llama.cpp needs a vocab of the right size, not a real one
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_token_merges(["< t"])  # llama.cpp refuses a BPE vocab without merges
    w.add_bos_token_id(c["bos_token_id"])
    w.add_eos_token_id(c["eos_token_id"])
    top = load_file(str(hf / "embed.safetensors"))
    w.add_tensor("token_embd.weight", quantize(top["model.embed_tokens.weight"], HEADS[head]), raw_dtype=HEADS[head])
    w.add_tensor("output_norm.weight", top["model.norm.weight"])
    del top
    for i in range(c["num_hidden_layers"]):
        layer, p = load_file(str(hf / f"layer-{i:02d}.safetensors")), f"model.layers.{i}."
        for name, gname in GGUF_NAMES.items():
            t = layer[p + name + ".weight"]
            if t.dtype == np.uint8:  # packed codes w+1; autobitlinear "offline" multiplies by weight_scale
                ternary = (unpack_hf(t, 4 * t.shape[0]).astype(np.int8) - 1).astype(np.float32)
                t = quantize(ternary * layer[p + name + ".weight_scale"][0], FORMATS[fmt])
                w.add_tensor(f"blk.{i}.{gname}.weight", t, raw_dtype=FORMATS[fmt])
            else:
                w.add_tensor(f"blk.{i}.{gname}.weight", t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    Path(str(out) + ".tmp").rename(out)


def bench_llama(llm: llama_cpp.Llama, pp: int, tg: int) -> tuple[float, float]:
    """(prefill tok/s for one batch of pp tokens, decode tok/s for tg tokens after them), as ternlm's bench."""
    prompt = np.random.default_rng(0).integers(0, llm.n_vocab(), pp).tolist()
    llm.reset()  # eval() drops the KV cache beyond n_tokens
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(tg):  # Llama.scores stays empty unless logits_all: read the last row from the context
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        llm.eval([int(logits.argmax())])
    t2 = time.perf_counter()
    return pp / (t1 - t0), tg / (t2 - t1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pp512", action="store_true", help="also time a 512-token prefill")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=["tq2_0"])
    ap.add_argument("--heads", nargs="+", choices=HEADS, default=["f16", "q8_0", "q6_k"])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ternlm-bench")
    args = ap.parse_args()
    pps = [128, 512] if args.pp512 else [128]

    hf = args.cache / "2b4t-random"
    if not (hf / "config.json").exists():  # written last by make_model
        t0 = time.perf_counter()
        make_model(hf)
        print(f"wrote {hf} in {time.perf_counter() - t0:.0f} s")
    engines = {}  # label -> (engine, format, head, bytes per token, bench(pp, tg), set_threads(n))
    load_params = inspect.signature(ternlm.load).parameters
    for head in args.heads if "head" in load_params else [None]:
        try:
            model = ternlm.load(hf, head=TERNLM_HEADS.get(head, head)) if head else ternlm.load(hf)
        except (ternlm.TernlmError, ValueError) as e:
            print(f"ternlm head={head}: skipped ({e})")
            continue
        info = model.info()
        engines[f"ternlm {head}"] = ("ternlm", "hf-packed", head or info["head_dtype"], info["bytes_per_token"],
                                     lambda pp, tg, m=model: bench_ternlm(m, pp, tg), kernels.set_threads)
    for fmt in args.formats:
        for head in args.heads:
            path = args.cache / f"2b4t-random-{fmt}-{head}.gguf"
            if not path.exists():
                t0 = time.perf_counter()
                write_gguf(hf, path, fmt, head)
                print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")
            nbytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)
            llm = llama_cpp.Llama(str(path), n_threads=1, n_threads_batch=1, n_ctx=max(pps) + 128, n_batch=512,
                                  logits_all=False, verbose=False)
            engines[f"llama {fmt} {head}"] = ("llama.cpp", fmt, head, nbytes,
                                              lambda pp, tg, m=llm: bench_llama(m, pp, tg),
                                              lambda n, m=llm: llama_cpp.llama_set_n_threads(m.ctx, n, n))

    kernels.set_threads(max(args.threads))
    bw = kernels.read_bandwidth()
    print(f"memory bandwidth ({max(args.threads)} threads, one pass over 1 GiB, best of 3): {bw / 1e9:.1f} GB/s; "
          f"reps {args.reps}")
    results: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    for threads in args.threads:
        for *_, fn, set_threads in engines.values():
            set_threads(threads)
            fn(8, 4)  # warm up: page in the weights, start thread pools
        for _ in range(args.reps):  # alternate engines inside each rep
            for label, (*_, fn, set_threads) in engines.items():
                set_threads(threads)
                run = fn(128, 64)
                extra = tuple(fn(pp, 0)[0] for pp in pps[1:])
                results.setdefault((label, threads), []).append((run[0], *extra, run[1]))

    ref = {}  # (head, threads) -> ternlm medians, for the ratios
    cols = [f"pp{pp}" for pp in pps] + ["tg64"]
    print(f"\n{'engine':10} {'weights':9} {'head':5} {'thr':>3} " + " ".join(f"{c:>7}" for c in cols)
          + f" {'MB/tok':>7} {'GB/s':>5} {'ceiling':>7}  ternlm/llama.cpp " + " ".join(cols))
    for (label, threads), runs in results.items():
        engine, fmt, head, nbytes, *_ = engines[label]
        med = [statistics.median(r[i] for r in runs) for i in range(len(cols))]
        line = (f"{engine:10} {fmt:9} {head:5} {threads:3d} " + " ".join(f"{m:7.1f}" for m in med)
                + f" {nbytes / 1e6:7.0f} {med[-1] * nbytes / 1e9:5.1f} {bw / nbytes:7.1f}")
        if engine == "ternlm":
            ref[(head, threads)] = med
        else:
            base = ref.get((head, threads)) or next((v for (h, t), v in ref.items() if t == threads), None)
            if base:
                line += "  " + " ".join(f"{b / m:5.2f}x" for b, m in zip(base, med, strict=True))
        print(line)
    print("ceiling = measured bandwidth / bytes per token (tg tok/s)")
    print("ratios use the ternlm row of the same head and threads "
          "(else ternlm's own head)")


if __name__ == "__main__":
    main()

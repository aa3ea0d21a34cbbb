#!/usr/bin/env python3
"""Writes the goldens that engine/analyzer_test.cc checks the retriv analyzer and BM25 against.

They come from retriv 0.2.3 itself (the retriever of the DBSA reference code), run with the
reference's settings: SparseRetriever(model="bm25", min_df=1, tokenizer="whitespace",
stemmer="english", do_lowercasing, ampersand/special-chars/acronyms normalisation and punctuation
removal all on, hyperparams default {b: 0.75, k1: 1.2}). retriv's "english" stop words come from
NLTK's corpus, which needs a download no machine here can make, so retriv is handed an explicit
list instead: a short list written for the synthetic corpus (it exercises the quirks), and for the
NLU goldens the English list of Debian's liblingua-stopwords-perl, the same list shotdb builds in
as its default (engine/default_stopwords.cmake).

The script also compares NLTK's SnowballStemmer("english") (retriv's stemmer) with libstemmer's
English stemmer (shotdb's) word by word over Snowball's English test vocabulary (Debian's
snowball-data) and the NLU vocabulary, and stops if any word differs (docs/bm25.md records the
result).

Setup (a venv; retriv's declared dependencies pull the CUDA torch stack, so --no-deps):
  python3 -m venv /tmp/rv && /tmp/rv/bin/pip install --no-deps retriv==0.2.3
  /tmp/rv/bin/pip install numba nltk pystemmer krovetzstemmer unidecode scikit-learn indxr \
      oneliner_utils multipipe orjson tqdm
  apt-get install liblingua-stopwords-perl snowball-data libstemmer-dev
Usage (from the repository root):
  /tmp/rv/bin/python tests/scripts/make_retriv_golden.py [--data-dir ../shared/data]

Outputs:
  tests/fixtures/bm25/retriv_golden.json      the synthetic corpus, its terms, full retriv scores
  tests/fixtures/bm25/nlu_retriv_golden.json  only with the NLU CSVs: per test utterance the top-10
                                              blocks (50 formatted rows each) and the top-10 single
                                              formatted demonstrations, with scores (no CSV text)
"""
import argparse
import csv
import ctypes
import importlib.util
import json
import os
import pathlib
import re
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures", "bm25")
LINGUA_EN = "/usr/share/perl5/Lingua/StopWords/EN.pm"
SNOWBALL_VOC = "/usr/share/snowball/data/english/voc.txt"
TEMPLATE = "utterance: {text}\nintent: {label}"
SEPARATOR = "\n==\n"
BLOCK_ROWS = 50
TOP_K = 10

# Written for this test: stop words whose stems differ from themselves ("does" -> "doe"), with an
# apostrophe that punctuation removal splits away ("i'm"), upper case, and plain ones.
SYNTHETIC_STOPWORDS = ["the", "a", "is", "does", "i'm", "What", "and", "of", "to", "it", "being"]

SYNTHETIC_DOCS = [
    "Wake me up at 7 A.M. tomorrow!",
    "what's the weather & rain in New York?",
    "Play the Beatles' songs, please.",
    "running runs ran runner; generously generous generation",
    "U.S.A. e.g. 3.5 km a.b c. d .e ends with a dot.",
    "\u2018quoted\u2019 \u201cdouble\u201d \u2013 dash \u2014 em-dash \u00b4acute\u00b4",
    "na\u00efve caf\u00e9 CAF\u00c9 stra\u00dfe",
    "tab\tseparated\u00a0nbsp\u2003em-space\u3000ideographic",
    "does doesn't don't I'm it's being is the a",
    "email: x.y.z@example.com 1.5.3 ... ?!",
    "set an alarm for 6:30 am & remind me",
    "the the the alarm alarm",
    "",
    "Hello...world..again. .5 and 5. and 5.5",
    "UPPER lower MiXeD ThE DOES",
    "news skies dying lying tying idly gently early only singly",
]
SYNTHETIC_QUERIES = [
    "wake me up tomorrow",
    "weather in new york",
    "play songs by the beatles",
    "run generation",
    "usa 3.5",
    "quoted dash",
    "caf\u00e9",
    "alarm",
    "does it",
    "nothing matches xyzzy",
    "the",
    "alarm alarm remind",
]


def import_sparse_retriever():
    """retriv/__init__.py imports the dense retriever (torch, transformers, faiss); the sparse one
    needs none of them, so register the package without running its __init__."""
    spec = importlib.util.find_spec("retriv")
    pkg = types.ModuleType("retriv")
    pkg.__path__ = [str(pathlib.Path(spec.origin).parent)]
    sys.modules["retriv"] = pkg
    autotune = types.ModuleType("retriv.autotune")  # optuna/ranx, only for tuning
    autotune.tune_bm25 = None
    sys.modules["retriv.autotune"] = autotune
    from retriv.sparse_retriever.sparse_retriever import SparseRetriever
    return SparseRetriever


def lingua_stopwords():
    text = open(LINGUA_EN, encoding="utf-8").read()
    body = re.search(r"sub _stopwords[^q]*qw\(([^)]*)\)", text).group(1)
    return body.split()


def make_retriever(SparseRetriever, stopwords, texts):
    sr = SparseRetriever(index_name="shotdb-golden", model="bm25", min_df=1,
                         tokenizer="whitespace", stemmer="english", stopwords=list(stopwords),
                         do_lowercasing=True, do_ampersand_normalization=True,
                         do_special_chars_normalization=True, do_acronyms_normalization=True,
                         do_punctuation_removal=True)
    sr.index([{"id": str(i), "text": t} for i, t in enumerate(texts)], show_progress=False)
    return sr


def search(sr, query, cutoff):
    return {int(d): float(s) for d, s in sr.search(query, return_docs=False, cutoff=cutoff).items()}


def ascii_lower(text):
    return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)


def words_reaching_stemmer(texts):
    """The tokens retriv's pipeline hands its stemmer (everything but stop words and stemming)."""
    from retriv.sparse_retriever.preprocessing import normalization as n
    words = []
    for t in texts:
        x = n.normalize_acronyms(n.normalize_special_chars(n.normalize_ampersand(t.lower())))
        words += n.strip_whitespaces(n.remove_punctuation(x)).split()
    return words


def compare_stemmers(extra_words):
    import nltk
    lib = ctypes.CDLL("libstemmer.so.0d")
    lib.sb_stemmer_new.restype = ctypes.c_void_p
    lib.sb_stemmer_new.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.sb_stemmer_stem.restype = ctypes.c_void_p
    lib.sb_stemmer_stem.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.sb_stemmer_length.argtypes = [ctypes.c_void_p]
    st = lib.sb_stemmer_new(b"english", b"UTF_8")

    def libstem(word):
        data = word.encode("utf-8")
        p = lib.sb_stemmer_stem(st, data, len(data))
        return ctypes.string_at(p, lib.sb_stemmer_length(st)).decode("utf-8")

    nltk_stem = nltk.stem.SnowballStemmer("english").stem
    words = set(extra_words)
    if os.path.exists(SNOWBALL_VOC):
        words |= set(words_reaching_stemmer(open(SNOWBALL_VOC, encoding="utf-8").read().split()))
    differ = [(w, libstem(w), nltk_stem(w)) for w in sorted(words)
              if len(w) > 2 and libstem(w) != nltk_stem(w)]
    return len(words), differ


def synthetic_golden(SparseRetriever):
    sr = make_retriever(SparseRetriever, SYNTHETIC_STOPWORDS, SYNTHETIC_DOCS)
    texts = SYNTHETIC_DOCS + SYNTHETIC_QUERIES
    return {
        "generator": "tests/scripts/make_retriv_golden.py (retriv 0.2.3)",
        "bm25": {"k1": 1.2, "b": 0.75, "idf": "log(1 + (N - df + 0.5) / (df + 0.5))"},
        "stopwords": SYNTHETIC_STOPWORDS,
        "stemmed_stopwords": sorted(set(sr.stopwords)),
        "texts": texts,
        "terms": [sr.query_preprocessing(t) for t in texts],
        # False where Python's str.lower() changes more than ASCII letters (shotdb lowers ASCII
        # only, a documented difference): the test does not compare those texts' terms.
        "ascii_case": [t.lower() == ascii_lower(t) for t in texts],
        "num_docs": len(SYNTHETIC_DOCS),
        # Every document retriv scores (those sharing a term with the query), as {doc: score}.
        "scores": [{str(d): s for d, s in search(sr, q, len(SYNTHETIC_DOCS)).items()}
                   for q in SYNTHETIC_QUERIES],
    }


def nlu_golden(SparseRetriever, data_dir):
    labels = {}
    for line in open(os.path.join(data_dir, "nlu_labels.txt"), encoding="utf-8"):
        key, text = line.rstrip("\n").split("\t")
        labels[key] = text
    with open(os.path.join(data_dir, "nlu_evaluation_data_train.csv"), newline="") as f:
        rows = [(r["text"], labels[r["label"]]) for r in csv.DictReader(f)]
    with open(os.path.join(data_dir, "nlu_evaluation_data_test.csv"), newline="") as f:
        queries = [r["text"] for r in csv.DictReader(f)]
    demos = [TEMPLATE.replace("{text}", t).replace("{label}", l) for t, l in rows]
    blocks = [SEPARATOR.join(demos[i:i + BLOCK_ROWS]) for i in range(0, len(demos), BLOCK_ROWS)]
    stop = lingua_stopwords()
    out = {"generator": "tests/scripts/make_retriv_golden.py (retriv 0.2.3)",
           "stopwords": "Lingua::StopWords EN (Debian liblingua-stopwords-perl)",
           "num_stopwords": len(stop), "template": TEMPLATE, "separator": SEPARATOR,
           "block_rows": BLOCK_ROWS, "num_train_rows": len(rows), "num_queries": len(queries)}
    for name, docs in (("blocks", blocks), ("demos", demos)):
        sr = make_retriever(SparseRetriever, stop, docs)
        tops = []
        for q in queries:
            hits = sorted(search(sr, q, TOP_K).items(), key=lambda kv: (-kv[1], kv[0]))
            tops.append([{"doc": d, "score": s} for d, s in hits])
        out[name] = {"num_docs": len(docs), "top": tops}
    return out, words_reaching_stemmer(t for t, _ in rows)


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
    os.environ["RETRIV_BASE_PATH"] = tempfile.mkdtemp(prefix="retriv-")
    SparseRetriever = import_sparse_retriever()
    write("retriv_golden.json", synthetic_golden(SparseRetriever))
    words = words_reaching_stemmer(SYNTHETIC_DOCS + SYNTHETIC_QUERIES)
    if os.path.exists(os.path.join(args.data_dir, "nlu_evaluation_data_train.csv")):
        golden, nlu_words = nlu_golden(SparseRetriever, args.data_dir)
        write("nlu_retriv_golden.json", golden)
        words += nlu_words
    else:
        print("NLU data not found under", args.data_dir, "- nlu_retriv_golden.json not written")
    checked, differ = compare_stemmers(words)
    print(f"stemmers: {checked} words, {len(differ)} differ between NLTK and libstemmer")
    for w, a, b in differ:
        print(f"  {w}: libstemmer {a}, nltk {b}")
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()

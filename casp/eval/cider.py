"""CIDEr-D (Vedantam et al. 2015, "CIDEr: Consensus-based Image Description Evaluation").

Same definition as the CIDEr-D scorer of the COCO caption evaluation (pycocoevalcap), written from
the paper and that definition:

* g_k(s): counts of the n-grams of sentence s (n = 1..4).
* Document frequency df(w) = number of evaluated images whose references contain n-gram w
  (counted over the references of the evaluated set only); with I images,
  idf(w) = log(I) - log(max(1, df(w))).
* tf-idf vectors per n: v_n(s)[w] = g_w(s) * idf(w).
* Per candidate c and reference r, for each n:
  sim_n(c, r) = sum_w min(v_n(c)[w], v_n(r)[w]) * v_n(r)[w] / (|v_n(c)| |v_n(r)|)   (clipping)
               * exp(-(l(c) - l(r))^2 / (2 sigma^2))                              (length penalty)
* CIDEr-D(c, refs) = 10 * mean_n( sum_r sim_n(c, r) / |refs| ).

Lengths: the reference scorer measures l(s) as the number of bigrams of s (words - 1), which equals
the word-count difference for any two non-empty sentences; we keep that convention so scores match
it exactly. Note that with a single image every idf is 0 and so is every score (a property of
CIDEr, not a bug): evaluate a set of images.

Sentences are expected tokenized (space separated); :func:`tokenize_caption` is a simple
lowercasing, punctuation-stripping tokenizer standing in for the Java PTB tokenizer.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

from casp.eval.errors import EvalError

NGram = tuple[str, ...]
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize_caption(text: str) -> str:
    """Lowercase, drop punctuation, single-space the words."""
    return " ".join(_TOKEN.findall(text.lower()))


def ngram_counts(sentence: str, n: int = 4) -> Counter[NGram]:
    """Counts of every k-gram of the space-split sentence, k = 1..n."""
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _tfidf(
    counts: Counter[NGram], doc_freq: Counter[NGram], log_num_images: float, n: int
) -> tuple[list[dict[NGram, float]], list[float], int]:
    """Per-order tf-idf vectors, their norms, and the length (number of bigrams, see module doc)."""
    vecs: list[dict[NGram, float]] = [{} for _ in range(n)]
    for gram, tf in counts.items():
        vecs[len(gram) - 1][gram] = tf * (log_num_images - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vecs]
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vecs, norms, length


def cider_d(
    candidates: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, list[float]]:
    """Corpus CIDEr-D: (mean score, per-candidate scores). Inputs are tokenized strings."""
    if len(candidates) != len(references):
        raise EvalError(f"CIDEr: {len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        raise EvalError("CIDEr: nothing to score (no candidates)")
    if any(len(refs) == 0 for refs in references):
        raise EvalError("CIDEr: every candidate needs at least one reference caption")
    ref_counts = [[ngram_counts(r, n) for r in refs] for refs in references]
    doc_freq: Counter[NGram] = Counter()
    for refs in ref_counts:
        doc_freq.update({gram for counts in refs for gram in counts})
    log_num_images = math.log(len(candidates))

    scores = []
    for cand, refs in zip(candidates, ref_counts):
        vec_c, norm_c, len_c = _tfidf(ngram_counts(cand, n), doc_freq, log_num_images, n)
        total = [0.0] * n
        for counts in refs:
            vec_r, norm_r, len_r = _tfidf(counts, doc_freq, log_num_images, n)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2.0 * sigma**2))
            for k in range(n):
                dot = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, v in vec_c[k].items())
                if norm_c[k] != 0.0 and norm_r[k] != 0.0:
                    dot /= norm_c[k] * norm_r[k]
                total[k] += dot * penalty
        scores.append(10.0 * sum(total) / n / len(refs))
    return sum(scores) / len(scores), scores

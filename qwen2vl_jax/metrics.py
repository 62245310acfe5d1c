"""Answer metrics that VLM users report: exact match, VQA accuracy, ANLS (DocVQA), relaxed accuracy (ChartQA).

Each metric scores one prediction against one or more reference answers and returns a float in [0, 1];
`score_all` applies every metric and `aggregate` averages a list of scored examples.

- exact match: equal after trimming, lower-casing, collapsing spaces and dropping a final period.
- VQA accuracy (VQAv2 / TextVQA, Antol et al. 2015): answers normalised as the official evaluation
  (EvalAI answer processor: punctuation, number words to digits, articles, contractions). With several human
  answers, the official leave-one-out average of min(1, matches / 3); with one reference this is 0 or 1 for a
  normalised exact match (the official formula would cap a lone reference at 0). The official script skips
  normalisation when all references agree; here every answer is normalised, so "A dog." equals "dog" always.
- ANLS (ST-VQA, Biten et al. 2019; DocVQA): 1 - normalised Levenshtein distance against the closest reference,
  0 when that distance is >= 0.5; strings compared after trimming, lower-casing and collapsing spaces.
- relaxed accuracy (ChartQA, Masry et al. 2022): numbers within 5 % relative error of the reference count as
  correct ("12%" reads as 0.12); anything else needs a case-insensitive exact match (pix2struct/lmms-eval rule).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

# -- normalisation --------------------------------------------------------------------------------------

# The official VQA evaluation tables (vqaEval.py), used unchanged by EvalAI and lmms-eval.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
          "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")   # sic: the official pattern (a period not before a digit)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # A mark next to a space (or any text with a digit,digit comma) is deleted; otherwise it splits words.
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa(answer: str) -> str:
    """The EvalAI VQA answer processor: "Two dogs." -> "2 dogs", "The cat's toy" -> "cat 's toy"."""
    text = answer.lower().replace("\n", " ").replace("\t", " ").strip()
    text = text.replace(",", "").replace("?", "").replace("'s", " 's")
    return _process_digit_article(_process_punctuation(text))


def normalize_text(answer: str) -> str:
    """Trim, lower-case, collapse white space."""
    return " ".join(answer.strip().lower().split())


# -- metrics --------------------------------------------------------------------------------------------

def _refs(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("no reference answer to score against")
    return refs


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    def norm(s):
        s = normalize_text(s)
        return s[:-1].rstrip() if s.endswith(".") else s
    p = norm(prediction)
    return float(any(p == norm(r) for r in _refs(references)))


def vqa_accuracy(prediction: str, references: str | Sequence[str]) -> float:
    refs = [normalize_vqa(r) for r in _refs(references)]
    p = normalize_vqa(prediction)
    if len(refs) == 1:
        return float(p == refs[0])
    # Leave each human answer out in turn; credit min(1, matches among the other answers / 3).
    scores = [min(1.0, sum(p == r for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, references: str | Sequence[str], threshold: float = 0.5) -> float:
    p = normalize_text(prediction)
    best = 0.0
    for r in _refs(references):
        r = normalize_text(r)
        length = max(len(p), len(r))
        nl = levenshtein(p, r) / length if length else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: str | Sequence[str], tolerance: float = 0.05) -> float:
    p = prediction.strip()
    pf = _to_float(p)
    for r in _refs(references):
        r = r.strip()
        rf = _to_float(r)
        # A zero reference has no relative error, so it falls back to the string test (as the reference code).
        if pf is not None and rf:
            if abs(pf - rf) / abs(rf) <= tolerance:
                return 1.0
        elif p.lower() == r.lower():
            return 1.0
    return 0.0


METRICS = {"exact_match": exact_match, "vqa_accuracy": vqa_accuracy, "anls": anls,
           "relaxed_accuracy": relaxed_accuracy}


def score_all(prediction: str, references: str | Sequence[str], names: Iterable[str] = tuple(METRICS)) -> dict:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {sorted(METRICS)}")
    return {n: METRICS[n](prediction, references) for n in names}


def aggregate(scored: Sequence[dict], names: Iterable[str] = tuple(METRICS)) -> dict:
    """Mean of each metric over examples (dicts holding per-example scores); `count` = number of examples."""
    out = {n: (sum(s[n] for s in scored) / len(scored) if scored else 0.0) for n in names}
    out["count"] = len(scored)
    return out

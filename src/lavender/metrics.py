"""Standard benchmark metrics, computed from saved predictions.

Every metric here is the one the benchmark's own evaluator (or VLMEvalKit, the harness the paper
used) defines, re-implemented in plain Python so scoring needs no Java and no download:

- ``vqa``      VQAv2 / TextVQA / VizWiz soft accuracy: with the standard answer normalisation, an
               answer given by k of the other 9 humans scores min(k / 3, 1), averaged over the 10
               leave-one-out subsets of the 10 human answers.
- ``anls``     DocVQA / InfoVQA Average Normalised Levenshtein Similarity, threshold 0.5.
- ``relaxed``  ChartQA relaxed accuracy: numbers within 5 % of the target, other answers exact.
- ``mc``       multiple choice (MMBench, ScienceQA, AI2D, ...): a letter extracted from free text.
- ``yesno``    POPE / HallusionBench yes-no accuracy (plus POPE's precision / recall / F1 of "yes").
- ``exact``    normalised exact match with any reference.
- ``contains`` "relaxed match": a normalised reference occurs, as whole words, in the prediction.
- ``cider``    captioning: corpus CIDEr-D and BLEU-4 (COCO caption evaluation definitions).

Records carry what their metric needs: ``answers`` (a list of reference strings; for ``mc`` the
correct letter), ``choices`` (``{"A": "option text", ...}`` for ``mc``), an optional ``type`` for
per-type breakdowns, an optional ``metric`` and the model's ``prediction``. See docs/data.md.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lavender.config import METRIC_NAMES as METRICS

# ---------------------------------------------------------------------------------------------------
# VQA answer normalisation (the rules of the official VQA evaluation script, as VLMEvalKit applies them)
# ---------------------------------------------------------------------------------------------------

# punctuation that the VQA evaluator strips or turns into a space; note: no apostrophe and no period
_VQA_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
              "?", "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")  # "3.5" keeps its period, "dog." loses it
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions written without their apostrophe are restored ("dont" -> "don't"), so both spellings
# compare equal. Listed with the apostrophe; the lookup key is the word without it.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am
mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've
she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd
someone'd've someone'll someone's something'd something'd've something'll that's there'd there'd've
there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll
what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll why're
why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're
you've""".split()
_CONTRACTIONS = {w.replace("'", ""): w for w in _CONTRACTED}


def _vqa_punctuation(text: str) -> str:
    # A mark touching a space (or any text with a thousands comma) is deleted; a mark inside a word
    # becomes a space ("t-shirt" -> "t shirt"). Conditions look at the input text, as the official
    # evaluator does.
    out = text
    strip_all = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _VQA_PUNCT:
        if strip_all or (p + " ") in text or (" " + p) in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def _vqa_digits_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBER_WORDS.get(w, w)
        if w in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The VQA evaluator's answer normalisation: whitespace, punctuation, number words, articles,
    contractions, lower case. ``"Two dogs."`` -> ``"2 dogs"``, ``"the T-shirt"`` -> ``"t shirt"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles(_vqa_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction against the human answers (usually 10).

    For each human i, the prediction scores min(#{j != i : answer_j == prediction} / 3, 1); the
    result is the mean over i, i.e. over the 10 subsets of 9 humans the official evaluator averages.
    Prediction and answers are both normalised (as VLMEvalKit does; the original script skipped the
    normalisation when all humans agreed, which only penalises punctuation differences).
    With a single reference this degenerates to 0 (nobody else said it), so one reference is
    compared by exact normalised match instead.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(r == pred for r in refs)
    # leaving out human i removes one match exactly when human i said the prediction
    per_subset = [min((matches - (r == pred)) / 3.0, 1.0) for r in refs]
    return sum(per_subset) / len(per_subset)


# ---------------------------------------------------------------------------------------------------
# ANLS, relaxed accuracy, exact / contains
# ---------------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """ANLS of one prediction: max over references of 1 - NL, where NL = edit distance / longer
    length on lower-cased, whitespace-collapsed strings; NL >= ``threshold`` scores 0."""
    if not answers:
        raise ValueError("anls needs at least one reference answer")
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ans in answers:
        ref = " ".join(str(ans).strip().lower().split())
        longest = max(len(pred), len(ref))
        nl = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


def _to_float(text: str) -> float | None:
    # ChartQA convention: "45%" is 0.45, so a percentage and its fraction compare equal
    text = text.strip()
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answers: Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy: 1 if, for some reference, both parse as numbers and
    |pred - ref| / |ref| <= ``tolerance`` (a zero reference needs an exact number), or else the
    lower-cased stripped strings are equal."""
    if not answers:
        raise ValueError("relaxed_accuracy needs at least one reference answer")
    pred = prediction.strip().rstrip(".").strip()
    p = _to_float(pred)
    for ans in answers:
        ref = str(ans).strip()
        r = _to_float(ref)
        if p is not None and r is not None:
            if (r == 0 and p == 0) or (r != 0 and abs(p - r) / abs(r) <= tolerance):
                return 1.0
        elif pred.lower() == ref.lower():
            return 1.0
    return 0.0


_NON_WORD = re.compile(r"[^\w\s]")


def normalize_text(text: str) -> str:
    """Lower case, punctuation removed (decimal points and thousands commas inside numbers kept as
    digits), whitespace collapsed: the normalisation of ``exact`` and ``contains``."""
    text = re.sub(r"(?<=\d)[.,](?=\d)", "\0", text.lower())  # protect 3.5 / 1,000
    text = _NON_WORD.sub(" ", text).replace("\0", ".")
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if the normalised prediction equals a normalised reference."""
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(str(a)) for a in answers))


def contains_match(prediction: str, answers: Sequence[str]) -> float:
    """1 if some normalised reference occurs in the normalised prediction as whole words
    ("the answer is 2 dogs" contains "2 dogs" but not "2 do")."""
    pred = f" {normalize_text(prediction)} "
    return float(any(ref and f" {ref} " in pred for ref in (normalize_text(str(a)) for a in answers)))


# ---------------------------------------------------------------------------------------------------
# multiple choice and yes / no
# ---------------------------------------------------------------------------------------------------

_ANSWER_IS = re.compile(r"(?:answer|option|choice)\s*(?:is|would be|:)?\s*:?\s*\(?([A-Z])\b\)?", re.I)
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.):：]|\s*$|\s+[-–]\s)")
# a capital letter standing alone ("C", "(C)", "C."), but not the article in "A dog ..."
_LONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])(?!\s+[a-z])|(?<![A-Za-z0-9'])([B-Z])(?![A-Za-z0-9'])")


def extract_choice(prediction: str, choices: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer picks, or None if it cannot be told.

    Tried in order: a bare letter ("B", "(B)", "B."), "the answer is B" / "Answer: (B)", a leading
    "B. text" / "B) text", the text of exactly one option (the longest when one option's text
    contains another's), and finally the one valid capital letter standing alone in the text ("I
    think C"; "A" followed by a lower-case word is the article, not an option). Only letters that
    are keys of ``choices`` count; an answer naming two letters ("B or C") is ambiguous: None.
    """
    letters = {k.strip().upper() for k in choices}
    text = prediction.strip()
    if not text:
        return None
    bare = text.strip(" .()[]:*")
    if len(bare) == 1 and bare.upper() in letters:
        return bare.upper()
    for pattern in (_ANSWER_IS, _LEADING_LETTER):
        m = pattern.search(text)
        if m and m.group(1) in letters:
            return m.group(1)
    # option text: normalised whole-word containment; prefer the longest option that matches
    norm_pred = f" {normalize_text(text)} "
    hits = []
    for key, value in choices.items():
        opt = normalize_text(str(value))
        if opt and f" {opt} " in norm_pred:
            hits.append((len(opt), key.strip().upper()))
    if hits:
        hits.sort(reverse=True)
        if len(hits) == 1 or hits[0][0] > hits[1][0]:
            return hits[0][1]
        return None
    found = {m.group(1) or m.group(2) for m in _LONE_LETTER.finditer(text)} & letters
    return found.pop() if len(found) == 1 else None


_YES_NO = re.compile(r"\b(yes|no)\b", re.I)


def extract_yes_no(prediction: str) -> str | None:
    """"yes" or "no": the first of the two words in the prediction, else None."""
    m = _YES_NO.search(prediction)
    return m.group(1).lower() if m else None


# ---------------------------------------------------------------------------------------------------
# captioning: BLEU-4 and CIDEr-D (COCO caption evaluation definitions)
# ---------------------------------------------------------------------------------------------------

_CAPTION_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def caption_tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric words (an internal apostrophe kept): a Java-free stand-in for the
    PTB tokenizer of the COCO toolkit, which also lower-cases and drops punctuation. It differs only
    where PTB splits clitics ("don't" -> "do n't"), a rare case in captions."""
    return _CAPTION_TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n_max: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1))


def bleu4(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 as the COCO toolkit computes it: clipped n-gram precisions summed over the
    corpus, their geometric mean, and a brevity penalty against, per caption, the reference length
    closest to the candidate's (the shorter on ties)."""
    correct = [0] * 4
    guess = [0] * 4
    cand_len = ref_len = 0
    for pred, refs in zip(predictions, references, strict=True):
        tokens = caption_tokens(pred)
        ref_tokens = [caption_tokens(r) for r in refs]
        max_ref: Counter[tuple[str, ...]] = Counter()
        for rt in ref_tokens:
            max_ref |= _ngrams(rt, 4)  # | keeps the max count of each n-gram
        for gram, count in _ngrams(tokens, 4).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for n in range(4):
            guess[n] += max(len(tokens) - n, 0)
        cand_len += len(tokens)
        ref_len += min((abs(len(rt) - len(tokens)), len(rt)) for rt in ref_tokens)[1]
    tiny, small = 1e-15, 1e-9  # the toolkit's smoothing: a zero precision gives ~0, never a crash
    log_p = sum(math.log((correct[n] + tiny) / (guess[n] + small)) for n in range(4)) / 4
    ratio = (cand_len + tiny) / (ref_len + small)
    brevity = 1.0 if ratio >= 1 else math.exp(1 - 1 / ratio)
    return math.exp(log_p) * brevity


def cider_d(predictions: Sequence[str], references: Sequence[Sequence[str]], sigma: float = 6.0
            ) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (Vedantam et al. 2015, the COCO toolkit's "CIDEr") and per-caption scores.

    n-grams n = 1..4 are weighted by TF-IDF, with document frequencies counted over the references
    of THIS corpus (so a score depends on the whole test set, as in the toolkit). Per n, the cosine
    similarity between candidate and each reference uses candidate counts clipped at the
    reference's, times a Gaussian penalty exp(-(len_c - len_r)^2 / (2 sigma^2)); the four n are
    averaged, then the references, and the result is multiplied by 10.
    """
    cands = [_ngrams(caption_tokens(p), 4) for p in predictions]
    refs = [[_ngrams(caption_tokens(r), 4) for r in rs] for rs in references]
    if len(cands) != len(refs):
        raise ValueError(f"{len(cands)} predictions but {len(refs)} reference lists")
    df: Counter[tuple[str, ...]] = Counter()
    for rs in refs:
        df.update(set().union(*rs) if rs else set())
    log_n = math.log(float(len(refs))) if refs else 0.0

    def tfidf(counts: Counter[tuple[str, ...]]) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(4)]
        norm = [0.0] * 4
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            w = tf * (log_n - math.log(max(1.0, df[gram])))
            vec[n][gram] = w
            norm[n] += w * w
            if n == 1:  # the toolkit measures length in bigrams (= words - 1)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, rs in zip(cands, refs):
        if not rs:
            raise ValueError("cider_d: a prediction without reference captions")
        vc, nc, lc = tfidf(cand)
        total = [0.0] * 4
        for r in rs:
            vr, nr, lr = tfidf(r)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
            for n in range(4):
                dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
                if nc[n] and nr[n]:
                    dot /= nc[n] * nr[n]
                total[n] += dot * penalty
        scores.append(sum(total) / 4 / len(rs) * 10.0)
    return (sum(scores) / len(scores) if scores else 0.0), scores


# ---------------------------------------------------------------------------------------------------
# scoring records
# ---------------------------------------------------------------------------------------------------


def _answers(rec: Mapping[str, Any], idx: int) -> list[str]:
    ans = rec.get("answers")
    if ans is None and "answer" in rec:
        ans = [rec["answer"]]
    if not isinstance(ans, list) or not ans:
        raise ValueError(f"record {idx} (id {rec.get('id')!r}): 'answers' must be a non-empty list of "
                         f"reference strings, got {ans!r}; convert the benchmark with `lavender data convert`")
    return [str(a) for a in ans]


def _mc_score(rec: Mapping[str, Any], idx: int) -> tuple[float, str | None]:
    choices = rec.get("choices")
    if not isinstance(choices, Mapping) or not choices:
        raise ValueError(f"record {idx} (id {rec.get('id')!r}): metric 'mc' needs 'choices' "
                         f"({{\"A\": \"option text\", ...}}), got {choices!r}")
    picked = extract_choice(str(rec["prediction"]), choices)
    return float(picked is not None and picked == _answers(rec, idx)[0].strip().upper()), picked


def _yesno_score(rec: Mapping[str, Any], idx: int) -> tuple[float, str | None]:
    picked = extract_yes_no(str(rec["prediction"]))
    return float(picked is not None and picked == _answers(rec, idx)[0].strip().lower()), picked


_PER_RECORD: dict[str, Callable[[str, list[str]], float]] = {
    "vqa": vqa_accuracy, "anls": anls, "relaxed": relaxed_accuracy, "exact": exact_match,
    "contains": contains_match,
}


def _score_one_metric(records: list[tuple[int, Mapping[str, Any]]], metric: str) -> tuple[dict, list[dict]]:
    per: list[dict] = []
    if metric == "cider":
        preds = [str(r["prediction"]) for _, r in records]
        refs = [_answers(r, i) for i, r in records]
        cider, each = cider_d(preds, refs)
        per = [{"id": r.get("id"), "metric": metric, "score": s} for (_, r), s in zip(records, each)]
        return {"cider": cider, "bleu4": bleu4(preds, refs), "n": len(records)}, per
    for i, rec in records:
        extracted = None
        if metric == "mc":
            s, extracted = _mc_score(rec, i)
        elif metric == "yesno":
            s, extracted = _yesno_score(rec, i)
        else:
            s = _PER_RECORD[metric](str(rec["prediction"]), _answers(rec, i))
        row = {"id": rec.get("id"), "metric": metric, "score": s}
        if metric in ("mc", "yesno"):
            row["extracted"] = extracted
        per.append(row)
    summary: dict[str, Any] = {metric: sum(p["score"] for p in per) / len(per) if per else 0.0, "n": len(per)}
    if metric == "yesno":
        summary.update(_pope_stats([(p["extracted"], _answers(r, i)[0].strip().lower())
                                    for p, (i, r) in zip(per, records)]))
    return summary, per


def _pope_stats(pairs: Iterable[tuple[str | None, str]]) -> dict[str, float]:
    """POPE's precision / recall / F1 with "yes" as the positive class; an answer that is neither
    yes nor no counts as "no" (POPE's convention), and ``yes_ratio`` shows a model's yes-bias."""
    tp = fp = fn = n = yes = 0
    for pred, gold in pairs:
        said_yes = pred == "yes"
        n += 1
        yes += said_yes
        tp += said_yes and gold == "yes"
        fp += said_yes and gold != "yes"
        fn += (not said_yes) and gold == "yes"
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes / n if n else 0.0}


def score(records: Iterable[Mapping[str, Any]], metric: str | None = None) -> dict[str, Any]:
    """Score records that carry a ``prediction``.

    Args:
        records: dicts with ``prediction``, ``answers`` (and ``choices`` for ``mc``), optional ``id``,
            ``type`` (breakdown key) and ``metric``.
        metric: one of :data:`METRICS` for every record; ``None`` uses each record's ``metric`` field,
            so one file can mix benchmarks.

    Returns:
        ``{"n": N, "overall": {metric: summary}, "by_type": {type: {metric: summary}},
        "per_record": [{"id", "metric", "score", ["extracted"]}]}`` where a summary holds the mean
        score under the metric's name and ``n`` (``cider`` holds ``cider`` and ``bleu4``, corpus level;
        ``yesno`` adds precision / recall / F1 / yes_ratio). Scores are fractions in [0, 1], CIDEr
        is on its usual scale (x10 inside the definition, typically 0..3). A per-type CIDEr uses that
        type's records as its corpus (document frequencies), as scoring that subset alone would.
    """
    groups: dict[str, list[tuple[int, Mapping[str, Any]]]] = defaultdict(list)
    for i, rec in enumerate(records):
        m = metric or rec.get("metric")
        if m not in METRICS:
            raise ValueError(f"record {i} (id {rec.get('id')!r}): metric {m!r} is not one of {METRICS}; "
                             "set the record's 'metric' field or pass metric=")
        if "prediction" not in rec or rec["prediction"] is None:
            raise ValueError(f"record {i} (id {rec.get('id')!r}) has no 'prediction' to score")
        groups[m].append((i, rec))
    out: dict[str, Any] = {"n": sum(len(g) for g in groups.values()), "overall": {}, "by_type": {},
                           "per_record": []}
    per_by_index: dict[int, dict] = {}
    for m, recs in groups.items():
        out["overall"][m], per = _score_one_metric(recs, m)
        per_by_index.update({i: p for (i, _), p in zip(recs, per)})
        by_type: dict[str, list[tuple[int, Mapping[str, Any]]]] = defaultdict(list)
        for i, rec in recs:
            if rec.get("type") is not None:
                by_type[str(rec["type"])].append((i, rec))
        for t, trecs in sorted(by_type.items()):
            out["by_type"].setdefault(t, {})[m] = _score_one_metric(trecs, m)[0]
    out["per_record"] = [per_by_index[i] for i in sorted(per_by_index)]
    return out


def format_table(result: Mapping[str, Any]) -> str:
    """A plain-text summary table of :func:`score`'s result (overall, then per type)."""
    lines = [f"{'group':<28} {'metric':<9} {'n':>7} {'score':>9}"]

    def add(group: str, summaries: Mapping[str, Mapping[str, Any]]) -> None:
        for m, s in summaries.items():
            keys = ("cider", "bleu4") if m == "cider" else (m,)
            for k in keys:
                value = s[k] if k in ("cider",) else 100.0 * s[k]
                lines.append(f"{group[:28]:<28} {k:<9} {s['n']:>7} {value:>9.2f}")

    add("overall", result["overall"])
    for t, summaries in result["by_type"].items():
        add(t, summaries)
    return "\n".join(lines)

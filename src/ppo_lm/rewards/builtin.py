"""Built-in scorers: sentiment (VADER), exact match and token F1 against a reference field, keyword
frequency, length and format. Each is a small class with the reward protocol's ``__call__``, the options it
reads from its ``reward.sources`` entry (``options``) and their checks (``check``), as every reward type has
(see :mod:`ppo_lm.rewards`)."""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

from ..configfile import range_problem
from ..errors import RewardError


class Builtin:
    """What the built-in types share: built from their config entry; no options and nothing to check unless
    they say so."""

    options: tuple[str, ...] = ()

    @staticmethod
    def check(src):
        return iter(())

    @classmethod
    def from_config(cls, src, *, device=None, key: str = "reward.sources.0"):
        return cls(src)


class Sentiment(Builtin):
    """VADER compound polarity of the completion, in [-1, 1] (Hutto & Gilbert 2014; lexicon shipped in the
    ``vaderSentiment`` wheel, no network)."""

    def __init__(self, src=None):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts, completions, fields):
        return torch.tensor([self.analyzer.polarity_scores(c)["compound"] for c in completions])


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def best_f1(prediction: str, references: list[str]) -> float:
    """The best token F1 of the prediction against any reference."""
    return max(token_f1(prediction, r) for r in references)


def reference_list(value) -> list[str]:
    """A reference field may hold a string, a list of strings, or SQuAD-style [{"text": ...}]."""
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and "text" in value:
        return reference_list(value["text"])
    if isinstance(value, (list, tuple)):
        refs = [r for v in value for r in reference_list(v)]
        return refs or [""]
    return [str(value)]


class ReferenceAnswers(Builtin):
    """Scorers against the reference answer(s) in a dataset field (named by ``field``)."""

    options = ("field",)

    @staticmethod
    def check(src):
        if not src.field:
            yield "field", "names the dataset field holding the reference answer(s); it is empty"

    def __init__(self, src):
        self.field = src.field

    def refs(self, fields, n):
        if self.field not in fields:
            raise RewardError(f"the dataset has no field {self.field!r} (fields: {', '.join(sorted(fields)) or 'none'})",
                              f"reward ({type(self).__name__.lower()})")
        return [reference_list(v) for v in fields[self.field]]


class ExactMatch(ReferenceAnswers):
    """1 if the normalised completion equals a normalised reference answer, else 0."""

    def __call__(self, prompts, completions, fields):
        return torch.tensor([exact_match(c, refs) for c, refs in zip(completions, self.refs(fields, len(completions)))])


class F1(ReferenceAnswers):
    """Best token F1 (SQuAD definition) between the completion and any reference answer."""

    def __call__(self, prompts, completions, fields):
        return torch.tensor([best_f1(c, refs) for c, refs in zip(completions, self.refs(fields, len(completions)))])


class Keyword(Builtin):
    """Fraction of the completion's words that are in ``words`` (0 for an empty completion)."""

    options = ("words",)

    @staticmethod
    def check(src):
        if not src.words:
            yield "words", "a 'keyword' reward needs a non-empty list of words"

    def __init__(self, src):
        self.words = {w.lower() for w in src.words}

    def __call__(self, prompts, completions, fields):
        out = []
        for c in completions:
            toks = re.findall(r"\w+|[^\w\s]", c.lower())
            out.append(sum(t in self.words for t in toks) / len(toks) if toks else 0.0)
        return torch.tensor(out)


class Length(Builtin):
    """``-|words - target| / target``: 0 at the target length, negative either side."""

    options = ("target",)

    @staticmethod
    def check(src):
        if problem := range_problem(src.target, "> 0"):
            yield "target", problem

    def __init__(self, src):
        self.target = src.target

    def __call__(self, prompts, completions, fields):
        return torch.tensor([-abs(len(c.split()) - self.target) / self.target for c in completions])


class Format(Builtin):
    """1 if the completion matches the regular expression ``pattern`` (``re.search``), else 0."""

    options = ("pattern",)

    @staticmethod
    def check(src):
        if not src.pattern:
            yield "pattern", "a 'format' reward needs pattern: a regular expression"
            return
        try:
            re.compile(src.pattern)
        except re.error as e:
            yield "pattern", f"not a valid regular expression: {e}"

    def __init__(self, src):
        self.pattern = re.compile(src.pattern)

    def __call__(self, prompts, completions, fields):
        return torch.tensor([float(bool(self.pattern.search(c))) for c in completions])


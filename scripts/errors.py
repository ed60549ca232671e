"""What the models get wrong: each held-out answer that `ppo-lm pipeline`'s evaluation saved (eval/compare.json),
sorted by kind, for the zero-shot, SFT and PPO models.

* question answering (records with ``answers``): each answerable question's answer, scored by token F1 against the
  gold answers: exact (F1 1), partial (0 < F1 < 1), a wrong span (F1 0, but copied from the paragraph) or not a
  span (F1 0, not in the paragraph);
* sentiment analysis (records with ``label``): gold label -> answer (``negative->positive``; ``other`` for an
  answer that is not a label word).

    python scripts/errors.py --data runs/data/qa_smollm2/heldout.jsonl runs/results/qa_smollm2/avx512-seed0 [...]

Prints one JSON object: per run and model, the count of each kind, and how many of the counted answers PPO changed
(``changed_by_ppo``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ppo_lm.rewards.builtin import best_f1, reference_list  # noqa: E402
from ppo_lm.tasks import sentiment_analysis  # noqa: E402

QA_KINDS = ("exact", "partial", "wrong_span", "not_a_span")


def qa_kind(completion: str, f1: float, paragraph: str) -> str:
    """Which of :data:`QA_KINDS` an answer with token F1 ``f1`` to a question on ``paragraph`` is."""
    if f1 >= 1.0:
        return "exact"
    if f1 > 0.0:
        return "partial"
    answer = completion.strip()
    return "wrong_span" if answer and answer in paragraph else "not_a_span"


def paragraph(prompt: str) -> str:
    """The paragraph of a ``squad_chat`` prompt ("... Text: <paragraph>\\n\\nQuestion: ...")."""
    return prompt.split("Text: ", 1)[-1].rsplit("\n\nQuestion:", 1)[0]


def counted(record: dict) -> bool:
    """Whether answers to this held-out record are sorted: all but SQuAD 2.0's unanswerable questions."""
    return record.get("answerable", True)


def kind(record: dict, completion: str) -> str:
    """The kind of one answer to a counted held-out record."""
    if "answers" in record:
        f1 = best_f1(completion, reference_list(record["answers"]))
        return qa_kind(completion, f1, paragraph(record["prompt"]))
    if "label" in record:
        answer = sentiment_analysis.answer(completion)
        return f"{record['label']}->{answer if answer in sentiment_analysis.LABELS.values() else 'other'}"
    raise SystemExit("error: --data: a record has neither 'answers' (question answering) nor 'label' (sentiment)")


def breakdown(run: Path, records: list[dict]) -> dict[str, dict[str, int]]:
    compare = json.loads((run / "eval" / "compare.json").read_text())
    out = {}
    for model in ("base", "before", "after"):  # zero-shot, SFT or zero-shot, PPO
        examples = compare.get(model, {}).get("examples")
        if not examples:
            continue
        if len(examples) != len(records):
            raise SystemExit(f"error: {run}/eval/compare.json: {len(examples)} {model} answers for "
                             f"{len(records)} held-out records")
        kinds = Counter(kind(r, e["completion"]) for r, e in zip(records, examples) if counted(r))
        zeros = dict.fromkeys(QA_KINDS, 0) if "answers" in records[0] else {}  # every QA kind, even when absent
        out[model] = zeros | dict(sorted(kinds.items()))
    if "before" in out and "after" in out:  # how many of the counted answers PPO changed at all
        out["after"]["changed_by_ppo"] = sum(
            b["completion"].strip() != a["completion"].strip()
            for r, b, a in zip(records, compare["before"]["examples"], compare["after"]["examples"]) if counted(r))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="pipeline output folders (with eval/compare.json)")
    ap.add_argument("--data", type=Path, required=True, help="the held-out file the evaluation read")
    args = ap.parse_args()
    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    print(json.dumps({str(run): breakdown(run, records) for run in args.runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

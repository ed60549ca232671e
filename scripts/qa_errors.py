"""What the QA model gets wrong: each held-out answerable question's greedy answer, as `ppo-lm pipeline`'s
evaluation saved it (eval/compare.json), scored by token F1 against the gold answers and sorted into exact (F1 1),
partial (0 < F1 < 1), a wrong span (F1 0 but copied from the paragraph) and not a span (F1 0, not in the
paragraph), for the zero-shot, SFT and PPO models.

    python scripts/qa_errors.py runs/results/qa_smollm2/avx512-seed0 [...] [--data runs/data/qa_smollm2/heldout.jsonl]

Prints one JSON object: per run and model, the count of each kind over the answerable questions, and how many of
those answers PPO changed (``changed_by_ppo``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ppo_lm.rewards.builtin import best_f1, reference_list  # noqa: E402

KINDS = ("exact", "partial", "wrong_span", "not_a_span")


def kind(completion: str, f1: float, paragraph: str) -> str:
    """Which of :data:`KINDS` an answer with token F1 ``f1`` to a question on ``paragraph`` is."""
    if f1 >= 1.0:
        return "exact"
    if f1 > 0.0:
        return "partial"
    answer = completion.strip()
    return "wrong_span" if answer and answer in paragraph else "not_a_span"


def paragraph(prompt: str) -> str:
    """The paragraph of a ``squad_chat`` prompt ("... Text: <paragraph>\\n\\nQuestion: ...")."""
    return prompt.split("Text: ", 1)[-1].rsplit("\n\nQuestion:", 1)[0]


def breakdown(run: Path, records: list[dict]) -> dict[str, dict[str, int]]:
    compare = json.loads((run / "eval" / "compare.json").read_text())
    out = {}
    for model in ("base", "before", "after"):  # zero-shot, SFT, PPO
        examples = compare.get(model, {}).get("examples")
        if not examples:
            continue
        if len(examples) != len(records):
            raise SystemExit(f"error: {run}/eval/compare.json: {len(examples)} {model} answers for "
                             f"{len(records)} held-out records")
        counts = dict.fromkeys(KINDS, 0)
        for record, example in zip(records, examples):
            if record.get("answerable", True):
                f1 = best_f1(example["completion"], reference_list(record["answers"]))
                counts[kind(example["completion"], f1, paragraph(record["prompt"]))] += 1
        out[model] = counts
    if "before" in out and "after" in out:  # how many answers PPO changed at all
        out["after"]["changed_by_ppo"] = sum(
            b["completion"].strip() != a["completion"].strip()
            for record, b, a in zip(records, compare["before"]["examples"], compare["after"]["examples"])
            if record.get("answerable", True))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="pipeline output folders (with eval/compare.json)")
    ap.add_argument("--data", type=Path, default=Path("runs/data/qa_smollm2/heldout.jsonl"),
                    help="the held-out file the evaluation read")
    args = ap.parse_args()
    records = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    print(json.dumps({str(run): breakdown(run, records) for run in args.runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

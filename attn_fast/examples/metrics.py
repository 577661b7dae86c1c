"""Text metrics both examples score their decoded outputs with: exact match, character accuracy and corpus BLEU.

    exact_match(["2009-06-25"], ["2009-06-25"])              # 1.0: fraction of outputs equal to their reference
    character_accuracy(["2009-06-2"], ["2009-06-25"])        # 0.9: reference characters matched in place
    bleu(hypotheses, references)                             # 0..100, sacrebleu's corpus BLEU

Every function takes one hypothesis and one reference string per example and raises ValueError when the counts
differ; `bleu` also when there is no example (a corpus score of nothing is undefined: sacrebleu would fail with an
IndexError).
"""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["exact_match", "character_accuracy", "bleu"]


def _check_counts(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0..1) of hypotheses equal to their reference: the date task's accuracy."""
    _check_counts(hypotheses, references)
    return sum(h == r for h, r in zip(hypotheses, references)) / max(len(references), 1)


def character_accuracy(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction (0..1) of reference characters matched at the same position by the hypothesis (a missing
    character counts as wrong; characters beyond the reference's length are not counted)."""
    _check_counts(hypotheses, references)
    total = sum(len(r) for r in references)
    matched = sum(h == r for hyp, ref in zip(hypotheses, references) for h, r in zip(hyp, ref))
    return matched / max(total, 1)


def bleu(hypotheses: Sequence[str], references: Sequence[str], *, tokenize: str = "13a") -> float:
    """Corpus BLEU (0..100) of `hypotheses` against one reference each, by sacrebleu. `tokenize` is sacrebleu's:
    the default "13a" for text (TSV data, captions); "char" for the date task, whose targets are single words.
    ValueError for no examples."""
    import sacrebleu  # (imported here: everything else in the examples works without it)

    _check_counts(hypotheses, references)
    if not references:
        raise ValueError("BLEU of no examples: give at least one hypothesis and reference")
    return sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize=tokenize).score

"""BLEU-4 and ROUGE-L as the paper reports them (corpus BLEU-4, mean ROUGE-L F1; both x100).
Perplexity from summed token losses is hycam_ds.engine.lm_loss.perplexity."""

from __future__ import annotations


def bleu4(hypotheses: list[str], references: list[str]) -> float:
    """Corpus BLEU-4 (sacrebleu, its default 13a tokenisation), 0-100."""
    import sacrebleu

    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def rouge_l(hypotheses: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 over examples (rouge-score, Porter stemming), 0-100."""
    from rouge_score import rouge_scorer

    if not hypotheses:
        return float("nan")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]
    return 100.0 * sum(scores) / len(scores)

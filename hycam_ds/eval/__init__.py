"""Evaluation of a trained run: loading its model, per-task perplexity, generation and its metrics,
general-text perplexity, reports and plots, and the evaluation recipe that launch/evaluate.py runs.
May import hycam_ds.modeling, hycam_ds.engine and data_pipeline."""

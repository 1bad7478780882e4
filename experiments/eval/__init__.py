"""Evaluation: perplexity, ROUGE, lm-evaluation-harness tasks and WikiText-2 in the GPTQ convention
(``python -m experiments.eval.evaluate``).
"""

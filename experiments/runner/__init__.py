"""The experiment runner behind ``python -m experiments.run``: config checks, setup, data, training,
resume, distributed, progress, results and the summary.
"""

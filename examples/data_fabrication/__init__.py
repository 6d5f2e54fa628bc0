"""Data fabrication challenge (REFERENCE §4): generators of prompt→response pairs.

Miners submit signed Python generators; the validator runs each in a resource-limited
subprocess, validates the JSONL it prints, recomputes every answer, runs a two-pass
anti-plagiarism check against earlier submissions, scores each miner and sets weights.
Run ``python -m examples.data_fabrication --help`` from the repository root.
"""

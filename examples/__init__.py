"""Runnable examples: ``python -m examples.<name>`` from the repository root.

``prism``, ``data_fabrication`` and ``evaluation`` are the Platform (SN100) challenge
integrations; ``common`` holds the pieces they share (signed submissions, similarity,
settlement on the chain, tables).
"""

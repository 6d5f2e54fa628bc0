"""The demo miners' generator scripts (submitted as source text, run in the sandbox)."""

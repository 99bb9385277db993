"""Benchmarks: our engine and service side by side with what users would otherwise run.

``python -m bench all`` (or ``make bench``) runs every benchmark and writes ``bench/out/results.json`` and
``bench/RESULTS.md``. Each benchmark runs both arms in the same process tree, on the same images, model
initialisation, seed and epochs, alternating arms between repeats, and reports medians, spread and ratios.
"""

"""Python's garbage collector, set for a serving process.

Each decode step allocates a handful of objects; with the default thresholds (700, 10, 10) a
young collection runs every few steps and a full one, over every object the process holds (the
tokenizer's tables, graph protos, ...), every few hundred. Measured on SmolLM2 int4, 2 threads,
128-token greedy decode: 94 tokens/s with the defaults, 108 with these thresholds, 112 with the
collector off. Objects alive at start-up are frozen out of every later collection.
"""

from __future__ import annotations

import gc

THRESHOLDS = (100_000, 50, 100)


def tune_for_serving() -> None:
    """Call once the model and tokenizer are loaded."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)

"""Built-in models for demos, tests and benchmarks, one module per family (seeded random weights,
nothing downloaded)."""

from .ideogram4 import (IDEOGRAM4_DEMO, IDEOGRAM4_FULL, IDEOGRAM4_REDUCED, IMAGE_INDICATOR, TEXT_INDICATOR, ideogram4_inputs,
                        ideogram4_trajectory, reduced_ideogram4)

__all__ = ["IDEOGRAM4_DEMO", "IDEOGRAM4_FULL", "IDEOGRAM4_REDUCED", "IMAGE_INDICATOR", "TEXT_INDICATOR", "ideogram4_inputs",
           "ideogram4_trajectory", "reduced_ideogram4"]

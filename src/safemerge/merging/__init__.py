"""Merging: data-free methods, streaming merges, mergekit configs, and the data-driven methods (Fisher,
RegMean, AdaMerging, Concrete, DAM)."""

"""The benchmark: run units of work (train, generate, score) over methods and concepts, and report on them."""

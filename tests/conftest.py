import os
import sys

from hypothesis import settings

# Tests import the numpy oracle as a plain module.
sys.path.insert(0, os.path.dirname(__file__))

# Deterministic property tests: the same examples on every run and in CI.
settings.register_profile("gbjax", derandomize=True, print_blob=True)
settings.load_profile("gbjax")

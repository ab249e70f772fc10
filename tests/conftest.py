import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from recipe.device import configure_device  # noqa: E402

configure_device()  # before any test imports fla/triton: the CPU path (gloo + Triton interpreter)

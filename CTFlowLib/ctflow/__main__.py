import sys

from .entry import ctflow

sys.exit(ctflow())

"""``python -m moa.evaluation <overrides>``: the same run as ``python evaluate.py <overrides>``."""

from moa.evaluation.evaluate import main

main()

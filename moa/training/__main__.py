"""``python -m moa.training <overrides>``: the same run as ``python train.py <overrides>``."""

from moa.training.run import main

main()

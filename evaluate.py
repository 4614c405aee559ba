"""Evaluate MoA on the paper's protocol: ``python evaluate.py ckpt_path=<run>/checkpoints/last.ckpt``.

The evaluation itself lives in ``moa.evaluation.evaluate`` (``python -m moa.evaluation`` is the same command).
"""

from moa.evaluation.evaluate import main

if __name__ == "__main__":
    main()

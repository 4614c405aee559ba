"""Train MoA: ``python train.py`` runs the embedded default; ``experiment=moa_sd15`` the paper's.

The run itself lives in ``moa.training.run`` (``python -m moa.training`` is the same command).
"""

from moa.training.run import main

if __name__ == "__main__":
    main()

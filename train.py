"""Train MoA: ``python train.py`` runs the embedded default; ``experiment=moa_sd15`` the paper's.

The run itself lives in ``moa.training.run`` (``python -m moa.training`` is the same command).
"""

from moa.training.run import main, train  # noqa: F401  (train: for callers that compose a config)

if __name__ == "__main__":
    main()

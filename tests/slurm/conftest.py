import os
import subprocess
import time
from pathlib import Path

import pytest

CLUSTER = Path(__file__).with_name("cluster.sh")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node SLURM cluster for the session, torn down by PID afterwards."""
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_DIR": str(state)}
    start = time.monotonic()
    subprocess.run(["bash", str(CLUSTER), "up"], check=True, env=env, timeout=600)
    print(f"SLURM cluster up in {time.monotonic() - start:.1f}s")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield state
    finally:
        subprocess.run(["bash", str(CLUSTER), "down"], env=env, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous

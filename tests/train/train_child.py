"""One training in a fresh process: the Ray Train driver, as `cobra train` runs it.

    python -m tests.train.train_child '<json list of key=value>'

Prints ``SUMMARY <json>`` (the trainer's summary) on its last line. The tests drive Ray
Train from child processes so that no Ray state of other test modules in the pytest
process (Serve, Ray Data sessions that were shut down) can reach the Train controller.
"""

import json
import sys

from cobra_scale.config import load_config
from cobra_scale.train.configs import TrainConfig
from cobra_scale.train.trainer import run

if __name__ == "__main__":
    summary = run(load_config(TrainConfig, dotlist=json.loads(sys.argv[1])))
    print("SUMMARY " + json.dumps(summary), flush=True)

"""Run by test_distribute.py in its own process: which samples each replica of this process gets in one epoch.

    python tests/distribute_probe.py STRATEGY CPU_REPLICAS GLOBAL_BATCH N [TRAIN.PY ARGS]  (TF_CONFIG for multiworker)

Feeds pipeline.make_dataset (as train.py does) through the strategy's experimental_distribute_dataset (as
Keras' fit does), with sample i's image filled with the value i; prints a JSON list with, for each step, the
ids that each local replica saw. Then runs train.py's main with the remaining arguments, if any, in this
process and with this strategy (a process sets up its devices and cluster once; this saves one per test).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from distribute import make_strategy  # noqa: E402

name, cpu_replicas, global_batch, n = sys.argv[1], *map(int, sys.argv[2:5])
train_args = sys.argv[5:]
strategy, _ = make_strategy(name, cpu_replicas)

import pipeline  # noqa: E402
from dataset import SliceRef, SplitData  # noqa: E402

images = np.broadcast_to(np.arange(n, dtype=np.float32)[:, None, None, None], (n, 16, 16, 1)).copy()
data = SplitData(images, np.zeros((n, 16, 16), np.uint8), [SliceRef("i", "m", 1, 0, i) for i in range(n)],
                 [(16, 16)] * n, np.zeros((n, 2), np.int64))
dist = strategy.experimental_distribute_dataset(pipeline.make_dataset(data, global_batch, shuffle=True, epochs=1))
steps = []
for x, _ in dist:
    steps.append([np.asarray(r)[:, 0, 0, 0].astype(int).tolist() for r in strategy.experimental_local_results(x)])
print("SEEN " + json.dumps(steps))
sys.stdout.flush()
if train_args:
    import train  # noqa: E402

    sys.exit(train.main(train_args))

"""One stream's decode step (40 tokens of context, 200 steps), int8 and exact, of a model folder:
python step_probe.py [FOLDER]"""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
import numpy as np

from kvmesh.model.batch import decode_loop
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.runner import ModelRunner, RunnerConfig

path = sys.argv[1] if len(sys.argv) > 1 else str(default_model_dir("int4"))
f = ModelFolder.load(Path(path))
for numerics in ("int8", "exact", "int8", "exact"):
    r = ModelRunner(f, RunnerConfig(threads=2, decode_numerics=numerics))
    logits, kv = r.prefill(list(range(100, 140)))
    dec = decode_loop(r, kv, 400)
    tok = int(np.argmax(logits))
    for _ in range(20):
        tok = int(np.argmax(dec.step(tok)))
    t = time.perf_counter()
    n = 200
    for _ in range(n):
        tok = int(np.argmax(dec.step(tok)))
    dt = (time.perf_counter() - t) / n
    print(f"{numerics}: {dt * 1000:.2f} ms a step, {1 / dt:.1f} tok/s")

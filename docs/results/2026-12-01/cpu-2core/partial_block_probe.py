import statistics
import time

import numpy as np

from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.runner import ModelRunner, RunnerConfig

r = ModelRunner(
    ModelFolder.load(default_model_dir("int4")), RunnerConfig(threads=2, stop_spinning=True, decode_numerics="exact")
)
ids = [int(t) for t in np.random.default_rng(1).integers(100, 40000, 3000)]
_, full = r.prefill(ids[:2600])
end = 2711
for _rep in range(2):
    for computed in (96, 111, 118, 126, 111, 126):
        past = full.prefix(end - computed)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            r.prefill(ids[end - computed : end], past)
            ts.append(time.perf_counter() - t)
        print(f"computed {computed}: {statistics.median(ts) * 1000:.1f} ms", flush=True)

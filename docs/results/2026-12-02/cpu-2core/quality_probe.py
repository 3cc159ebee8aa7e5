"""Teacher-forced quality of each model folder's int8 decode graph against the fp32 model (as
tests/kvmesh/model/test_decode_numerics.py): python quality_probe.py FOLDER..."""

import os
import sys

sys.path.insert(0, os.getcwd())
from pathlib import Path

import numpy as np

from kvmesh.model.batch import decode_loop
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer
from kvmesh.sampling import log_softmax

TEXT = Path("tests/data/english.txt").read_text()
fp32 = ModelFolder.load(default_model_dir("fp32"))
ids = ChatTokenizer(fp32).encode(TEXT)
ref = ModelRunner(fp32, RunnerConfig(threads=2, all_logits=True))
exact = ref.forward(np.array([ids]), KVCache.empty(ref.layout))[0][0]
p = np.stack([log_softmax(r) for r in exact])
for path in sys.argv[1:]:
    runner = ModelRunner(ModelFolder.load(Path(path)), RunnerConfig(threads=2, decode_numerics="int8"))
    first, kv = runner.prefill(ids[:1])
    dec = decode_loop(runner, kv, len(ids) + 1)
    ours = np.stack([first, *(dec.step(t) for t in ids[1:])])
    q = np.stack([log_softmax(r) for r in ours])
    agreement, kl = (ours.argmax(-1) == exact.argmax(-1)).mean(), (np.exp(p) * (p - q)).sum(-1).mean()
    print(f"{path}: top-1 agreement {agreement:.4f}, mean KL {kl:.2e}")

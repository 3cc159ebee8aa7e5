"""The store writer's stall probe (2026-12-02): 8 warm 512-token streams of staggered lengths through
kvmesh up; prints the worst client gaps; SPY=1 records py-spy --gil of the worker meanwhile."""

import asyncio
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
from bench.peer import prompts
from kvmesh import cluster
from kvmesh.client import AsyncClient
from kvmesh.model.folder import ModelFolder
from kvmesh.model.prepare import default_model_dir


async def one(c, text, n, t0):
    arr = []
    async for ev in c.generate(prompt=text, max_tokens=n, ignore_eos=True, timeout=600):
        if ev.WhichOneof("kind") == "token":
            arr.append(time.perf_counter() - t0)
    return arr


async def main():
    model = default_model_dir("int4")
    os.environ["KVMESH_HOME"] = tempfile.mkdtemp()
    port = 52400
    spec = cluster.ClusterSpec(prefill=0, decode=0, workers=1, threads=2, port=port, model=str(model))
    procs = cluster.up(spec)
    pid = next(p.pid for p in procs if p.kind == "worker")
    c = AsyncClient(f"127.0.0.1:{port}")
    texts = prompts(ModelFolder.load(model), 2200, 512, 8)["batch"]
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, t, 8, t0) for t in texts))
        await asyncio.sleep(15)
        spy = None
        if os.environ.get("SPY"):
            spy = subprocess.Popen(
                [
                    ".venv/bin/py-spy",
                    "record",
                    "-p",
                    str(pid),
                    "-d",
                    "9",
                    "-r",
                    "200",
                    "-f",
                    "raw",
                    "--threads",
                    "--gil",
                    "-o",
                    "/tmp/probe/spy_end.txt",
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        t0 = time.perf_counter()
        # staggered lengths: streams end one after another while others run
        res = await asyncio.gather(*(one(c, t, 40 + 12 * k, t0) for k, t in enumerate(texts)))
        ends = sorted(a[-1] for a in res)
        gaps = sorted(((a[i + 1] - a[i]) * 1000, a[i], k) for k, a in enumerate(res) for i in range(len(a) - 1))
        print("ends at", [round(e, 2) for e in ends])
        print("worst 16 (gap ms, at s, stream):", [(round(g), round(t, 2), k) for g, t, k in gaps[-16:]])
        if spy:
            spy.wait()
    finally:
        await c.close()
        cluster.down()


asyncio.run(main())

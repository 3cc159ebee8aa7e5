"""What bounds the hostile-requests test: 10 MB requests sent to kvmesh's proxy, or to a bare gRPC
server with the same 4 MiB message limit and no kvmesh code, while a stream decodes on a 2-thread
worker. Prints the stream's worst inter-token gap over its own p99 measured just before, per target,
alternating. Run from the checkout: python docs/results/2026-12-02/cpu-2core/hostile_floor_probe.py 4
"""

import os
import subprocess
import sys
import time

import numpy as np

from kvmesh import cluster
from kvmesh.client import Client
from kvmesh.model.prepare import default_model_dir

BARE = r"""
import grpc
from concurrent import futures
s = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 4 << 20)])
handler = grpc.unary_stream_rpc_method_handler(lambda request, context: iter(()))
s.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("kvmesh.v1.Generation", {"Generate": handler})])
print(s.add_insecure_port("127.0.0.1:0"), flush=True)
s.start()
s.wait_for_termination()
"""
ATTACK = r"""
import sys, threading, time
from kvmesh.client import Client
from kvmesh.errors import KvmeshError
client, stop, first, n = Client(sys.argv[1]), threading.Event(), True, 0
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
while not stop.is_set() or not n:
    try:
        list(client.generate(None, prompt="x" * (10 << 20), max_tokens=8))
    except KvmeshError:
        pass
    n += 1
    if first:
        print("attacking", flush=True)
        first = False
    time.sleep(0.05)
print(n)
"""


def main(reps: int) -> None:
    model = str(default_model_dir("int4"))
    os.environ["KVMESH_HOME"] = "/tmp/kvmesh-hostile-probe"
    spec = cluster.ClusterSpec(prefill=0, decode=0, workers=1, threads=2, port=53151, model=model)
    endpoint = cluster.up(spec)[-1].address
    bare = subprocess.Popen([sys.executable, "-c", BARE], stdout=subprocess.PIPE, text=True)
    assert bare.stdout is not None
    bare_endpoint = f"127.0.0.1:{bare.stdout.readline().strip()}"
    client = Client(endpoint)
    messages = [{"role": "user", "content": "Tell me about lighthouses."}]

    def gaps() -> list[float]:
        events = client.generate(messages, session_id="steady", max_tokens=160, ignore_eos=True)
        return list(np.diff([time.perf_counter() for ev in events if ev.WhichOneof("kind") == "token"]))

    try:
        gaps()
        for _ in range(reps):
            for target, ep in (("kvmesh proxy", endpoint), ("bare grpc", bare_endpoint), ("none", None)):
                p99 = float(np.percentile(gaps(), 99))
                if ep:
                    attacker = subprocess.Popen(
                        [sys.executable, "-c", ATTACK, ep], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
                    )
                    assert attacker.stdout is not None
                    attacker.stdout.readline()
                g = gaps()
                n = attacker.communicate("stop\n", timeout=120)[0].strip() if ep else 0
                print(
                    f"{target:13s} base p99 {p99 * 1e3:6.1f} | attacked p50 {np.median(g) * 1e3:6.1f} "
                    f"p99 {np.percentile(g, 99) * 1e3:6.1f} max {max(g) * 1e3:6.1f} ratio {max(g) / p99:5.2f} n={n}",
                    flush=True,
                )
    finally:
        bare.kill()
        cluster.down(10)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4)

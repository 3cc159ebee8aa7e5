"""Probe (2026-12-02): the decode graph with each Q4_1 correction folded into its MatMulNBits as
more K-blocks, x' = [x, blocksums(x)], W' = [W | C] with C, the per-block corrections, at 4 bits
a row block (4), or as two 4-bit digits (8; x' then carries the block sums twice). Lossy.

  python fold_corrections_probe.py SRC_FOLDER DST_FOLDER [4|8]"""

import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
bits_c = int(sys.argv[3]) if len(sys.argv) > 3 else 4
shutil.copytree(src, dst, dirs_exist_ok=True)
m = onnx.load(str(src / "model_decode.onnx"))
g = m.graph
prod = {o: n for n in g.node for o in n.output}
cons = {}
for n in g.node:
    for i in n.input:
        cons.setdefault(i, []).append(n)
inits = {i.name: i for i in g.initializer}


def arr(name):
    return numpy_helper.to_array(inits[name])


def put(name, a):
    t = numpy_helper.from_array(np.ascontiguousarray(a), name)
    if name in inits:
        g.initializer.remove(inits[name])
    g.initializer.append(t)
    inits[name] = t


drop = set()
rename = {}
new_nodes = []
k = 0
for add in list(g.node):
    if add.op_type != "Add":
        continue
    fix = prod.get(add.input[1])
    y = prod.get(add.input[0])
    if fix is None or fix.op_type != "MatMul" or y is None or y.op_type != "MatMulNBits":
        continue
    attrs = {a.name: helper.get_attribute_value(a) for a in y.attribute}
    K, N = attrs["K"], attrs["N"]
    nb = K // 32
    C = arr(fix.input[1]).T.astype(np.float32)  # (N, nb)
    eb = -(-nb // 32)
    Cp = np.zeros((N, eb * 32), np.float32)
    Cp[:, :nb] = C
    Cb = Cp.reshape(N, eb, 32)
    qw = arr(y.input[1])
    sc = arr(y.input[2]).reshape(N, -1)
    zp = arr(y.input[3])
    if bits_c == 4:
        lo, hi = np.minimum(Cb.min(2), 0), np.maximum(Cb.max(2), 0)
        s = np.maximum(hi - lo, 1e-12) / 15.0
        z = np.clip(np.rint(-lo / s), 0, 15)
        q = np.clip(np.rint(Cb / s[:, :, None] + z[:, :, None]), 0, 15).astype(np.uint8)
        blocks, scales, zeros = [q], [s], [z]
    else:
        lo, hi = np.minimum(Cb.min(2), 0), np.maximum(Cb.max(2), 0)
        s = np.maximum(hi - lo, 1e-12) / 255.0
        z8 = np.clip(np.rint(-lo / s), 0, 255)
        q8 = np.clip(np.rint(Cb / s[:, :, None] + z8[:, :, None]), 0, 255).astype(np.int32)
        # s*(q8 - z8) = 16s*(qh - zh) + s*(ql - zl) with q8 = 16qh + ql, z8 = 16zh + zl
        zh, zl = np.floor(z8 / 16), z8 % 16
        qh, ql = (q8 >> 4).astype(np.uint8), (q8 & 15).astype(np.uint8)
        pad = np.arange(32) >= np.array([min(32, nb - 32 * j) for j in range(eb)])[:, None]  # padded slots: value 0
        qh = np.where(pad[None], zh[:, :, None], qh).astype(np.uint8)
        ql = np.where(pad[None], zl[:, :, None], ql).astype(np.uint8)
        blocks, scales, zeros = [qh, ql], [16 * s, s], [zh, zl]
    q = np.concatenate(blocks, 1)  # (N, eb*len, 32)
    s = np.concatenate(scales, 1)
    z = np.concatenate(zeros, 1)
    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    qw2 = np.concatenate([qw, packed], 1)
    sc2 = np.concatenate([sc, s.astype(sc.dtype)], 1)
    assert nb % 2 == 0
    zb = z.astype(np.uint8)
    if zb.shape[1] % 2:
        zb = np.concatenate([zb, np.zeros((N, 1), np.uint8)], 1)
    zp2 = np.concatenate([zp, (zb[:, 0::2] | (zb[:, 1::2] << 4)).astype(np.uint8)], 1)
    nblocks_extra = len(blocks) * eb
    base = f"fold{k}"
    k += 1
    put(base + ".qweight", qw2)
    put(base + ".scales", sc2.reshape(-1) if inits[y.input[2]].dims.__len__() == 1 else sc2)
    put(base + ".zp", zp2)
    if bits_c == 4:
        cat = [helper.make_node("Concat", [y.input[0], fix.input[0]], [base + ".x"], base + "/cat", axis=-1)]
        kx = K + nb
    else:
        put(base + ".pads", np.array([0, 0, 0, 0, 0, eb * 32 - nb], np.int64))
        cat = [
            helper.make_node("Pad", [fix.input[0], base + ".pads"], [base + ".spad"], base + "/pad"),
            helper.make_node(
                "Concat", [y.input[0], base + ".spad", fix.input[0]], [base + ".x"], base + "/cat", axis=-1
            ),
        ]
        kx = K + eb * 32 + nb
    mm = helper.make_node(
        "MatMulNBits",
        [base + ".x", base + ".qweight", base + ".scales", base + ".zp"],
        [add.output[0]],
        base + "/mm",
        domain="com.microsoft",
        K=kx,
        N=N,
        bits=4,
        block_size=32,
        accuracy_level=attrs["accuracy_level"],
    )
    cat = cat
    drop |= {add.name, fix.name, y.name}
    new_nodes.append((y, [*cat, mm]))
nodes = []
for n in g.node:
    hit = next((nn for yy, nn in new_nodes if yy.name == n.name), None)
    if hit:
        nodes.extend(hit)
    elif n.name not in drop:
        nodes.append(n)
# the Concat needs the ReduceSum's output before it: topological order — move each fold's nodes after the ReduceSum
order = []
have = {i.name for i in g.input} | set(inits)
pending = nodes[:]
while pending:
    rest = []
    for n in pending:
        if all((i == "" or i in have) for i in n.input):
            order.append(n)
            have |= set(n.output)
        else:
            rest.append(n)
    assert len(rest) < len(pending), "cycle"
    pending = rest
del g.node[:]
g.node.extend(order)
used = {i for n in g.node for i in n.input}
for t in list(g.initializer):
    if t.name not in used:
        g.initializer.remove(t)
print(k, "linears folded;", len(g.node), "nodes")
for f in dst.glob("model_decode.onnx*"):
    f.unlink()
onnx.save(m, str(dst / "model_decode.onnx"), save_as_external_data=True, location="model_decode.onnx.data")

"""Quality benchmark: decode numerics against the exact fp32 model, teacher-forced, over several texts.

Workload: each text's first --tokens tokens (default 524, the quality test's English text whole),
each predicted by a decode step of the folder's decode graph (the text's own previous token fed
in, as tests/kvmesh/model/test_decode_numerics.py does), against the fp32 folder's logits over the
whole text in one prefill run (the exact baseline, computed in the same run). Per text and over all
positions: top-1 agreement and mean KL(fp32 || ours). Texts: tests/data/english.txt (the issue's
fixed text) and, where the machine has them, Debian's license texts (GPL-3, Apache-2.0, MPL-2.0;
two excerpts each, whitespace collapsed): other English prose on which the one text's figures
can be checked. --model (repeatable) compares folders, e.g. one prepared with
`--decode-attention kvmesh`, position by position on the same tokens.

  python bench/quality.py [--model DIR ...] [--tokens 524] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table
from kvmesh.model.batch import decode_loop
from kvmesh.model.folder import ModelFolder
from kvmesh.model.kv import KVCache
from kvmesh.model.prepare import default_model_dir
from kvmesh.model.runner import ModelRunner, RunnerConfig
from kvmesh.model.tokenizer import ChatTokenizer
from kvmesh.sampling import log_softmax

ROOT = Path(__file__).resolve().parents[1]
LICENSES = Path("/usr/share/common-licenses")


def texts() -> dict[str, str]:
    found = {"english.txt": (ROOT / "tests" / "data" / "english.txt").read_text()}
    for name in ("GPL-3", "Apache-2.0", "MPL-2.0"):
        if (LICENSES / name).is_file():
            raw = re.sub(r"\s+", " ", (LICENSES / name).read_text())
            for part in range(2):  # past the title and preamble, 3,000 characters apart
                found[f"{name}[{part}]"] = raw[2000 + 3000 * part : 4600 + 3000 * part]
    return found


def decoded(runner: ModelRunner, ids: list[int]) -> np.ndarray:
    """(len(ids), vocab): position 0 from the prefill of ids[:1], each later one from a decode step."""
    first, kv = runner.prefill(ids[:1])
    steps = decode_loop(runner, kv, len(ids) + 1)
    return np.stack([first, *(steps.step(t) for t in ids[1:])])


def compare(exact: np.ndarray, ours: np.ndarray) -> tuple[int, float]:
    """(positions whose top-1 agrees, summed KL(exact || ours))."""
    p = np.stack([log_softmax(row) for row in exact])
    q = np.stack([log_softmax(row) for row in ours])
    return int((ours.argmax(-1) == exact.argmax(-1)).sum()), float((np.exp(p) * (p - q)).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", help="int4 folder (default: the prepared SmolLM2 int4)")
    ap.add_argument("--fp32", type=Path, default=default_model_dir("fp32"), help="the exact baseline's folder")
    ap.add_argument("--tokens", type=int, default=524)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    models = args.model or [default_model_dir("int4")]
    fp32 = ModelFolder.load(args.fp32)
    tok = ChatTokenizer(fp32)
    ref = ModelRunner(fp32, RunnerConfig(threads=2, all_logits=True))
    runners = {str(m): ModelRunner(ModelFolder.load(m), RunnerConfig(threads=2)) for m in models}
    for name, r in runners.items():
        print(f"{name}: {r.decode_numerics_said}")
    rows: list[dict[str, Any]] = []
    for text, body in texts().items():
        ids = tok.encode(body)[: args.tokens]
        exact = ref.forward(np.array([ids]), KVCache.empty(ref.layout))[0][0]
        for name, r in runners.items():
            agree, kl = compare(exact, decoded(r, ids))
            rows.append({"text": text, "model": name, "positions": len(ids), "agree": agree, "kl_sum": kl})
    out = []
    for name in runners:
        mine = [r for r in rows if r["model"] == name]
        every = {"text": "all", "model": name, **{k: sum(r[k] for r in mine) for k in ("positions", "agree", "kl_sum")}}
        out += [*mine, every]
    table(
        ["text", "model", "positions", "top-1 agreement", "mean KL"],
        [
            [
                r["text"],
                Path(r["model"]).name,
                r["positions"],
                f"{r['agree'] / r['positions']:.4f}",
                f"{r['kl_sum'] / r['positions']:.2e}",
            ]
            for r in out
        ],
    )
    if args.json:
        args.json.write_text(json.dumps({"tokens": args.tokens, "rows": out}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""The ONNX Runtime model runner that prefill and decode both use.

It reads the KV layout from the graph (any decoder with the standard I/O: ours, Optimum's, ORT
GenAI's), runs a prompt with or without past KV, and decode steps. KV is per layer, each array
(batch, kv_heads, tokens, head_dim); logits come back for the last position only, (batch, vocab).
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

from kvmesh.errors import InvalidArgument, ModelError
from kvmesh.model.folder import DECODE_GRAPH, ModelFolder
from kvmesh.model.kv import KVCache, KVLayout
from kvmesh.model.ops import library, needs_library

log = logging.getLogger(__name__)
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


Provider = Literal["auto", "cpu", "cuda"]
DecodeNumerics = Literal["auto", "int8", "exact"]
DECODE_NUMERICS: tuple[DecodeNumerics, ...] = ("auto", "int8", "exact")
# ONNX Runtime's int8-activation MatMulNBits kernels were measured batch-invariant (a row's
# activations quantized alone) and within the quality floor (top-1 agreement >= 0.97 with fp32)
# with AVX-512 VNNI. On an AVX2-only CPU (an AMD EPYC here) the same graph gave 0.960 agreement and
# a sequence's logits changed with its batch mates, so "auto" decodes exactly there.
INT8_DECODE_FLAGS = frozenset({"avx512_vnni"})


def kv_io_names(layers: int) -> list[tuple[str, str]]:
    """(past input, present output) per KV buffer, in buffer order: keys 0, values 0, keys 1, ..."""
    return [(f"past_key_values.{i}.{p}", f"present.{i}.{p}") for i in range(layers) for p in ("key", "value")]


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This machine's CPU feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


@dataclass(frozen=True)
class RunnerConfig:
    threads: int = 2  # intra-op threads; 0 lets ONNX Runtime pick
    provider: Provider = "auto"
    # Logits for every position (tests, scoring); serving needs the last one only, which a
    # folder's model_last.onnx computes ~20% faster on long prompts.
    all_logits: bool = False
    # Decode steps on the folder's model_decode.onnx when it has one (int8 activations, the
    # default numerics of decode): "auto" where the CPU has INT8_DECODE_FLAGS, "int8" anywhere;
    # "exact": the exact graph (fp32 activations), as prefill runs.
    decode_numerics: DecodeNumerics = "auto"
    # The CPU's feature flags for "auto" (None: this machine's)
    cpu_flags: frozenset[str] | None = None
    # Park ONNX Runtime's worker threads as soon as a run ends instead of letting them spin for
    # the next one: for a process that works between runs (a prefill node streams the KV right
    # after: 101 MB in ~45 ms instead of ~55 with a worker spinning on one of 2 cores). A decode
    # loop runs back to back and keeps them spinning.
    stop_spinning: bool = False

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise InvalidArgument("threads must be >= 0")
        if self.decode_numerics not in DECODE_NUMERICS:
            raise InvalidArgument(f"decode numerics must be one of {', '.join(DECODE_NUMERICS)}")


def _gqa_kv_type(graph: Path) -> int | None:
    """The ONNX element type of a GroupQueryAttention graph's KV inputs (None: no GQA), read
    without loading the weights."""
    g = onnx.load(str(graph), load_external_data=False).graph
    past = [i for i in g.input if _PAST.match(i.name)]
    if not past or not any(n.op_type == "GroupQueryAttention" for n in g.node):
        return None
    return int(past[0].type.tensor_type.elem_type)


def providers(choice: str, graph: Path, kv_type: int | None) -> list[str]:
    available = ort.get_available_providers()
    if choice == "cuda" and "CUDAExecutionProvider" not in available:
        raise ModelError("CUDA requested but this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    if choice in ("auto", "cuda") and "CUDAExecutionProvider" in available and kv_type == onnx.TensorProto.FLOAT:
        # ORT's CUDA GroupQueryAttention takes 16-bit floats only: a float32 graph of ours would
        # run every layer's attention on the CPU, its inputs copied there and back.
        if choice == "cuda":
            raise ModelError(
                f"{graph}: a float32 graph does not run on CUDA (GroupQueryAttention there is float16 only); "
                "prepare the model with --activations float16"
            )
        log.warning("%s: a float32 graph runs on the CPU here; for CUDA prepare it with --activations float16", graph)
        return ["CPUExecutionProvider"]
    if choice in ("auto", "cuda") and "CUDAExecutionProvider" in available:
        # onnxruntime-gpu >= 1.21 finds the CUDA and cuDNN libraries installed as pip wheels
        # (its `cuda`, `cudnn` extras; what the GPU image has) only when asked to preload them.
        preload = getattr(ort, "preload_dlls", None)
        if preload is not None:
            preload()
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _numerics(level: int, graph: str, activations: str) -> str:
    """What a graph computes with, in words for logs and `kvmesh model info`."""
    if level == 4:
        return f"int8 activations ({graph}, MatMulNBits accuracy level 4)"
    short = {"float32": "fp32", "float16": "fp16"}.get(activations, activations)
    return f"exact ({short} activations)" if level == 0 else f"{graph}, MatMulNBits accuracy level {level}"


def _session_options(threads: int, stop_spinning: bool) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if stop_spinning:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def _add_ops(opts: ort.SessionOptions, graph: Path) -> None:
    """Register kvmesh's kernel library where `graph` uses it."""
    if not needs_library(graph):
        return
    lib = library()
    if lib is None:
        raise ModelError(
            f"{graph} uses kvmesh's DecodeAttention, whose kernel library is not built here "
            "(scripts/build_ops.sh builds it; `kvmesh model prepare` on this machine rewrites the folder without it)"
        )
    opts.register_custom_ops_library(str(lib))


class ModelRunner:
    def __init__(self, folder: ModelFolder, config: RunnerConfig | None = None) -> None:
        self.folder = folder
        self.config = config or RunnerConfig()
        separate_decode = self._int8_decode_steps()
        # With a decode session of its own, the prefill session's workers park after each run:
        # spinning on, they took the cores of the decode steps that follow (a colocated worker).
        opts = _session_options(self.config.threads, self.config.stop_spinning or separate_decode)
        try:
            self.graph = folder.graph if self.config.all_logits or folder.last_graph is None else folder.last_graph
            kv_type = _gqa_kv_type(self.graph)
            self.session = ort.InferenceSession(
                str(self.graph), opts, providers=providers(self.config.provider, self.graph, kv_type)
            )
        except ModelError:
            raise
        except Exception as e:  # ORT raises its own untyped errors for unreadable graphs
            raise ModelError(f"{folder.graph}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})") from e
        self.decode_session = self.session
        if folder.decode_graph is not None and separate_decode:
            decode_opts = _session_options(self.config.threads, self.config.stop_spinning)
            _add_ops(decode_opts, folder.decode_graph)
            try:
                self.decode_session = ort.InferenceSession(
                    str(folder.decode_graph), decode_opts, providers=self.session.get_providers()
                )
            except Exception as e:
                raise ModelError(
                    f"{folder.decode_graph}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})"
                ) from e
        prefill_level, activations = folder.meta.get("accuracy_level", 0), folder.meta.get("activations", "float32")
        self.prefill_numerics = _numerics(prefill_level, self.graph.name, activations)
        self.decode_numerics = (
            self.prefill_numerics
            if self.decode_session is self.session
            else _numerics(folder.meta.get("decode_accuracy_level", 4), DECODE_GRAPH, activations)
            + (", kvmesh DecodeAttention" if folder.meta.get("decode_attention") == "kvmesh" else "")
        )
        self.layout = self._read_layout()
        names = {i.name for i in self.session.get_inputs()}
        self._has_positions = "position_ids" in names
        self._has_cache_branch = "use_cache_branch" in names
        vocab = next(o for o in self.session.get_outputs() if o.name == "logits").shape[-1]
        self.vocab_size = vocab if isinstance(vocab, int) else 0
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        if self.config.provider == "cuda" and self.device != "cuda":
            # ORT falls back to the CPU when the CUDA provider fails to start (no driver in a
            # container, missing CUDA or cuDNN libraries): asked for CUDA, that is an error.
            raise ModelError(
                "CUDA was asked for but ONNX Runtime could not start it (its log above says why: "
                "the NVIDIA driver, CUDA 13 or cuDNN 9 libraries)"
            )
        # Decode steps bind past and present to one buffer per layer and GQA writes in place.
        self.shares_buffers = self.vocab_size > 0 and kv_type is not None
        self.max_context = folder.context_length or 1 << 30
        self.group_session: ort.InferenceSession | None = None  # load_group(): model_group.onnx
        self.group_segments = 0
        self._spare: list[np.ndarray] = []  # the unused segments' 1-token buffers, one per KV input (load_group)

    def load_group(self) -> bool:
        """Load the folder's group graph (prefill_group_in_place) where this runner can use it: a
        CPU session over host buffers. -> whether it is loaded."""
        if self.group_session is not None:
            return True
        if self.folder.group_graph is None or self.device != "cpu" or not self.shares_buffers:
            return False
        try:
            self.group_session = ort.InferenceSession(
                str(self.folder.group_graph),
                _session_options(self.config.threads, stop_spinning=True),
                providers=["CPUExecutionProvider"],
            )
        except Exception as e:
            raise ModelError(
                f"{self.folder.group_graph}: ONNX Runtime cannot load it ({str(e).splitlines()[0]})"
            ) from e
        inputs = self.group_session.get_inputs()
        self.group_segments = sum(1 for i in inputs if i.name.endswith("past_key_values.0.key"))
        lay = self.layout
        # unused segments run one token (id 0) each over these, (1, kv_heads, 1, head_dim)
        self._spare = [np.zeros((1, lay.kv_heads, 1, lay.head_dim), lay.dtype) for _ in range(2 * lay.layers)]
        return True

    @property
    def decode_numerics_said(self) -> str:
        """decode_numerics and, where "auto" chose exact steps, why: for logs and `model info`."""
        return f"{self.decode_numerics} ({self.why_exact_decode})" if self.why_exact_decode else self.decode_numerics

    def _int8_decode_steps(self) -> bool:
        """Whether decode steps run the folder's int8-activation graph; if "auto" says no where the
        folder has one, why_exact_decode says why. (Only float32 folders have one: they run on the CPU.)"""
        self.why_exact_decode = ""
        choice = self.config.decode_numerics
        if self.folder.decode_graph is None or choice == "exact" or self.config.all_logits:
            return False
        flags = cpu_flags() if self.config.cpu_flags is None else self.config.cpu_flags
        if choice == "auto" and not flags >= INT8_DECODE_FLAGS:
            self.why_exact_decode = (
                f"this CPU has no {', '.join(sorted(INT8_DECODE_FLAGS))}, without which int8-activation decode "
                "steps were measured neither batch-invariant nor as accurate (--decode-numerics int8: anyway)"
            )
            return False
        return True

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Token ids from a caller or a peer must index the vocabulary (else ORT's Gather fails)."""
        if self.vocab_size and tokens and not 0 <= min(tokens) <= max(tokens) < self.vocab_size:
            raise InvalidArgument(f"token ids must be in [0, {self.vocab_size})")

    def _read_layout(self) -> KVLayout:
        past = [(m, i) for i in self.session.get_inputs() if (m := _PAST.match(i.name))]
        names = {x.name for x in [*self.session.get_inputs(), *self.session.get_outputs()]}
        if not past or not {"input_ids", "logits"} <= names:
            io = "input_ids, past_key_values.N.key|value -> logits"
            raise ModelError(f"{self.folder.graph}: not a decoder with KV-cache I/O ({io})")
        shape, dtype = past[0][1].shape, past[0][1].type
        hint = self.folder.kv_hint or (None, None)
        heads = shape[1] if isinstance(shape[1], int) else hint[0]
        head_dim = shape[3] if isinstance(shape[3], int) else hint[1]
        if heads is None or head_dim is None or dtype not in _ORT_DTYPES:
            raise ModelError(f"{self.folder.graph}: cannot tell the KV heads, head_dim and float type of its KV inputs")
        layers = 1 + max(int(m.group(1)) for m, _ in past)
        return KVLayout(layers, heads, head_dim, np.dtype(_ORT_DTYPES[dtype]))

    def forward(self, ids: np.ndarray, past: KVCache) -> tuple[np.ndarray, KVCache]:
        """ids (B, S) int64 after `past` -> logits (B, S', vocab), KV of all T = past + S tokens.
        S' is S with all_logits, else S or 1 (the last position) as the graph gives it."""
        b, s = ids.shape
        total = past.length + s
        if total > self.max_context:
            raise InvalidArgument(f"{total} tokens exceed the model's context of {self.max_context}")
        feeds: dict[str, np.ndarray] = {"input_ids": ids, "attention_mask": np.ones((b, total), np.int64)}
        if self._has_positions:
            feeds["position_ids"] = np.broadcast_to(np.arange(past.length, total, dtype=np.int64), (b, s)).copy()
        if self._has_cache_branch:
            feeds["use_cache_branch"] = np.array([past.length > 0])
        for i in range(self.layout.layers):
            feeds[f"past_key_values.{i}.key"] = past.keys[i]
            feeds[f"past_key_values.{i}.value"] = past.values[i]
        out = self.session.run(self._outputs, feeds)
        n = self.layout.layers
        return out[0], KVCache(out[1 : 1 + n], out[1 + n :])

    @property
    def _outputs(self) -> list[str]:
        n = self.layout.layers
        return ["logits", *[f"present.{i}.key" for i in range(n)], *[f"present.{i}.value" for i in range(n)]]

    def prefill(self, tokens: Sequence[int], past: KVCache | None = None) -> tuple[np.ndarray, KVCache]:
        """One sequence: tokens after `past` -> last logits (vocab,), KV of past + tokens."""
        if not tokens:
            raise InvalidArgument("empty prompt")
        ids = np.asarray([tokens], dtype=np.int64)
        logits, kv = self.forward(ids, past if past is not None else KVCache.empty(self.layout))
        return logits[0, -1], kv

    def prefill_in_place(self, tokens: Sequence[int], buffers: Sequence[np.ndarray], past: int) -> np.ndarray:
        """One sequence's `tokens` after the `past` it holds, on the prefill graph, in place:
        `buffers` (in kv_io_names order, each (1, kv_heads, capacity, head_dim), contiguous) are
        past and present at once, and GQA writes the new tokens' KV at positions past.. (a decode
        slot, see kvmesh/model/lease.py). Logits and KV equal prefill()'s bit for bit (the mask
        spans the tokens held, as prefill's does). -> last logits (vocab,)."""
        if not tokens:
            raise InvalidArgument("empty prompt")
        if not self.shares_buffers:
            raise InvalidArgument("prefill in place needs a GroupQueryAttention graph")
        total = past + len(tokens)
        if total > min(self.max_context, buffers[0].shape[2]):
            raise InvalidArgument(f"{total} tokens exceed the buffer or the model's context")
        io = self.session.io_binding()
        io.bind_output("logits", "cpu")  # bound first: get_outputs() is in binding order
        io.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        io.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
        if self._has_positions:
            io.bind_cpu_input("position_ids", np.arange(past, total, dtype=np.int64)[None])
        if self._has_cache_branch:
            io.bind_cpu_input("use_cache_branch", np.array([past > 0]))
        for (past_name, present_name), buf in zip(kv_io_names(self.layout.layers), buffers, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            io.bind_ortvalue_input(past_name, value)
            io.bind_ortvalue_output(present_name, value)
        self.session.run_with_iobinding(io)
        logits: np.ndarray = io.get_outputs()[0].numpy()  # (1, 1 or S, vocab)
        return np.asarray(logits[0, -1])

    def prefill_group_in_place(self, rows: Sequence[tuple[Sequence[int], Sequence[np.ndarray], int]]) -> np.ndarray:
        """Several sequences' prefill_in_place in one run of the group graph (load_group first):
        rows (tokens, buffers, past), at most group_segments of them. The linear layers run once
        over all their tokens laid end to end, each row's attention over its own buffers as alone.
        Each row's KV equals prefill_in_place's bit for bit where it computes 2+ tokens (one token
        alone takes MatMulNBits' one-row kernel); logits differ in the last bits (the output
        projection runs over several rows). -> last logits (len(rows), vocab)."""
        session = self._group([(t, past, min(self.max_context, b[0].shape[2])) for t, b, past in rows])
        io = session.io_binding()
        io.bind_output("logits", "cpu")
        for name, value in self._segment_feeds([(t, past) for t, _, past in rows]).items():
            io.bind_cpu_input(name, value)
        names = kv_io_names(self.layout.layers)
        for j in range(self.group_segments):
            buffers = rows[j][1] if j < len(rows) else self._spare
            for (past_name, present_name), buf in zip(names, buffers, strict=True):
                value = ort.OrtValue.ortvalue_from_numpy(buf)
                io.bind_ortvalue_input(f"segment{j}.{past_name}", value)
                io.bind_ortvalue_output(f"segment{j}.{present_name}", value)
        session.run_with_iobinding(io)
        logits: np.ndarray = io.get_outputs()[0].numpy()  # (1, group_segments, vocab)
        return np.asarray(logits[0, : len(rows)])

    def prefill_group(self, rows: Sequence[tuple[Sequence[int], KVCache | None]]) -> tuple[np.ndarray, list[KVCache]]:
        """Several sequences' `prefill` (tokens after their past) in one run of the group graph
        (load_group first), out of place: each row's present KV made by the model, as prefill's.
        Bit for bit prefill's KV where a row computes 2+ tokens; logits within the last bits.
        -> last logits (len(rows), vocab), each row's KV of past + tokens."""
        held = [(t, past.length if past is not None else 0, self.max_context) for t, past in rows]
        session, lay = self._group(held), self.layout
        none = np.zeros((1, lay.kv_heads, 0, lay.head_dim), lay.dtype)  # an unused segment's past
        feeds = self._segment_feeds([(t, n) for t, n, _ in held])
        for j in range(self.group_segments):
            past = rows[j][1] if j < len(rows) else None
            for i in range(lay.layers):
                feeds[f"segment{j}.past_key_values.{i}.key"] = past.keys[i] if past is not None else none
                feeds[f"segment{j}.past_key_values.{i}.value"] = past.values[i] if past is not None else none
        names = ["logits"]
        for j in range(len(rows)):
            names += [f"segment{j}.present.{i}.{part}" for part in ("key", "value") for i in range(lay.layers)]
        out = session.run(names, feeds)
        n = lay.layers
        kvs = [
            KVCache(out[1 + 2 * n * j : 1 + 2 * n * j + n], out[1 + 2 * n * j + n : 1 + 2 * n * (j + 1)])
            for j in range(len(rows))
        ]
        return np.asarray(out[0][0, : len(rows)]), kvs

    def _group(self, rows: Sequence[tuple[Sequence[int], int, int]]) -> ort.InferenceSession:
        """The group session, once rows (tokens, tokens held before them, the most the row may
        hold) are checked: 1..group_segments of them, none empty, none beyond its limit."""
        if self.group_session is None:
            raise InvalidArgument("no group graph loaded")
        if not 0 < len(rows) <= self.group_segments:
            raise InvalidArgument(f"{len(rows)} rows for a group of {self.group_segments}")
        for tokens, past, limit in rows:
            if not tokens:
                raise InvalidArgument("empty prompt")
            if past + len(tokens) > limit:
                raise InvalidArgument(f"{past + len(tokens)} tokens exceed the buffer or the model's context")
        return self.group_session

    def _segment_feeds(self, rows: Sequence[tuple[Sequence[int], int]]) -> dict[str, np.ndarray]:
        """rows (tokens, tokens held before them) -> input_ids (1, N): the rows' tokens end to end,
        then one token (id 0) per unused segment; segment_lengths and segment_totals
        (group_segments,): each segment's tokens, and those it holds after the run."""
        k = self.group_segments
        ids = [t for tokens, _ in rows for t in tokens] + [0] * (k - len(rows))
        lengths, totals = np.ones(k, np.int64), np.ones(k, np.int64)
        for j, (tokens, past) in enumerate(rows):
            lengths[j], totals[j] = len(tokens), past + len(tokens)
        return {"input_ids": np.asarray([ids], np.int64), "segment_lengths": lengths, "segment_totals": totals}

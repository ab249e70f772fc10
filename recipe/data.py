"""Data pipeline: document sources -> online tokenization -> packed batches, resumable exactly.

Each dataset in `training.dataset` becomes a *source* that yields documents (text or token ids)
forever, epoch after epoch. `PackedDataset` picks a source per document (seeded by
`training.data_seed`, weighted by `training.data_probs`), frames it with bos/eos, and cuts the
concatenated token stream into batches; there is no padding. Its state is a few positions, the
mixing RNG and the unconsumed tail of the current document, so a resume from `state_dict()`
yields exactly the batches an uninterrupted run would have yielded next.

Batches are built whole inside the dataset (the DataLoader runs with `batch_size=None`), because
varlen packs a batch into one row whose document boundaries (`cu_seqlens`) span the whole row.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils.data import IterableDataset, get_worker_info
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.tools.logging import logger

from recipe import synthetic_corpus
from recipe.errors import ConfigError, UserError

# Local file extension -> `datasets` builder.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
            ".txt": "text", ".text": "text", ".arrow": "arrow"}


# --------------------------------------------------------------------------- config


@dataclass
class SourceSpec:
    path: str  # "synthetic", a local file/folder or an HF hub name
    name: str | None = None
    split: str = "train"
    data_dir: str | None = None
    data_files: str | None = None


def _entries(value: str | None, key: str, n: int, broadcast: bool = False) -> list[str | None]:
    """Split a comma-separated per-dataset option into n entries (empty entry -> None)."""
    if value is None or value == "":
        return [None] * n
    items = [v.strip() or None for v in str(value).split(",")]
    if len(items) == 1 and broadcast:
        return items * n
    if len(items) != n:
        raise ConfigError(
            f"training.{key}: has {len(items)} comma-separated entries but training.dataset has {n}; "
            f"give one entry per dataset"
        )
    return items


def parse_sources(job_config) -> tuple[list[SourceSpec], list[float]]:
    """The datasets to mix and their normalized sampling probabilities, validated."""
    t = job_config.training
    paths = [p.strip() for p in str(t.dataset).split(",")]
    if not all(paths):
        raise ConfigError(f"training.dataset: empty entry in '{t.dataset}'; list datasets separated by commas")
    n = len(paths)
    names = _entries(t.dataset_name, "dataset_name", n)
    splits = _entries(t.dataset_split, "dataset_split", n, broadcast=True)
    dirs = _entries(t.data_dir, "data_dir", n)
    files = _entries(t.data_files, "data_files", n)
    specs = [SourceSpec(p, nm, sp or "train", d, f) for p, nm, sp, d, f in zip(paths, names, splits, dirs, files)]

    if t.data_probs is None or str(t.data_probs).strip() == "":
        return specs, [1.0 / n] * n
    raw = _entries(t.data_probs, "data_probs", n)
    try:
        probs = [float(p) for p in raw]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"training.data_probs: '{t.data_probs}' must be comma-separated numbers") from None
    if any(not np.isfinite(p) or p < 0 for p in probs) or sum(probs) <= 0:
        raise ConfigError(f"training.data_probs: '{t.data_probs}' must be non-negative numbers with a positive sum")
    total = sum(probs)
    return specs, [p / total for p in probs]


# --------------------------------------------------------------------------- sources


class Source:
    """Yields documents (str or list[int]) forever; `setup` picks this process's shard."""

    label: str
    skipped = 0  # rows dropped: empty, missing or non-text

    def setup(self, rank: int, world: int, worker: int, num_workers: int) -> None: ...
    def next_doc(self) -> str | list[int]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class SyntheticSource(Source):
    """The built-in corpus; shard s of S reads documents s, s+S, s+2S, ... (disjoint by construction)."""

    def __init__(self, seed: int, source_idx: int):
        self.label = "synthetic"
        self.seed = seed * 1000 + source_idx  # two "synthetic" entries in a mixture differ
        self.index = 0  # documents read by this shard
        self.shard, self.num_shards = 0, 1

    def setup(self, rank, world, worker, num_workers):
        self.shard, self.num_shards = rank * num_workers + worker, world * num_workers

    def next_doc(self):
        doc = synthetic_corpus.document(self.seed, self.shard + self.index * self.num_shards)
        self.index += 1
        return doc

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = state["index"]


def _row_doc(row: dict, column: str | None, text_column: str) -> str | list[int] | None:
    """The document in a row, or None when it must be skipped (empty, missing, wrong type)."""
    if column is None:  # columns unknown up front (some streaming datasets)
        column = "input_ids" if "input_ids" in row else text_column
    value = row.get(column)
    if column == "input_ids":
        ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(isinstance(v, int) for v in value)
        return list(value) if ok else None
    return value if isinstance(value, str) and value.strip() else None


class HFSource(Source):
    """An HF `datasets` dataset: materialized (reshuffled each epoch) or streaming (file order)."""

    def __init__(self, data, label: str, text_column: str, seed: int, source_idx: int):
        self.label, self.text_column = label, text_column
        self.streaming = not hasattr(data, "__len__")
        names = data.column_names
        if names is None:
            self.column = None
        elif "input_ids" in names:
            self.column = "input_ids"
        elif text_column in names:
            self.column = text_column
        else:
            raise UserError(
                f"training.text_column: '{label}' has no column '{text_column}' (columns: {', '.join(names)}); "
                f"set training.text_column"
            )
        self.full = data.select_columns([self.column]) if self.column else data
        self.seed = [seed, source_idx]
        self.epoch, self.index = 0, 0  # materialized: position in this epoch's permutation
        self.docs_this_epoch = 0
        self._hf_start: dict | None = None  # loaded streaming state, applied at setup
        self._it = None

    def setup(self, rank, world, worker, num_workers):
        from datasets.distributed import split_dataset_by_node

        if self.streaming:  # HF splits a streaming dataset between dataloader workers by itself
            self.data = split_dataset_by_node(self.full, rank, world)
            self.shard = [rank]
        else:
            self.data = split_dataset_by_node(self.full, rank * num_workers + worker, world * num_workers)
            self.shard = [rank, worker]
            if len(self.data) == 0:
                raise UserError(
                    f"training.dataset: '{self.label}' has {len(self.full)} rows, fewer than data-parallel "
                    f"ranks x dataloader workers ({world * num_workers}); use a larger dataset"
                )
        self._order = self._it = None
        self._apply_hf()

    def _apply_hf(self):
        if self.streaming and self._hf_start:
            self.data.set_epoch(self._hf_start["epoch"])
            self.data.load_state_dict(self._hf_start)

    def _next_row(self) -> dict:
        while True:
            if self.streaming:
                if self._it is None:
                    self._it = iter(self.data)
                    self._hf_start = None
                row = next(self._it, None)
            else:
                if self._order is None:  # this epoch's permutation of the shard
                    rng = np.random.default_rng([*self.seed, *self.shard, self.epoch])
                    self._order = rng.permutation(len(self.data))
                row = self.data[int(self._order[self.index])] if self.index < len(self._order) else None
                self.index += row is not None
            if row is not None:
                return row
            self._end_epoch()

    def _end_epoch(self):
        if self.docs_this_epoch == 0:
            raise UserError(
                f"training.dataset: '{self.label}' has no usable rows (empty or non-string "
                f"'{self.text_column}', no 'input_ids'); check the data or training.text_column"
            )
        self.epoch, self.index, self.docs_this_epoch = self.epoch + 1, 0, 0
        self._order = self._it = None
        if self.streaming:
            self.data.set_epoch(self.epoch)
        logger.info(f"Dataset '{self.label}' exhausted; starting epoch {self.epoch}")

    def next_doc(self):
        while True:
            doc = _row_doc(self._next_row(), self.column, self.text_column)
            if doc is not None:
                self.docs_this_epoch += 1
                return doc
            self.skipped += 1

    def state_dict(self):
        state = {"epoch": self.epoch, "index": self.index, "docs": self.docs_this_epoch, "skipped": self.skipped}
        if self.streaming:
            # Between a load and the next row, HF would report its start state, not the loaded one.
            state["hf"] = self._hf_start if self._it is None and self._hf_start else self.data.state_dict()
        return state

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]
        self.docs_this_epoch, self.skipped = state["docs"], state["skipped"]
        self._hf_start = state.get("hf")
        self._order = self._it = None
        if hasattr(self, "data"):  # already set up: iteration restarts from the loaded position
            self._apply_hf()


def _looks_local(path: str) -> bool:
    """Hub names are "name" or "owner/name"; anything else path-like is meant to be a local path."""
    return (
        path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
        or os.path.splitext(path)[1].lower() in BUILDERS
    )


def load_hf(spec: SourceSpec, streaming: bool):
    """`datasets.load_dataset` for a local file/folder or hub name; failures become UserErrors."""
    import datasets

    path = os.path.expanduser(spec.path)
    if not os.path.exists(path) and _looks_local(spec.path):
        raise UserError(f"training.dataset: no such file or folder '{spec.path}'; fix the path or use \"synthetic\"")
    try:
        if os.path.isfile(path):
            ext = os.path.splitext(path)[1].lower()
            if ext not in BUILDERS:
                raise UserError(
                    f"training.dataset: unsupported file type '{spec.path}'; use one of {', '.join(sorted(BUILDERS))}"
                )
            return datasets.load_dataset(BUILDERS[ext], data_files=path, split=spec.split, streaming=streaming)
        if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json")):
            ds = datasets.load_from_disk(path)  # a `save_to_disk` folder
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[spec.split]
            return ds.to_iterable_dataset(num_shards=max(1, min(len(ds), 64))) if streaming else ds
        return datasets.load_dataset(
            path, name=spec.name, split=spec.split, data_dir=spec.data_dir, data_files=spec.data_files,
            streaming=streaming,
        )
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - report the library's reason on one line
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        key = "dataset_split" if "split" in msg.lower() else "dataset"
        raise UserError(f"training.{key}: cannot load '{spec.path}' split '{spec.split}' ({msg})") from None


# --------------------------------------------------------------------------- packing


class PackedDataset(IterableDataset, Stateful):
    """Infinite stream of `(input_dict, labels)` batches over a mixture of sources.

    non-varlen: input [batch_size, seq_len]; varlen: input [1, batch_size*seq_len] plus int32
    `cu_seqlens` (document boundaries, pieces of at most context_len). Labels equal the input
    (unshifted: the models shift internally).
    """

    def __init__(self, sources: list[Source], probs: list[float], tokenizer, *, batch_size: int, seq_len: int,
                 varlen: bool = False, context_len: int | None = None, seed: int = 42,
                 dp_rank: int = 0, dp_world_size: int = 1):
        if len(sources) != len(probs):
            raise ValueError("one probability per source")
        self.sources, self.tokenizer = sources, tokenizer
        self.cum_probs = np.cumsum(probs) / sum(probs)
        self.batch_size, self.seq_len, self.varlen = batch_size, seq_len, varlen
        self.context_len = context_len or seq_len
        self.seed, self.dp_rank, self.dp_world_size = seed, dp_rank, dp_world_size
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)
        if self.eos is None:
            logger.warning("The tokenizer has no eos token: documents are concatenated without a separator")
        self._rest: list[int] = []  # unconsumed tail of the current document
        self._rng: np.random.Generator | None = None
        self._pending: dict | None = None
        self._ready = False

    @property
    def skipped_rows(self) -> int:
        """Rows dropped so far (empty/missing/non-text) by this process's sources (with dataloader
        workers, each worker counts its own; the count is saved in the state)."""
        return sum(s.skipped for s in self.sources)

    def _setup(self) -> None:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        for s in self.sources:
            s.setup(self.dp_rank, self.dp_world_size, worker, num_workers)
        shard = self.dp_rank * num_workers + worker
        self._rng = np.random.Generator(np.random.PCG64([self.seed, shard, self.dp_world_size * num_workers]))
        self._rest = []
        if self._pending:
            self._apply(self._pending)
        self._ready = True

    def _encode(self, doc: str | list[int], source: Source) -> list[int]:
        if isinstance(doc, str):
            # split_special_tokens: text that spells "<|eos|>" must not become a real eos
            ids = self.tokenizer(doc, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids = doc
            if min(ids) < 0 or max(ids) >= self.vocab_size:
                raise UserError(
                    f"training.dataset: '{source.label}' has input_ids outside the tokenizer's vocab "
                    f"(0..{self.vocab_size - 1}); pre-tokenize with model.tokenizer's tokenizer"
                )
        # Pre-tokenized docs may already carry bos/eos: add them only where missing.
        if self.bos is not None and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        if self.eos is not None and ids[-1] != self.eos:
            ids = [*ids, self.eos]
        return ids

    def _next_doc(self) -> list[int]:
        while True:
            i = 0
            if len(self.sources) > 1:
                i = min(int(np.searchsorted(self.cum_probs, self._rng.random(), side="right")), len(self.sources) - 1)
            source = self.sources[i]
            ids = self._encode(source.next_doc(), source)
            if ids:
                return ids
            source.skipped += 1  # text that tokenizes to nothing

    def _take(self, n: int) -> tuple[list[int], list[int]]:
        """The next n tokens of the stream and the lengths of the document pieces they span."""
        tokens, lens = [], []
        while len(tokens) < n:
            if not self._rest:
                self._rest = self._next_doc()
            k = min(n - len(tokens), len(self._rest))
            tokens += self._rest[:k]
            lens.append(k)
            self._rest = self._rest[k:]
        return tokens, lens

    def _batch(self, tokens: list[int], lens: list[int]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if not self.varlen:
            x = torch.tensor(tokens, dtype=torch.long).view(self.batch_size, self.seq_len)
            return {"input": x}, x.clone()
        c = self.context_len
        pieces = [p for n in lens for p in [c] * (n // c) + ([n % c] if n % c else [])]
        cu = torch.tensor([0, *itertools.accumulate(pieces)], dtype=torch.int32)
        x = torch.tensor(tokens, dtype=torch.long).view(1, -1)
        return {"input": x, "cu_seqlens": cu}, x.clone()

    def __iter__(self):
        if not self._ready:
            self._setup()
        while True:
            # All state is updated before the yield, so state_dict() taken between batches is exact.
            yield self._batch(*self._take(self.batch_size * self.seq_len))

    def state_dict(self) -> dict[str, Any]:
        if not self._ready:  # not iterated yet: the start, or a loaded state not yet applied
            return self._pending or {}
        return {
            "rest": list(self._rest),
            "rng": self._rng.bit_generator.state,
            "sources": [s.state_dict() for s in self.sources],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state
        self._ready = False  # applied at the next __iter__ (in the process that iterates)

    def _apply(self, state: dict[str, Any]) -> None:
        if len(state["sources"]) != len(self.sources):
            raise UserError(
                f"training.dataset: the checkpoint's data state has {len(state['sources'])} datasets but "
                f"{len(self.sources)} are configured; resume with the same dataset list"
            )
        self._rest = list(state["rest"])
        self._rng.bit_generator.state = state["rng"]
        for s, st in zip(self.sources, state["sources"]):
            s.load_state_dict(st)


# --------------------------------------------------------------------------- entry points


def build_sources(job_config) -> tuple[list[Source], list[float]]:
    t = job_config.training
    specs, probs = parse_sources(job_config)
    sources: list[Source] = []
    for i, spec in enumerate(specs):
        if spec.path == "synthetic":
            sources.append(SyntheticSource(t.data_seed, i))
        else:
            data = load_hf(spec, t.streaming)
            sources.append(HFSource(data, spec.path, t.text_column, t.data_seed, i))
    return sources, probs


def build_dataset(job_config, tokenizer, dp_rank: int = 0, dp_world_size: int = 1) -> PackedDataset:
    t = job_config.training
    sources, probs = build_sources(job_config)
    workers = t.dataloader.num_workers
    for s in sources:
        if isinstance(s, HFSource) and s.streaming:
            # split_dataset_by_node gives each rank whole shards only when they divide evenly.
            shards = s.full.num_shards
            shards = shards // dp_world_size if shards % dp_world_size == 0 else shards
            if workers > shards:
                raise ConfigError(
                    f"training.dataloader.num_workers={workers}: streaming dataset '{s.label}' has only "
                    f"{shards} file shard(s) per data-parallel rank; use at most that many workers"
                )
    return PackedDataset(
        sources, probs, tokenizer, batch_size=t.local_batch_size, seq_len=t.seq_len, varlen=t.varlen,
        context_len=t.context_len, seed=t.data_seed, dp_rank=dp_rank, dp_world_size=dp_world_size,
    )


def build_dataloader(job_config, tokenizer, dp_rank: int, dp_world_size: int) -> ParallelAwareDataloader:
    """torchtitan's stateful dataloader over `PackedDataset`; yields `(input_dict, labels)` batches."""
    dataset = build_dataset(job_config, tokenizer, dp_rank, dp_world_size)
    # batch_size=None: the dataset yields whole batches (see module docstring).
    kwargs = {**asdict(job_config.training.dataloader), "batch_size": None}
    return ParallelAwareDataloader(dataset, dp_rank=dp_rank, dp_world_size=dp_world_size, **kwargs)

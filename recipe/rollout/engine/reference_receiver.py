"""Reference receiver: a stand-in for an inference engine that honours vLLM's ``load_weights`` contract.

One process per engine rank (``--rank 0..world_size-1``, rank 0 hosts the rendezvous):

    python -m recipe.rollout.engine.reference_receiver --model_config configs/tiny/llama.json \\
        --port 29650 --world_size 2 --tp_size 2 --transport gloo --dtype bfloat16

For HF Llama/Qwen2/Qwen3 each rank holds its tensor-parallel shard in vLLM's layout: stacked
``qkv_proj`` (QKVParallelLinear: this rank's q heads, then k, then v; KV heads replicated when
fewer than ranks), ``gate_up_proj`` (MergedColumnParallelLinear), row-parallel ``o_proj`` and
``down_proj``, vocab-parallel embedding and lm_head, replicated norms. ``load_weights`` takes
HF names through a ``stacked_params_mapping`` (as vLLM's models do), skips the tied ``lm_head``
and rotary buffers, and also accepts the per-TP fused names of ``rollout.fused_layout``. Its
forward is a real tensor-parallel forward over those shards (all-reduce / all-gather between
the receiver ranks), so a misplaced head shows up in the logits, not only in a weight compare.

fla families are held as the fla HF model itself, one full copy per rank (of them vLLM serves only
Mamba2, whose ``load_weights`` takes the same HF names).

Each version is checked for coverage: every engine parameter shard written exactly once.
``--dump_dir`` writes, per applied version, each rank's parameters and rank 0's logits on a fixed
probe batch (``probe_batch``). The tests wrap ``load_weights`` to inject faults
(``tests/rollout/faulty_receiver.py``).
"""

from recipe.device import configure_device

configure_device()  # noqa: E402  (before transformers/fla: the CPU path)

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from datetime import timedelta  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from recipe.rollout.trainer.adapters import heads_per_rank, rank_heads  # noqa: E402
from recipe.rollout.engine.endpoint import ReceiverEndpoint, TrainerClosed  # noqa: E402
from recipe.rollout.engine.generation import GenerationService, sample_from_logits  # noqa: E402

logger = logging.getLogger("flare.receiver")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_FP32_NAMES = {"gated_deltanet": (r"\.A_log$", r"\.dt_bias$"), "mamba2": (r"\.A_log$",)}


def probe_batch(vocab_size: int, seed: int = 0, batch: int = 2, seq: int = 32) -> torch.Tensor:
    """The fixed token batch both sides compute logits on in the tests."""
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


class Coverage:
    """Each (engine parameter, shard) must be written exactly once per version."""

    def __init__(self, expected: set[tuple[str, object]]):
        self.expected = expected
        self.counts: dict[tuple[str, object], int] = {}

    def reset(self) -> None:
        self.counts = {}

    def hit(self, key: tuple[str, object]) -> None:
        if key not in self.expected:
            raise KeyError(f"engine has no parameter shard {key}")
        self.counts[key] = self.counts.get(key, 0) + 1

    def check(self) -> None:
        missing = sorted(str(k) for k in self.expected if k not in self.counts)
        repeated = sorted(str(k) for k, n in self.counts.items() if n > 1)
        if missing or repeated:
            raise RuntimeError(f"coverage: {len(missing)} shard(s) never written {missing[:4]}, "
                               f"{len(repeated)} written more than once {repeated[:4]}")


class LlamaTPEngine:
    """One tensor-parallel rank of an HF Llama/Qwen2/Qwen3 engine (vLLM's parameter layout)."""

    # (engine param, HF name part, shard id), as vLLM's llama/qwen2/qwen3 load_weights
    stacked_params_mapping = [
        (".qkv_proj", ".q_proj", "q"),
        (".qkv_proj", ".k_proj", "k"),
        (".qkv_proj", ".v_proj", "v"),
        (".gate_up_proj", ".gate_proj", 0),
        (".gate_up_proj", ".up_proj", 1),
    ]

    def __init__(self, config, dtype: torch.dtype, tp_rank: int = 0, tp_size: int = 1, group=None, device="cpu"):
        from recipe.model import build_model_on_meta

        c = self.config = config
        self.dtype, self.r, self.tp, self.group, self.device = dtype, tp_rank, tp_size, group, torch.device(device)
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.q_local = heads_per_rank(self.n_heads, tp_size)[0]
        self.kv_local = heads_per_rank(self.n_kv, tp_size)[0]
        if c.intermediate_size % tp_size:
            raise ValueError(f"intermediate_size {c.intermediate_size} is not divisible by TP {tp_size}")
        self.i_local = c.intermediate_size // tp_size
        self.v_local = -(-c.vocab_size // tp_size)  # vocab padded to a multiple of the TP size
        self.tied = bool(getattr(c, "tie_word_embeddings", False))
        hf = {n: tuple(p.shape) for n, p in build_model_on_meta(c).named_parameters()}  # HF names (tied once)
        if any(n.endswith("mlp.gate_proj.bias") or n.endswith("o_proj.bias") for n in hf):
            raise ValueError("biases on o_proj/MLP are not emulated")
        self.params: dict[str, torch.Tensor] = {}
        expected: set[tuple[str, object]] = set()
        for name, shape in hf.items():
            for param, part, shard in self.stacked_params_mapping:
                if part in name:
                    target = name.replace(part, param)
                    if target not in self.params:
                        self.params[target] = torch.zeros(self._local_shape(target, shape), dtype=dtype,
                                                          device=self.device)
                    expected.add((target, shard))
                    break
            else:
                self.params[name] = torch.zeros(self._local_shape(name, shape), dtype=dtype, device=self.device)
                expected.add((name, None))
        self.coverage = Coverage(expected)
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.rotary = LlamaRotaryEmbedding(config=c).to(self.device)

    def _local_shape(self, name: str, full: tuple[int, ...]) -> tuple[int, ...]:
        if ".qkv_proj." in name:
            return ((self.q_local + 2 * self.kv_local) * self.hd, *full[1:])
        if ".gate_up_proj." in name:
            return (2 * self.i_local, *full[1:])
        if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            return (full[0], full[1] // self.tp)
        if name.endswith("embed_tokens.weight") or name.startswith("lm_head."):
            return (self.v_local, full[1])
        return full

    # ---- vLLM's contract

    def load_weights(self, weights) -> set[str]:
        loaded = set()
        for name, w in weights:
            if "rotary_emb.inv_freq" in name or (self.tied and name.startswith("lm_head.")):
                continue  # vLLM computes the former and ties the latter itself
            for param, part, shard in self.stacked_params_mapping:
                if part in name:
                    target = name.replace(part, param)
                    self._load_shard(target, shard, w)
                    break
            else:
                self._load_plain(name, w)
                target = name
            loaded.add(target)
        return loaded

    def _dst(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if name not in self.params:
            raise KeyError(f"engine has no parameter '{name}'")
        if w.dtype != self.dtype:
            raise TypeError(f"{name}: received {w.dtype}, the engine holds {self.dtype}")
        return self.params[name]

    def _load_shard(self, name: str, shard, w: torch.Tensor) -> None:
        dst = self._dst(name, w)
        if shard in ("q", "k", "v"):
            q_rows, kv_rows = self.q_local * self.hd, self.kv_local * self.hd
            start = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[shard]
            n = self.n_heads if shard == "q" else self.n_kv
            part = rank_heads(w, self.r, n, self.tp, self.hd)
        else:
            start = shard * self.i_local
            part = w.chunk(self.tp)[self.r]
        dst[start:start + part.shape[0]].copy_(part)
        self.coverage.hit((name, shard))

    def _load_plain(self, name: str, w: torch.Tensor) -> None:
        dst = self._dst(name, w)
        if ".qkv_proj." in name or ".gate_up_proj." in name:
            # rollout.fused_layout: TP rank r's rows are the r-th contiguous slice.
            dst.copy_(w.chunk(self.tp)[self.r])
            shards = ("q", "k", "v") if ".qkv_proj." in name else (0, 1)
            for s in shards:
                self.coverage.hit((name, s))
            return
        if name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
            dst.copy_(w.chunk(self.tp, dim=1)[self.r])
        elif name.endswith("embed_tokens.weight") or name.startswith("lm_head."):
            rows = w[self.r * self.v_local:(self.r + 1) * self.v_local]
            dst.zero_()
            dst[:rows.shape[0]].copy_(rows)
        else:
            if tuple(w.shape) != tuple(dst.shape):
                raise ValueError(f"{name}: received {tuple(w.shape)}, the engine holds {tuple(dst.shape)}")
            dst.copy_(w)
        self.coverage.hit((name, None))

    # ---- a tensor-parallel forward over the shards

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.group is not None:  # a gloo group: reduce on the host (only the check forward uses it)
            host = t.cpu()
            self.group.allreduce([host]).wait()
            t.copy_(host)
        return t

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return w * x32.to(x.dtype)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Full logits [B, T, V] on every rank (collective over the engine group)."""
        p, B, T = self.params, *ids.shape
        ids = ids.to(self.device)
        lo = self.r * self.v_local
        inside = (ids >= lo) & (ids < lo + self.v_local)
        x = F.embedding((ids - lo).clamp(0, self.v_local - 1), p["model.embed_tokens.weight"]) * inside[..., None]
        x = self._all_reduce(x.contiguous())
        cos, sin = self.rotary(x, torch.arange(T, device=self.device)[None].expand(B, T))
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q_rows, kv_rows = self.q_local * self.hd, self.kv_local * self.hd
        for i in range(self.config.num_hidden_layers):
            pre = f"model.layers.{i}."
            h = self._rms(x, p[pre + "input_layernorm.weight"])
            qkv = F.linear(h, p[pre + "self_attn.qkv_proj.weight"], p.get(pre + "self_attn.qkv_proj.bias"))
            q, k, v = qkv.split([q_rows, kv_rows, kv_rows], dim=-1)
            q, k, v = (t.view(B, T, -1, self.hd) for t in (q, k, v))
            if pre + "self_attn.q_norm.weight" in p:  # Qwen3: per-head RMSNorm before RoPE
                q = self._rms(q, p[pre + "self_attn.q_norm.weight"])
                k = self._rms(k, p[pre + "self_attn.k_norm.weight"])
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.hd ** -0.5,
                                               enable_gqa=self.q_local != self.kv_local)
            o = F.linear(o.transpose(1, 2).reshape(B, T, q_rows), p[pre + "self_attn.o_proj.weight"])
            x = x + self._all_reduce(o)
            h = self._rms(x, p[pre + "post_attention_layernorm.weight"])
            gate, up = F.linear(h, p[pre + "mlp.gate_up_proj.weight"]).chunk(2, dim=-1)
            x = x + self._all_reduce(F.linear(F.silu(gate) * up, p[pre + "mlp.down_proj.weight"]))
        x = self._rms(x, p["model.norm.weight"])
        head = p["model.embed_tokens.weight"] if self.tied else p["lm_head.weight"]
        local = F.linear(x, head).contiguous()
        if self.group is not None:
            parts = [torch.empty_like(local, device="cpu") for _ in range(self.tp)]
            self.group.allgather([parts], [local.cpu()]).wait()
            local = torch.cat(parts, dim=-1).to(self.device)
        return local[..., :self.config.vocab_size]

    def state(self) -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in self.params.items()}


class HFEngine:
    """The HF/fla model itself (names as in fla's checkpoints), one full copy per rank."""

    def __init__(self, config, dtype: torch.dtype, device="cpu"):
        from recipe.model import build_model

        self.dtype, self.device = dtype, torch.device(device)
        self.model = build_model(config, dtype=dtype).to(self.device).eval()
        keep = _FP32_NAMES.get(config.model_type, ())
        self.params = dict(self.model.named_parameters())  # tied weights appear once
        for n, t in self.params.items():
            # As vLLM: parameters in the engine dtype (fla builds some norms in float32 whatever the
            # dtype, e.g. Mamba2's block norms), those of _FP32_NAMES in float32.
            t.data = t.data.float() if any(re.search(k, n) for k in keep) else t.data.to(dtype)
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.coverage = Coverage({(n, None) for n in self.params})

    def load_weights(self, weights) -> set[str]:
        loaded = set()
        for name, w in weights:
            if self.tied and name.startswith("lm_head."):
                continue
            if name not in self.params:
                raise KeyError(f"engine has no parameter '{name}'")
            dst = self.params[name]
            if w.dtype != dst.dtype or w.shape != dst.shape:
                raise TypeError(f"{name}: received {w.dtype} {tuple(w.shape)}, engine holds {dst.dtype} "
                                f"{tuple(dst.shape)}")
            dst.data.copy_(w)
            self.coverage.hit((name, None))
            loaded.add(name)
        return loaded

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids.to(self.device)).logits

    def state(self) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for n, t in self.params.items()}


def load_config(path: str, tokenizer: str):
    """The model config as the trainer sees it (vocab grown to the tokenizer)."""
    from recipe.model import load_model_config, reconcile_with_tokenizer
    from recipe.tokenizer import build_tokenizer

    config = load_model_config(path)
    reconcile_with_tokenizer(config, build_tokenizer(SimpleNamespace(model=SimpleNamespace(tokenizer=tokenizer))))
    return config


def build_engine(config, dtype, tp_rank, tp_size, group, device="cpu"):
    if config.model_type in ("llama", "qwen2", "qwen3"):
        return LlamaTPEngine(config, dtype, tp_rank, tp_size, group, device)
    if tp_size != 1:
        raise SystemExit(f"model_type '{config.model_type}' is held unsharded: use --tp_size 1")
    return HFEngine(config, dtype, device)


def main(argv=None, wrap_load=None) -> None:
    """``wrap_load(load_weights, version_seen) -> load_weights`` lets a caller intercept every
    bucket's load (``version_seen``: the version being received and its bucket count so far)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_config", required=True)
    ap.add_argument("--tokenizer", default="bytes")
    ap.add_argument("--address", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=29650)
    ap.add_argument("--rank", type=int, default=0, help="engine rank (0 hosts the rendezvous)")
    ap.add_argument("--world_size", type=int, default=1, help="engine ranks (= rollout.engine_world_size)")
    ap.add_argument("--tp_size", type=int, default=None, help="engine TP size (default: world_size)")
    ap.add_argument("--transport", default="gloo", choices=["gloo", "nccl", "ipc"])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    ap.add_argument("--device", default=None, help="default: cuda:<rank % GPUs> for nccl/ipc, else cpu")
    ap.add_argument("--timeout_s", type=float, default=60.0)
    ap.add_argument("--dump_dir", default=None)
    ap.add_argument("--probe_seed", type=int, default=0)
    ap.add_argument("--max_versions", type=int, default=0, help="exit after this many versions (0: serve)")
    ap.add_argument("--ready_file", default=None, help="touched once the rendezvous store listens")
    ap.add_argument("--serve_rollouts", action="store_true",
                    help="after each version, answer the trainer's generation request (RL; one rank only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"[receiver {args.rank}] %(message)s")
    tp = args.tp_size or args.world_size
    if args.world_size != tp:
        raise SystemExit("the reference receiver emulates one TP group: --world_size must equal --tp_size")

    device = args.device or (f"cuda:{args.rank % torch.cuda.device_count()}" if args.transport != "gloo" else "cpu")
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    config = load_config(args.model_config, args.tokenizer)
    dtype = _DTYPES[args.dtype]
    endpoint = ReceiverEndpoint(args.address, args.port, 1 + args.rank, 1 + args.world_size,
                                backend=args.transport, timeout_s=args.timeout_s, device=device)
    # The engine's own group (its TP all-reduces), separate from the transfer group.
    group = None
    if tp > 1:
        group = dist.ProcessGroupGloo(dist.PrefixStore("engine/", endpoint.store), args.rank, tp,
                                      timedelta(seconds=args.timeout_s))
    engine = build_engine(config, dtype, args.rank, tp, group, device)
    if args.ready_file:
        open(args.ready_file, "w").close()

    version_seen = {"v": None, "buckets": 0}

    def start(version):
        version_seen.update(v=version, buckets=0)
        engine.coverage.reset()

    def load_weights(weights):
        version_seen["buckets"] += 1
        return engine.load_weights(weights)

    if wrap_load is not None:
        load_weights = wrap_load(load_weights, version_seen)

    def finish(version):
        engine.coverage.check()

    n = 0
    if args.serve_rollouts and args.world_size != 1:
        raise SystemExit("--serve_rollouts samples on one engine rank: use --world_size 1")
    service = GenerationService(endpoint.store) if args.serve_rollouts else None
    try:
        while True:
            try:
                version = endpoint.receive(load_weights, start=start, finish=finish)
            except TrainerClosed:
                logger.info("trainer closed the connection: exiting")
                break
            n += 1
            if service is not None:
                service.serve(version, partial(sample_from_logits, engine.logits), wait_s=args.timeout_s)
            logger.info(f"applied version {version}")
            if args.dump_dir:
                t0 = time.perf_counter()
                logits = engine.logits(probe_batch(config.vocab_size, args.probe_seed))
                dump = {"version": version, "params": {n: t.cpu() for n, t in engine.state().items()},
                        "logits": logits.cpu() if args.rank == 0 else None}
                path = os.path.join(args.dump_dir, f"v{version}.rank{args.rank}.pt")
                torch.save(dump, path + ".tmp")
                os.replace(path + ".tmp", path)
                logger.info(f"dumped version {version} ({time.perf_counter() - t0:.1f}s)")
            if args.max_versions and n >= args.max_versions:
                break
    finally:
        endpoint.close()


if __name__ == "__main__":
    main()

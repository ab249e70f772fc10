"""Mamba2's training scan on fla's chunked Triton kernels, where mamba_ssm is not installed.

fla 0.6's Mamba2 trains with mamba_ssm's kernels when that package is installed (a CUDA build
against the local torch). Without it, it falls back to a naive PyTorch SSD whose intermediates
grow as batch x seq x chunk x heads x state: for the 340M config at 8 x 4096 one of them alone is
137 GB, and on an H200 the model trained at ~720 tokens/s at batch 1 x 1024.

The SSD is scalar-gated linear attention: per head, ``y_t = sum_{s<=t} (C_t . B_s)
exp(sum_{s<r<=t} dt_r A) dt_s x_s + D x_t``, i.e. fla's ``chunk_simple_gla`` with ``q = C``,
``k = B``, ``v = dt * x``, log-decay ``g = dt * A`` and scale 1, plus the ``D`` skip. Its forward
and backward are fla's Triton kernels (on Hopper with Triton < 3.7.1 the one gated backward fla
refuses there runs in PyTorch: ``recipe.fla_kernels.use_torch_gated_backward``). Each mixer's torch
path hands its scan to it for the training call (no cache, no padding mask); decoding and masked
prefill keep fla's code, and so does a machine with mamba_ssm (fla then never takes the torch path
on a GPU). The projections, convolution, gate and norm are fla's own code path, so the tensor-
parallel plan (``parallelisms/tp_plans/mamba2.py``) applies unchanged.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def chunked_torch_forward(self, input_states, last_state=None, use_cache=False, attention_mask=None):
    """fla's ``Mamba2.torch_forward`` with the scan on ``chunk_simple_gla`` (training calls only)."""
    if last_state is not None or use_cache or attention_mask is not None:
        return type(self).torch_forward(self, input_states, last_state, use_cache, attention_mask)
    from fla.ops.simple_gla import chunk_simple_gla

    batch, seq_len, _ = input_states.shape
    dtype = input_states.dtype
    projected = self.in_proj(input_states)
    groups_state = self.n_groups * self.ssm_state_size
    d_mlp = (projected.shape[-1] - 2 * self.intermediate_size - 2 * groups_state - self.num_heads) // 2
    _, _, gate, xbc, dt = projected.split(
        [d_mlp, d_mlp, self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
    xbc = self.act(self.conv1d(xbc.transpose(1, 2))[..., :seq_len].transpose(1, 2))
    x, B, C = torch.split(xbc, [self.intermediate_size, groups_state, groups_state], dim=-1)

    # As fla's naive path: dt in the projection's dtype, A and everything after the scan in fp32.
    dt = torch.clamp(F.softplus(dt + self.dt_bias), self.dt_limit[0], self.dt_limit[1]).float()
    A = -torch.exp(self.A_log.float())
    x = x.reshape(batch, seq_len, -1, self.head_dim)
    heads = x.shape[2]
    # Head h reads group h % n_groups, as fla's naive path tiles them (recipe.model allows one group).
    B = B.reshape(batch, seq_len, -1, self.ssm_state_size).repeat(1, 1, heads // self.n_groups, 1)
    C = C.reshape(batch, seq_len, -1, self.ssm_state_size).repeat(1, 1, heads // self.n_groups, 1)
    v = (x.float() * dt[..., None]).to(x.dtype)
    y, _ = chunk_simple_gla(q=C, k=B, v=v, g=dt * A, scale=1.0)
    y = y.float() + x.float() * self._get_D(expand_to_head_dim=True)
    y = y.reshape(batch, seq_len, -1)
    scan_output = self.norm(y, gate) if self.rmsnorm else y * self.act(gate)
    return self.out_proj(scan_output.to(dtype)), None, None


def use_chunked_ssd(model: torch.nn.Module) -> int:
    """Route every fla Mamba2 mixer's torch path through ``chunked_torch_forward``; returns how
    many. Bound per instance, so copies of the model (``copy.deepcopy``) keep it."""
    from fla.layers.mamba2 import Mamba2

    mixers = [m for m in model.modules() if isinstance(m, Mamba2)]
    for mixer in mixers:
        mixer.torch_forward = types.MethodType(chunked_torch_forward, mixer)
    return len(mixers)

"""OLMo-Hybrid as flare trains it: transformers' ``OlmoHybridForCausalLM`` holding its weights
under the names its checkpoints (and vLLM's ``OlmoHybridForCausalLM``) use.

transformers' Gated DeltaNet mixer keeps the three depthwise short convolutions of q, k and v as
one ``conv1d`` (channels ``[q | k | v]``) and renames ``q_conv1d``/``k_conv1d``/``v_conv1d`` into
it when it loads a checkpoint. vLLM 0.26 only loads the three separate names (its fused-conv
loader needs to know which of the three it receives). Here the mixer holds the three
convolutions as modules and hands its unchanged forward their filters stacked in that order, so
the computation is transformers' own, DCP and HF checkpoints carry the names every reader takes,
and tensor parallelism shards each convolution by heads like fla's Gated DeltaNet.

Everything else (attention blocks, norms, MLP, init) is transformers' class as installed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.olmo_hybrid import modeling_olmo_hybrid as hf

CONV_NAMES = ("q_conv1d", "k_conv1d", "v_conv1d")


class _StackedConv:
    """What the mixer's forward reads of ``self.conv1d``: the filters of q, k, v stacked (read at
    call time, so sharded or FSDP-unsharded parameters are the ones used), and no bias."""

    bias = None

    def __init__(self, mixer: nn.Module):
        self._mixer = mixer

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([getattr(self._mixer, name).weight for name in CONV_NAMES])


class OlmoHybridGatedDeltaNet(hf.OlmoHybridGatedDeltaNet):
    """transformers' mixer with ``q_conv1d``/``k_conv1d``/``v_conv1d`` instead of one ``conv1d``."""

    # With fla installed, transformers runs the delta rule with fla's chunk kernel: per-block
    # compile must keep it opaque as in fla's own layers (parallelisms/compile.py).
    calls_fla_kernels = True

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        del self.conv1d  # the module; reads of `conv1d` now go to the property below
        for name, channels in zip(CONV_NAMES, (self.key_dim, self.key_dim, self.value_dim)):
            conv = nn.Conv1d(channels, channels, kernel_size=self.conv_kernel_size, groups=channels,
                             padding=self.conv_kernel_size - 1, bias=False)
            self.add_module(name, conv)

    @property
    def conv1d(self) -> _StackedConv:
        return _StackedConv(self)


class OlmoHybridForCausalLM(hf.OlmoHybridForCausalLM):
    """transformers' model with the mixers above (the class name is the HF architecture)."""

    def __init__(self, config):
        super().__init__(config)
        for idx, layer in enumerate(self.model.layers):
            if hasattr(layer, "linear_attn"):
                layer.linear_attn = OlmoHybridGatedDeltaNet(config, idx)
        self.post_init()  # initialize the new mixers as transformers initializes its own

"""fla model types that flare trains with data parallelism only: tensor parallelism is refused.

* ``mamba`` (Mamba1): ``x_proj`` contracts all ``d_inner`` channels into the ``dt``/B/C that every
  channel's scan reads, so a channel-sharded mixer needs an all-reduce between ``x_proj`` and the
  scan, and ``dt_proj`` maps the shared low-rank ``dt`` back to every channel.
* ``samba``: its recurrent layers are fla's Mamba1 mixer (as above).
* ``gsa`` (Gated Slot Attention): the output norm ``g_norm`` spans all heads' channels and runs
  fused with ``o_proj`` (fla's ``rms_norm_linear``), so head-sharded ranks cannot normalize alone.
"""

from parallelisms.tp_plans.registry import refuse_tp

MAMBA1 = "Mamba1's x_proj mixes all channels into the dt, B and C every channel's scan reads"
refuse_tp("mamba", MAMBA1)
refuse_tp("samba", f"its recurrent layers are Mamba1 mixers: {MAMBA1}")
refuse_tp("gsa", "Gated Slot Attention's output norm spans all heads, fused with o_proj")

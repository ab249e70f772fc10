"""Runs in the trainer: the ``rollout`` post-step hook (``hook.py``), names per model type
(``adapters.py``), bucketed gathering and packing (``source.py``), flare's senders
(``senders.py``: gloo, nccl, ipc) and vLLM's own weight-transfer API (``vllm_native.py``)."""

"""Rollout weight export: trainer weights → an inference engine (vLLM or flare's reference receiver).

Modules: ``adapters`` (trainer names → engine names, per model type), ``source`` (bucketed,
streaming gather), ``transports`` (gloo / nccl / ipc / vllm), ``hook`` (the ``rollout`` post-step
hook), ``receiver`` (reference receiver process), ``vllm_worker`` (wire protocol and vLLM worker
extension; imports nothing from flare). This package file stays empty so that vLLM can import
``recipe.rollout.vllm_worker`` without pulling in the trainer. See docs/rollout.md.
"""

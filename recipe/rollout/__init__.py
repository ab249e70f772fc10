"""Rollout weight export: trainer weights -> an inference engine (vLLM or flare's reference receiver).

``trainer/`` runs in the training job, ``engine/`` inside the inference engine, ``protocol.py``
is the wire format both share. This file stays empty of imports so that vLLM can import
``recipe.rollout.engine.vllm_extension`` without pulling in the trainer. See docs/rollout.md.
"""

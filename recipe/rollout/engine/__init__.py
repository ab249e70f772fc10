"""Runs in the inference engine: the receiving endpoint (``endpoint.py``), flare's vLLM worker
extension (``vllm_extension.py``), and flare's reference receiver (``reference_receiver.py``, a
stand-in engine for tests and benchmarks). ``endpoint`` and ``vllm_extension`` import only torch,
the standard library and ``recipe.rollout.protocol``."""

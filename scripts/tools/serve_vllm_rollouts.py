"""The engine of an RL run: vLLM with flare's worker extension, serving ``train.py --rl.enable``.

Starts ``vllm.LLM`` on the model config (random weights: the trainer's version 0 overwrites them),
listens for the trainer's weights (``flare_connect``), and then per step: wakes its weights,
applies the trainer's next version (``flare_receive``), wakes its KV cache, answers the trainer's
generation request for that version (``recipe/rollout/engine/generation.py``) with
``LLM.generate`` (the sampled tokens' log-probabilities after temperature), and sleeps again so the
trainer has the GPU. It exits when the trainer ends training.

    python scripts/tools/serve_vllm_rollouts.py --model_config configs/rl/llama_rl.json --port 29650 --sleep &
    python train.py --job.config_file configs/rl/reverse_grpo.toml
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from scripts.tools.check_vllm import EXTENSION, Sleep, hf_dir_for

logger = logging.getLogger("serve_vllm_rollouts")


def vllm_generate(llm):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    def generate(prompts, n, max_new_tokens, temperature, seed, stop_ids):
        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens, logprobs=0,
                                stop_token_ids=stop_ids, seed=seed, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        completions = [[list(c.token_ids) for c in o.outputs] for o in outs]
        logprobs = [[[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] for c in o.outputs] for o in outs]
        return completions, logprobs

    return generate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_config", required=True, help="the trainer's model config JSON")
    ap.add_argument("--address", default="127.0.0.1", help="where the engine listens (rollout.engine_address)")
    ap.add_argument("--port", type=int, default=29650, help="rollout.engine_port")
    ap.add_argument("--transport", default="ipc", choices=["ipc", "gloo", "nccl"], help="rollout.transport")
    ap.add_argument("--sleep", action="store_true", help="enable_sleep_mode; sleep (level 1) while the trainer trains")
    ap.add_argument("--gpu_memory_utilization", type=float, default=0.3)
    ap.add_argument("--max_model_len", type=int, default=512)
    ap.add_argument("--attention_backend", default="TRITON_ATTN", help="vLLM attention backend, or 'auto'")
    ap.add_argument("--timeout_s", type=float, default=120.0, help="rollout.timeout_s of the trainer")
    ap.add_argument("--ready_file", default=None, help="touched once the engine listens")
    ap.add_argument("--work", default="/tmp/flare_rl_engine")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[engine] %(message)s")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.makedirs(args.work, exist_ok=True)
    model_dir, _ = hf_dir_for(args.model_config, args.work)

    from vllm import LLM

    from recipe.rollout.engine.generation import GenerationService

    kwargs = dict(model=model_dir, load_format="dummy", dtype="bfloat16", enforce_eager=True, skip_tokenizer_init=True,
                  gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len, seed=0,
                  worker_extension_cls=EXTENSION, enable_sleep_mode=args.sleep, logprobs_mode="processed_logprobs")
    if args.attention_backend != "auto":
        kwargs["attention_config"] = {"backend": args.attention_backend}
    llm = LLM(**kwargs)
    llm.collective_rpc("flare_connect", args=(args.address, args.port, args.transport, args.timeout_s))
    service = GenerationService(address=args.address, port=args.port)
    generate = vllm_generate(llm)
    sleep = Sleep(llm, args.sleep)
    sleep.sleep()
    if args.ready_file:
        open(args.ready_file, "w").close()
    served = 0
    while True:
        sleep.wake("weights")  # a receive into sleeping weights is refused
        got = llm.collective_rpc("flare_receive")[0]
        if got["status"] == "closed":
            break
        sleep.wake("kv_cache")
        llm.reset_prefix_cache()  # cached KV blocks came from the old weights
        t0 = time.perf_counter()
        if service.serve(got["version"], generate, wait_s=args.timeout_s):
            served += 1
            logger.info(f"version {got['version']}: completions in {time.perf_counter() - t0:.2f}s")
        sleep.sleep()
    logger.info(f"the trainer ended training; {served} batches of completions served")
    sleep.wake()
    llm.collective_rpc("flare_close")
    sys.stdout.flush()
    os._exit(0)  # vLLM leaves threads behind


if __name__ == "__main__":
    sys.exit(main())

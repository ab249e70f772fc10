"""On-policy RL on the engine's rollouts (runs in the trainer): ``tasks`` (prompts with verifiable
answers, reward functions), ``rollouts`` (asks the engine for completions, scores them, builds the
step's batch), ``loss`` (the GRPO policy-gradient loss). The engine's half is
``recipe/rollout/engine/generation.py``. See docs/rl.md."""

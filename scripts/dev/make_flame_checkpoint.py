"""Write tests/data/flame_checkpoint/: a checkpoint made by fla-org/flame's own training code.

flame (https://github.com/fla-org/flame) trains a tiny GLA model on CPU for 7 steps, saving a DCP
checkpoint at step 4 through torchtitan's CheckpointManager (the commit flame's README pins), and
keeps training to step 7. What it logged for every step (loss, gradient norm, learning rate) goes
to flame_run.json; tests/test_flame_checkpoint.py resumes step-4 in flare and compares steps 5-7.
flame's own converter (flame/utils/convert_dcp_to_hf.py) turns step-4 into an HF folder (hf/).

Every document of the data set is the same 30-byte text, so with bos/eos every packed row is the
same 32 tokens in flame and in flare, whatever order either reads the documents in: the losses
after the resume depend only on what the checkpoint restores.

This runs flame, not flare, in its own virtualenv (flame pins an older torchtitan than flare's):

    python3.11 -m venv /tmp/flame_venv
    /tmp/flame_venv/bin/pip install torch==2.13.0 triton==3.9.0 fla-core==0.6.0 \\
        flash-linear-attention==0.6.0 transformers==5.24.0 datasets==3.6.0 torchdata==0.11.0 \\
        tyro tomli tiktoken blobfile einops tensorboard tabulate   # flame's data.py needs datasets 3.x
    # flame and torchtitan sources (no install: they go on PYTHONPATH)
    git clone https://github.com/fla-org/flame /tmp/flame_src           # commit e11e7be
    git clone --no-checkout https://github.com/pytorch/torchtitan /tmp/tt_repo
    git -C /tmp/tt_repo sparse-checkout set torchtitan assets
    git -C /tmp/tt_repo checkout 0b44d4c                                # flame's README pins it
    /tmp/flame_venv/bin/python scripts/dev/make_flame_checkpoint.py \\
        --flame /tmp/flame_src --torchtitan /tmp/tt_repo --out tests/data/flame_checkpoint

flame expects a GPU; on CPU this script (not flame) adapts two things at launch: flare's CPU
shims from recipe/device.py (gloo, torchtitan's device type, Triton's interpreter, whose loop
indices fla's kernels need as tensors) and torchtitan's memory monitor, which reads CUDA
statistics. The job goes to flame as a job file (flame reads some keys, e.g.
training.pin_memory, only from one). Nothing in flame's sources is edited.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXT = "flame checkpoints resume here."  # 30 bytes: with bos and eos one 32-token row
SEQ_LEN, BATCH, STEPS, SAVE_STEP = 32, 2, 7, 4
N_DOCS = 64
MODEL_CONFIG = {
    "model_type": "gla", "attn_mode": "chunk", "hidden_size": 32, "num_heads": 1, "num_hidden_layers": 2,
    "intermediate_size": 64, "hidden_act": "swish", "expand_k": 0.5, "expand_v": 1, "use_gk": True,
    "use_gv": False, "use_output_gate": True, "use_short_conv": False, "norm_eps": 1e-6,
    "fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": False, "fuse_linear_cross_entropy": False,
    "tie_word_embeddings": False, "initializer_range": 0.02, "max_position_embeddings": 2048,
    "vocab_size": 264, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258, "use_cache": True,
}
# The flame job; tests/test_flame_checkpoint.py gives flare the same values under its own keys.
JOB = {
    "optimizer.lr": 3e-3, "optimizer.eps": 1e-15, "optimizer.weight_decay": 0.1,
    "lr_scheduler.warmup_steps": 2, "lr_scheduler.decay_type": "cosine", "lr_scheduler.lr_min": 0.1,
    "training.batch_size": BATCH, "training.seq_len": SEQ_LEN, "training.context_len": SEQ_LEN,
    "training.steps": STEPS, "training.max_norm": 1.0, "training.seed": 42,
    "training.mixed_precision_param": "float32", "checkpoint.interval": SAVE_STEP,
}


def git_commit(path: str) -> str:
    try:
        return subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def write_inputs(out: str) -> None:
    from tokenizers.processors import TemplateProcessing

    from recipe.tokenizer import BOS, EOS, byte_tokenizer

    tok = byte_tokenizer()
    # flame adds no bos/eos itself: its tokenizer must (flare frames documents on its own).
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, tok.bos_token_id), (EOS, tok.eos_token_id)]
    )
    tok.save_pretrained(os.path.join(out, "tokenizer"))
    with open(os.path.join(out, "gla.json"), "w") as f:
        json.dump(MODEL_CONFIG, f, indent=2)
    with open(os.path.join(out, "data.jsonl"), "w") as f:
        for _ in range(N_DOCS):
            f.write(json.dumps({"text": TEXT}) + "\n")


def adapt_to_cpu() -> None:
    """flare's CPU path (gloo, torchtitan's device type, Triton's interpreter); before fla/triton/torchtitan."""
    from recipe.device import configure_device

    assert configure_device() == "cpu"


class CpuMemoryMonitor:
    """torchtitan's DeviceMemoryMonitor reads CUDA memory statistics; on CPU it reports zeros."""

    device_name, device_capacity_gib = "cpu", 0.0

    def __init__(self, device=None):
        pass

    def get_peak_stats(self):
        from torchtitan.components.metrics import DeviceMemStats

        return DeviceMemStats(0.0, 0.0, 0.0, 0.0, 0, 0)

    def reset_peak_stats(self):
        pass


def run_flame(out: str, work: str) -> list[dict]:
    """flame.train.main in this process (a process group of one); returns what flame logged."""
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
    import torch
    import torchtitan.components.metrics as titan_metrics
    from torchtitan.tools.logging import init_logger

    import flame.data
    import flame.train
    from flame.config_manager import JobConfig

    titan_metrics.DeviceMemoryMonitor = CpuMemoryMonitor
    logged: list[dict] = []
    log = titan_metrics.MetricsProcessor.log

    def record(self, step, global_avg_loss, global_max_loss, extra_metrics=None):
        extra = extra_metrics or {}
        logged.append({"step": step, "loss": float(global_avg_loss), "grad_norm": extra.get("optimizer/grad_norm"),
                       "lr": extra.get("optimizer/lr")})
        return log(self, step, global_avg_loss, global_max_loss, extra_metrics)

    titan_metrics.MetricsProcessor.log = record
    # A flame job file (flame reads some keys, e.g. training.pin_memory, only from one). One loader
    # worker: flame's loader always passes prefetch_factor, which torchdata refuses without workers.
    sections: dict[str, dict] = {
        "job": {"dump_folder": os.path.join(work, "exp")},
        "model": {"config": os.path.join(out, "gla.json"), "tokenizer_path": os.path.join(out, "tokenizer")},
        "training": {"dataset": "json", "data_files": os.path.join(out, "data.jsonl"), "dataset_split": "train",
                     "streaming": True, "num_workers": 1, "pin_memory": False, "persistent_workers": False,
                     "skip_nan_inf": True, "compile": False},
        "checkpoint": {"enable_checkpoint": True, "folder": "checkpoint", "keep_latest_k": 0,
                       "async_mode": "disabled"},
        "metrics": {"log_freq": 1, "enable_wandb": False, "enable_tensorboard": False},
        "profiling": {"enable_profiling": False},
        "activation_checkpoint": {"mode": "none"},
    }
    for key, value in JOB.items():
        section, name = key.split(".")
        sections.setdefault(section, {})[name] = value
    job_file = os.path.join(work, "flame_job.toml")
    with open(job_file, "w") as f:
        for section, values in sections.items():
            f.write(f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
    argv = ["--job.config_file", job_file]
    init_logger()
    config = JobConfig()
    config.parse_args(argv)
    torch.manual_seed(0)
    flame.train.main(config)
    torch.distributed.destroy_process_group()
    return logged


def convert_to_hf(out: str, work: str) -> None:
    """flame's converter reads <path>/checkpoint/step-N and writes the HF files into <path>."""
    from flame.utils.convert_dcp_to_hf import save_pretrained

    hf = os.path.join(work, "hf")
    os.makedirs(hf)
    os.symlink(os.path.join(out, "checkpoint"), os.path.join(hf, "checkpoint"))
    save_pretrained(hf, SAVE_STEP, os.path.join(out, "gla.json"), os.path.join(out, "tokenizer"))
    os.unlink(os.path.join(hf, "checkpoint"))
    shutil.copytree(hf, os.path.join(out, "hf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flame", required=True, help="a checkout of fla-org/flame")
    parser.add_argument("--torchtitan", required=True, help="a checkout of pytorch/torchtitan at 0b44d4c")
    parser.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "flame_checkpoint"))
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    # flame's modules import `custom_models` and `flame` from its root; torchtitan from source.
    sys.path[:0] = [os.path.abspath(args.torchtitan), os.path.abspath(args.flame), ROOT]
    adapt_to_cpu()

    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    write_inputs(out)
    with tempfile.TemporaryDirectory() as work:
        logged = run_flame(out, work)
        saved = os.path.join(work, "exp", "checkpoint", f"step-{SAVE_STEP}")
        shutil.copytree(saved, os.path.join(out, "checkpoint", f"step-{SAVE_STEP}"))
        convert_to_hf(out, work)

    import fla
    import torch
    import transformers

    run = {
        "flame_commit": git_commit(args.flame),
        "torchtitan_commit": git_commit(args.torchtitan),
        "versions": {"torch": torch.__version__, "fla": fla.__version__, "transformers": transformers.__version__},
        "model_config": "gla.json",
        "job": JOB,
        "saved_step": SAVE_STEP,
        "logged": logged,
    }
    with open(os.path.join(out, "flame_run.json"), "w") as f:
        json.dump(run, f, indent=1)
    print(json.dumps(logged, indent=1))


if __name__ == "__main__":
    main()

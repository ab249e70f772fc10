"""flare's single entrypoint.

    torchrun --nproc_per_node=N train.py --job.config_file configs/X.toml [--section.key value ...]
    python train.py --job.config_file configs/debug.toml          # one process
    python train.py --job.config_file configs/X.toml --job.dry_run  # check, plan, estimate; no GPU

Bad input (config keys, files, degrees) ends with one line on stderr and exit code 2; pass
``--debug.traceback`` to see the full traceback instead.
"""

import json
import os
import sys
import time

from recipe.device import configure_device

configure_device()  # before anything imports fla/triton: selects CUDA+NCCL or CPU+gloo+Triton interpreter

import logging  # noqa: E402

from torchtitan.tools.logging import init_logger  # noqa: E402

from recipe.config import parse_job_config  # noqa: E402
from recipe.errors import UserError  # noqa: E402
from recipe.shutdown import exit_without_finalizing  # noqa: E402


# How long a rank other than 0 waits before exiting on bad input (see main).
USER_ERROR_GRACE_S = 5.0


def save_config(job_config) -> None:
    """job.save_config_file: the resolved config as JSON, under job.dump_folder (as torchtitan)."""
    path = os.path.join(job_config.job.dump_folder, job_config.job.save_config_file)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(job_config.to_dict(), f, indent=2)
    logging.getLogger(__name__).info(f"Saved the job config to {path}")


def main(argv: list[str] | None = None) -> int:
    init_logger()
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the job
    args = sys.argv[1:] if argv is None else argv
    show_traceback = any(a.startswith("--debug.traceback") and not a.endswith(("false", "0")) for a in args)
    trainer = None
    try:
        job_config = parse_job_config(args)
        if rank == 0 and job_config.job.print_config:
            print(json.dumps(job_config.to_dict(), indent=2), flush=True)
        if job_config.job.dry_run:
            from recipe.dry_run import report

            report_text = report(job_config, int(os.environ.get("WORLD_SIZE", "1")))
            if rank == 0:
                print(report_text, flush=True)
            return 0
        from recipe.trainer import Trainer  # heavy imports only once the config is known to be good

        logging.getLogger(__name__).info(f"Starting job: {job_config.job.description}")
        trainer = Trainer(job_config)
        if rank == 0 and job_config.job.save_config_file:
            save_config(job_config)
        trainer.train()
    except UserError as e:
        if show_traceback:
            raise
        if rank == 0:
            print(f"flare: error: {e}", file=sys.stderr)
        else:
            # Every rank finds the same bad input and rank 0 says why. torchrun stops the other
            # ranks as soon as one exits, so a rank that got here first used to cut rank 0 off
            # before its line (seen under load: 4 ranks on 2 cores). Rank 0 goes first.
            time.sleep(USER_ERROR_GRACE_S)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    exit_without_finalizing(main())

"""flare's reference receiver with a fault injected mid-transfer: it exits, or hangs (alive but
silent, as a wedged engine), while loading bucket ``--fail_bucket`` of version ``--fail_version``.

    python -m tests.rollout.faulty_receiver --fail_version 2 --fail_mode exit <reference receiver args>
"""

import argparse
import logging
import os
import signal
import sys

from recipe.rollout.engine import reference_receiver

logger = logging.getLogger("flare.receiver")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fail_version", type=int, required=True)
    ap.add_argument("--fail_bucket", type=int, default=1)
    ap.add_argument("--fail_mode", default="exit", choices=["exit", "hang"])
    args, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)

    def wrap_load(load_weights, version_seen):
        def faulty(weights):
            if version_seen["v"] == args.fail_version and version_seen["buckets"] == args.fail_bucket:
                logger.warning(f"fault injection: {args.fail_mode} in bucket {args.fail_bucket} of version "
                               f"{args.fail_version}")
                if args.fail_mode == "exit":
                    os._exit(3)
                os.kill(os.getpid(), signal.SIGSTOP)
            return load_weights(weights)
        return faulty

    reference_receiver.main(rest, wrap_load=wrap_load)


if __name__ == "__main__":
    main()

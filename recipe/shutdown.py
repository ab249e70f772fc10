"""How flare's multi-process entrypoints (``train.py``, torchrun test and bench scripts) end."""

import atexit
import os
import sys
import threading


def exit_without_finalizing(code: int) -> None:
    """Exit as the interpreter would (non-daemon threads joined, atexit handlers run: log handlers,
    compile workers, W&B; streams flushed), but skip its finalization, as multiprocessing ends its
    children. gloo's worker threads outlive destroy_process_group (FSDP holds the group), and one
    that still had a tensor to release when finalization began took the GIL then and aborted a
    finished rank ("terminate called without an active exception", exit -6, seen on a loaded
    2-core CI box in ``train.py`` and in ``tests/rollout/fsdp_fill.py``; pytorch/pytorch#190489)."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

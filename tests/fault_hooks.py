"""Post-step hooks that inject faults, for tests/test_faults.py (named by dotted path in --hooks.post_step)."""

import os
import signal


def kill_rank1_after_step2(state):
    if state.step == 2 and int(os.environ.get("RANK", "0")) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a rank that dies without a word, like an OOM kill


def kill_every_rank_after_step4(state):
    if state.step == 4:  # hooks run after the step's checkpoint: step-4 is complete on disk
        os.kill(os.getpid(), signal.SIGKILL)

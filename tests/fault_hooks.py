"""Post-step hooks that inject faults, for tests/test_faults.py (named by dotted path in --hooks.post_step)."""

import os
import signal


def kill_rank1_after_step2(state):
    if state.step == 2 and int(os.environ.get("RANK", "0")) == 1:
        os.kill(os.getpid(), signal.SIGKILL)  # a rank that dies without a word, like an OOM kill


def _kill_every_rank_after(step):
    def hook(state):
        if state.step == step:  # hooks run after the step's checkpoint: it is complete on disk
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


kill_every_rank_after_step2 = _kill_every_rank_after(2)
kill_every_rank_after_step4 = _kill_every_rank_after(4)

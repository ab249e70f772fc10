"""Config parsing: TOML + CLI precedence, flare's sections, and one-line errors for bad input."""

import subprocess
import sys

import pytest

from recipe.config import parse_job_config
from recipe.errors import ConfigError

from conftest import ROOT


def write(tmp_path, text, name="job.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_precedence_cli_over_toml_over_defaults(tmp_path):
    toml = write(tmp_path, "[training]\nsteps = 7\nseq_len = 32\n[model]\ntokenizer = 'bytes'\n")
    cfg = parse_job_config(["--job.config_file", toml, "--training.seq_len", "16"])
    assert cfg.training.steps == 7  # TOML over default
    assert cfg.training.seq_len == 16  # CLI over TOML
    assert cfg.optimizer.name == "AdamW"  # torchtitan default
    assert cfg.training.dataset == "synthetic"  # flare default
    assert cfg.checkpoint.last_save_model_only is False  # flare overrides torchtitan's default


def test_cli_forms_and_booleans(tmp_path):
    cfg = parse_job_config(["--training.varlen", "--checkpoint.enable=true", "--training.seq-len=48",
                            "--hooks.post_step", "a.b:C,d.e:F"])
    assert cfg.training.varlen and cfg.checkpoint.enable and cfg.training.seq_len == 48
    assert cfg.hooks.post_step == ["a.b:C", "d.e:F"]
    cfg = parse_job_config(["--training.varlen", "false", "--training.no_skip_nan_inf"])
    assert not cfg.training.varlen and not cfg.training.skip_nan_inf


def test_toml_lists_and_flare_sections(tmp_path):
    toml = write(tmp_path, "[hooks]\npost_step = ['x.y:Z']\n[training]\nvarlen = true\ncontext_len = 16\nseq_len = 32\n")
    cfg = parse_job_config(["--job.config_file", toml])
    assert cfg.hooks.post_step == ["x.y:Z"] and cfg.training.context_len == 16


@pytest.mark.parametrize(
    "args, toml, needle",
    [
        (["--training.stepz", "3"], None, "--training.stepz: unknown option; did you mean --training.steps?"),
        (["--training.steps", "abc"], None, "--training.steps: must be an integer"),
        (["--training.dtype", "fp16"], None, "--training.dtype: must be one of"),
        (["--training.varlen", "maybe"], None, "--training.varlen: must be true or false"),
        ([], "[trainin]\nsteps = 1\n", "unknown section [trainin]; did you mean 'training'?"),
        ([], "[training]\nstepz = 1\n", "training.stepz: unknown key; did you mean 'steps'?"),
        ([], "[training]\nsteps = 'x'\n", "training.steps: must be an integer"),
        ([], "[training]\nsteps = 1.5\n", "training.steps: must be an integer"),
        ([], "[activation_checkpoint]\nmode = 'partial'\n", "activation_checkpoint.mode: must be one of"),
        ([], "[training\n", "invalid TOML"),
        (["--training.steps", "0"], None, "training.steps=0: must be a positive integer"),
        (["--model.norm_backward_programs_per_sm", "0"], None,
         "model.norm_backward_programs_per_sm=0: must be a positive integer"),
        (["--checkpoint.keep_latest_k", "1"], None, "checkpoint.keep_latest_k=1"),
        (["--parallelism.pipeline_parallel_degree", "2"], None, "pipeline parallelism is not supported"),
        (["--parallelism.enable_async_tensor_parallel", "--parallelism.tensor_parallel_degree", "1"], None,
         "needs tensor_parallel_degree > 1"),
        (["--training.varlen", "--training.context_len", "100", "--training.seq_len", "64"], None,
         "training.context_len=100"),
        (["--model.config", "/nonexistent.json"], None, "model.config: no such file"),
        (["--model.tokenizer", "/nonexistent"], None, "model.tokenizer: no such file"),
        (["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "every"], None,
         "selective_ac_option"),
        (["--training.gradient_accumulation_steps", "2", "--training.global_batch_size", "3"], None,
         "disagrees with local_batch_size"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, args, toml, needle):
    if toml is not None:
        args = ["--job.config_file", write(tmp_path, toml)] + args
    with pytest.raises(ConfigError) as err:
        parse_job_config(args)
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "args, world, needle",
    [
        (["--parallelism.tensor_parallel_degree", "3"], 4, "not divisible"),
        (["--parallelism.data_parallel_shard_degree", "2"], 4, "but the world size is 4"),
        (["--parallelism.enable_async_tensor_parallel", "--parallelism.tensor_parallel_degree", "2"], 2,
         "needs compile.enable"),
        (["--training.seq_len", "63", "--parallelism.tensor_parallel_degree", "2"], 2, "divisible by tensor_parallel"),
    ],
)
def test_degree_checks_use_world_size(args, world, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_job_config(args, world_size=world)


def test_gradient_accumulation_derivation():
    from recipe.config import gradient_accumulation_steps

    cfg = parse_job_config(["--training.local_batch_size", "2", "--training.global_batch_size", "16"], world_size=4)
    assert gradient_accumulation_steps(cfg, dp_degree=4) == 2
    cfg = parse_job_config(["--training.local_batch_size", "2", "--training.gradient_accumulation_steps", "3"])
    assert gradient_accumulation_steps(cfg, dp_degree=1) == 3


def test_train_py_reports_config_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--job.config_file", "configs/debug.toml", "--training.stepz", "2",
         "--job.dump_folder", str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "flare: error: --training.stepz: unknown option; did you mean --training.steps?"
    )
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing created for a job that never started


@pytest.mark.parametrize("rank", ["0", "1"])
def test_on_bad_input_rank_0_speaks_and_the_other_ranks_leave_after_it(rank, monkeypatch, capsys):
    """torchrun stops every rank once one exits: the others must not exit before rank 0 has said
    what is wrong (its line was lost when a faster rank left first)."""
    import train

    slept = []
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(train.time, "sleep", slept.append)
    assert train.main(["--job.config_file", "configs/debug.toml", "--training.stepz", "2"]) == 2
    err = capsys.readouterr().err
    if rank == "0":
        assert "flare: error: --training.stepz: unknown option" in err and slept == []
    else:
        assert "flare: error" not in err and slept == [train.USER_ERROR_GRACE_S]


def test_entrypoints_exit_like_the_interpreter_but_without_finalizing(tmp_path):
    """train.py and the torchrun scripts leave through os._exit (recipe/shutdown.py): what a
    normal exit does first must still happen: non-daemon threads finish, atexit handlers run,
    output is flushed, and the exit code is main()'s."""
    marker = tmp_path / "marker"
    script = f"""
import atexit, sys, threading, time
sys.path.insert(0, {ROOT!r})
from recipe.shutdown import exit_without_finalizing
atexit.register(lambda: open({str(marker)!r}, "a").write("atexit\\n"))
threading.Thread(target=lambda: (time.sleep(0.5), open({str(marker)!r}, "a").write("thread\\n"))).start()
sys.stdout.write("buffered, no newline")
exit_without_finalizing(3)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.endswith("buffered, no newline")
    assert marker.read_text() == "thread\natexit\n"

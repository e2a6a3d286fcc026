"""Bad command lines through the installed `cdmctl` entry point (a real subprocess, as a user runs it).

Every refusal exits with its code, prints one `error:` line (plus an optional `  fix:` line) and never a
traceback, and happens before diffusers/transformers are imported (checked with `python -X importtime`,
not by timing). Ctrl-C and SIGTERM during training exit 130/143 with the line that says how to resume, and
after SIGTERM that command does resume.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CDMCTL = shutil.which("cdmctl") or str(Path(sys.executable).parent / "cdmctl")
HEAVY = ("diffusers", "transformers")
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)$")


def run_cdmctl(*args: str, importtime: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """The entry-point script itself; with `importtime`, under `python -X importtime` to log every import."""
    cmd = [sys.executable, "-X", "importtime", CDMCTL, *args] if importtime else [CDMCTL, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def split_stderr(err: str) -> tuple[list[str], set[str]]:
    """(our stderr lines, the top-level names of every module imported) from an -X importtime stderr."""
    lines, modules = [], set()
    for line in err.splitlines():
        match = IMPORT_LINE.match(line)
        if match:
            modules.add(match.group(1).split(".")[0])
        elif not line.startswith("import time:"):
            lines.append(line)
    return lines, modules


def assert_one_error(lines: list[str], message: str) -> None:
    assert not any("Traceback" in line for line in lines), lines
    assert 1 <= len(lines) <= 2, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines
    assert len(lines) == 1 or lines[1].startswith("  fix: "), lines


# (arguments, what the error line says, exit code). Models need not exist: each refusal comes first.
BAD_INPUTS = [
    (["distill", "--bogus"], "No such option: --bogus", 2),
    (["distill"], "Missing option '--preset'", 2),
    (["distill", "--preset", "demo", "--set"], "'--set' requires an argument", 2),
    (["distill", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'", 2),
    (["distill", "--preset", "demo", "--set", "optim.bogus=1"], "optim.bogus: unknown key", 2),
    (["export"], "Missing argument", 2),
    (["generate"], "Missing option '--model'", 2),
    (["generate", "--model", "no-such-model"], "no prompts given", 2),
    (["generate", "a cat", "--steps", "abc"], "Invalid value for '--steps'", 2),
    (["nocmd"], "No such command 'nocmd'", 2),
    (["presets", "nocmd"], "No such command 'nocmd'", 2),
    (["generate", "a cat", "-m", "no-such-model", "--device", "bogus"], "unknown --device 'bogus'", 2),
    (["eval", "-m", "no-such-model", "--phase", "generate", "--device", "bogus"], "unknown --device 'bogus'", 2),
    (["generate", "a cat", "-m", "no-such-model", "--sigmas", "1,nan"], "bad --sigmas", 2),
    (["eval", "-m", "no-such-model", "--phase", "generate", "--sigmas", "1,nan"], "bad --sigmas", 2),
    (["generate", "a cat", "-m", "no-such-model", "--steps", "1000"], "--steps 1000 is outside 1..100", 2),
    (["eval", "-m", "no-such-model", "--phase", "generate", "--steps", "0"], "--steps 0 is outside 1..100", 2),
    (["eval", "-m", "no-such-model", "--metrics", "bogus"], "unknown metric 'bogus'", 2),
    (["eval", "-m", "no-such-model", "--phase", "bogus"], "unknown --phase 'bogus'", 2),
]


@pytest.mark.parametrize("args, message, code", BAD_INPUTS, ids=[" ".join(a) for a, _, _ in BAD_INPUTS])
def test_bad_input_is_one_error_line_before_heavy_imports(args, message, code):
    result = run_cdmctl(*args, importtime=True)
    lines, modules = split_stderr(result.stderr)
    assert result.returncode == code, result.stderr
    assert_one_error(lines, message)
    assert "Traceback" not in result.stdout
    assert not modules & set(HEAVY), f"{sorted(modules & set(HEAVY))} imported before the error"


def test_a_busy_run_folder_is_refused_before_heavy_imports(tmp_path):
    (tmp_path / "checkpoints" / "step-0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-0000002" / "manifest.json").write_text("{}")
    result = run_cdmctl("distill", "--preset", "demo", "--out", str(tmp_path), importtime=True)
    lines, modules = split_stderr(result.stderr)
    assert result.returncode == 2
    assert_one_error(lines, "already holds a run")
    assert not modules & set(HEAVY)


def test_cuda_on_a_cpu_only_torch_is_a_user_error():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cdmctl("generate", "a cat", "-m", "no-such-model", "--device", "cuda")
    assert result.returncode == 2
    assert_one_error(result.stderr.splitlines(), "--device cuda:")


@pytest.mark.parametrize("args", [[], ["presets"]], ids=["cdmctl", "cdmctl presets"])
def test_bare_group_prints_help_and_exits_2(args):
    """click >= 8.2's convention, kept whatever click is installed: naming no command is a usage error."""
    result = run_cdmctl(*args)
    assert result.returncode == 2
    assert "Usage:" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_help_still_exits_0():
    result = run_cdmctl("--help")
    assert result.returncode == 0 and "distill" in result.stdout and not result.stderr


def test_every_metric_name_of_the_cdm_reference_is_accepted(tmp_path):
    """The reference's names (`dpgbench` included) pass the metric check; then an empty folder is refused."""
    names = "imagereward clipscore pickscore hpsv2 hpsv3 aesthetic ocr dpgbench".split()
    result = run_cdmctl("eval", "--metrics", *names, "--phase", "score", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "unknown metric" not in result.stderr
    assert_one_error(result.stderr.splitlines(), "")  # "no generated images", or an extra not installed here


# ----------------------------------------------------------------------------- signals during training

TINY_DEMO = {  # the demo preset on the tiny random pipeline, CPU-sized: a few seconds per iteration
    "model.pretrained": "builtin:tiny-sd3",
    "model.resolution": 16,
    "train.iterations": 100000,
    "train.batch_size": 2,
    "method.schedule.length": "[1, 4]",
    "run.log_every": 1,
    "run.sample_every": 0,
    "run.checkpoint_every": 0,  # only the signal's own checkpoint (SIGTERM) can exist
    "data.sample_prompts": "[a red cat]",
    "eval.enabled": "false",  # the demo's evaluation scores against the toy teacher's ground truth, not this model's
}


def start_training(out: Path) -> subprocess.Popen:
    sets = [a for k, v in TINY_DEMO.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen(
        [CDMCTL, "distill", "--preset", "demo", "--plain", "--out", str(out), *sets],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job may inherit SIG_IGN
    )  # fmt: skip


def wait_for_metrics(proc: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    """Until the first metrics line is written: training is then inside the loop."""
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"training did not start: {proc.communicate()[1][-2000:]}")
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_during_training_exits_with_a_resume_line(sig, code, tmp_path):
    out = tmp_path / "run"
    proc = start_training(out)
    wait_for_metrics(proc, out)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("training did not stop on the signal")
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"interrupted ({sig.name}) at iteration "), last
    iteration = int(re.search(r"at iteration (\d+)", last).group(1))
    if sig == signal.SIGINT:  # at once, mid-iteration: nothing consistent to save, none was due
        assert "no checkpoint yet" in last and last.endswith("--out NEW_DIR")
        assert not list(out.glob("checkpoints/step-*"))
        return
    # SIGTERM: the iteration in progress finishes and is checkpointed, and the printed command resumes it
    checkpoint = out / "checkpoints" / f"step-{iteration:07d}"
    assert f"last checkpoint {checkpoint};" in last and (checkpoint / "manifest.json").is_file()
    assert last.endswith(f"--out {out} --resume")
    assert json.loads((checkpoint / "manifest.json").read_text())["iteration"] == iteration
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[0] == "cdmctl"
    resumed = subprocess.run([CDMCTL, *command[1:], "--set", f"train.iterations={iteration + 1}"],
                             capture_output=True, text=True, timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "checkpoints" / f"step-{iteration + 1:07d}" / "manifest.json").is_file()


def wait_until_mapped(proc: subprocess.Popen, folder: Path, timeout: float = 240) -> None:
    """Until the process has memory-mapped a weights file of `folder` (safetensors maps them): it is then past
    argument parsing, loading the model inside the command."""
    deadline = time.monotonic() + timeout
    maps = Path(f"/proc/{proc.pid}/maps")
    while str(folder) not in (maps.read_text() if maps.exists() else ""):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the command did not start loading: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux) to see the model being loaded")
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_ctrl_c_in_generate_and_eval_exits_130_with_one_line(command, tiny_sd3_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    args = {"generate": ["generate", "--prompts", str(prompts), "-n", "100000", "--steps", "2"],
            "eval": ["eval", "--prompts", str(prompts), "--phase", "generate", "--num-per-prompt", "100000",
                     "--steps", "2"]}[command]  # fmt: skip
    proc = subprocess.Popen([CDMCTL, *args, "--model", str(tiny_sd3_dir), "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    wait_until_mapped(proc, tiny_sd3_dir)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{command} did not stop on SIGINT")
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("interrupted")]
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("interrupted (SIGINT): ") and "run the same command again" in lines[0]


def test_an_interrupt_that_a_library_turned_into_its_own_error_is_reported_as_the_interrupt(capsys):
    """safetensors, interrupted inside diffusers' weight loading, hands back an OSError instead of the
    KeyboardInterrupt (seen once in a full run of the test above): the command must still exit 130 with its line."""
    import typer

    from cdmctl.cli import interrupt_line

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(typer.Exit) as stopped:
        with interrupt_line("the images so far are kept"):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # the handler runs here
            except KeyboardInterrupt:
                raise OSError("Unable to load weights from checkpoint file") from None
    assert stopped.value.exit_code == 130
    assert capsys.readouterr().err.strip() == "interrupted (SIGINT): the images so far are kept"
    assert signal.getsignal(signal.SIGINT) is before  # the command's handler is gone again
    with pytest.raises(OSError):  # without an interrupt an error is the error it is
        with interrupt_line("kept"):
            raise OSError("disk on fire")

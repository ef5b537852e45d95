"""File-system faults, injected for real where the machine allows: folders that cannot be created
or written, a file-size limit that cuts a render, a training save or a live recording short, and
damaged checkpoints on --resume. Each ends in one line and a clear exit code, and what existed
before (or what was written before the fault) stays intact and usable."""
import errno
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from pipeline.plan import plan_prompt
from utils.config import load_config
from utils.video import probe_video

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config_path", "configs/tiny.yaml"]
TINY_DMD = ["--config_path", "configs/tiny_dmd.yaml", "--disable-wandb"]


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run(script, *args, limit_bytes=None, as_nobody=False, stdin=subprocess.DEVNULL, input=None, timeout=300):
    """``python script args`` in the repo; ``limit_bytes``: RLIMIT_FSIZE of the child (and of
    the ffmpeg it starts), as a full disk or a quota would cut its files; ``as_nobody``: run it
    as the unprivileged user 'nobody' (root ignores file permissions)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([*(AS_NOBODY if as_nobody else []), sys.executable, script, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if limit_bytes else None,
                          stdin=None if input is not None else stdin, input=input)


def one_error_line(r, *fragments):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------- folders that cannot be written
@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here (not root, or no mount permission)")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True)


@pytest.fixture
def unwritable_folder():
    """A folder without write permission, and whether to try it as 'nobody' (root ignores
    permissions)."""
    base = Path(tempfile.mkdtemp(prefix="unwritable-"))
    base.chmod(0o755)
    folder = base / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    as_nobody = os.geteuid() == 0
    if as_nobody:
        try:
            ok = subprocess.run([*AS_NOBODY, sys.executable, "-c", "import utils.fs"], cwd=REPO,
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
        if not ok:
            shutil.rmtree(base)
            pytest.skip("cannot run the project as 'nobody' here (setpriv missing or the venv unreadable)")
    yield folder, as_nobody
    folder.chmod(0o755)
    shutil.rmtree(base)


def a_file(path: Path) -> Path:
    path.write_text("x")
    return path


@pytest.mark.parametrize("make, reason", [
    (lambda tmp: Path("/proc/forbidden/outputs"), "cannot be created"),
    (lambda tmp: a_file(tmp / "a-file") / "outputs", "is a file"),
    (lambda tmp: a_file(tmp / "taken"), "a file of that name exists"),
])
def test_output_folder_that_cannot_be_made_is_one_line_before_any_model(tmp_path, make, reason):
    folder = make(tmp_path)
    r = run("inference.py", "--prompt", "a fox runs[1s]", *TINY, "--output_folder", str(folder))
    one_error_line(r, str(folder), reason, "--output_folder")
    assert "random weights" not in r.stderr  # stopped before any model was built


def test_read_only_output_and_log_folders(read_only_folder):
    r = run("inference.py", "--prompt", "a fox runs[1s]", *TINY, "--output_folder", str(read_only_folder / "out"))
    one_error_line(r, str(read_only_folder / "out"), "read-only file system")
    r = run("inference.py", "--live", "--stdin", *TINY, "--output_folder", str(read_only_folder), input="a fox\n")
    one_error_line(r, str(read_only_folder), "read-only file system")
    r = run("train.py", *TINY_DMD, "--logdir", str(read_only_folder / "log"))
    one_error_line(r, str(read_only_folder / "log"), "read-only file system", "--logdir")


def test_folders_without_write_permission(unwritable_folder):
    folder, as_nobody = unwritable_folder
    r = run("inference.py", "--prompt", "a fox runs[1s]", *TINY, "--output_folder", str(folder), as_nobody=as_nobody)
    one_error_line(r, str(folder), "permission denied")
    r = run("train.py", *TINY_DMD, "--logdir", str(folder / "log"), as_nobody=as_nobody)
    one_error_line(r, str(folder / "log"), "permission denied")
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("where, err", [("mkdir", errno.EACCES), ("file", errno.EACCES), ("file", errno.ENOSPC),
                                        ("file", errno.EDQUOT)])
def test_folder_check_names_each_reason(tmp_path, monkeypatch, where, err):
    """Fault injection at the calls, for the reasons a test machine cannot produce for real."""
    from utils import fs
    from utils.errors import ConfigError

    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))
    if where == "mkdir":
        monkeypatch.setattr(Path, "mkdir", refuse)
    else:
        monkeypatch.setattr(fs.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(ConfigError) as exc:
        fs.ensure_writable_dir(tmp_path / "out", "the output folder", "pass --output_folder ...")
    assert str(exc.value).startswith(f"cannot write the output folder {tmp_path / 'out'}: {fs._REASONS[err]};")


def test_train_logdir_through_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    r = run("train.py", *TINY_DMD, "--logdir", str(tmp_path / "f" / "log"))
    one_error_line(r, str(tmp_path / "f" / "log"), "is a file")


# ------------------------------------------------------------------- writes that fail part-way
def check_cut_video(folder: Path, r, *fragments):
    line = one_error_line(r, "failed", *fragments)
    videos = list(folder.glob("*.mp4"))
    assert len(videos) == 1 and not list(folder.glob(".*")), sorted(p.name for p in folder.iterdir())
    record = json.loads(videos[0].with_suffix(".json").read_text())
    frames = probe_video(videos[0])["frames"]                      # plays, under its final name
    assert not record["complete"] and record["error"] in line and 0 < frames == record["frames_written"]
    return record


def test_a_file_size_limit_mid_render_keeps_a_playable_prefix(tmp_path):
    r = run("inference.py", "--prompt", "a fox runs[20s] ; run", *TINY, "--output_folder", str(tmp_path),
            limit_bytes=150_000)
    record = check_cut_video(tmp_path, r, "file-size limit")
    assert record["frames_written"] < record["plan"]["total_frames"] == 320


def test_a_file_size_limit_mid_live_session_keeps_a_playable_prefix(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))
    proc = subprocess.Popen([sys.executable, "inference.py", "--live", "--stdin", *TINY, "--output_folder",
                             str(tmp_path), "live.ahead_blocks=1000"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    proc.stdin.write("a fox runs\n")   # and no stop: the session runs until the file is cut
    proc.stdin.flush()
    out, err = proc.communicate(timeout=300) if proc.wait(300) is not None else ("", "")
    record = check_cut_video(tmp_path, subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert record["live"]["blocks"] >= 1 and record["prompt"].startswith("a fox runs[")


def test_a_file_size_limit_during_the_first_checkpoint_leaves_no_partial(tmp_path):
    r = run("train.py", *TINY_DMD, "--logdir", str(tmp_path), "train.max_iters=1", limit_bytes=100_000)
    one_error_line(r, "saving checkpoint step 1", "file-size limit", "no earlier checkpoint")
    assert list((tmp_path / "checkpoints").iterdir()) == []  # the partial save was removed
    assert (tmp_path / "config.yaml").is_file()


# ------------------------------------------------------------------------ damaged checkpoints
@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("train")
    r = run("train.py", *TINY_DMD, "--logdir", str(logdir), "train.max_iters=3", "train.save_every=1",
            "train.keep_checkpoints=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == ["step_000001", "step_000002",
                                                                          "step_000003"]
    return logdir


def damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst / "checkpoints")
    return dst


def truncate_shard(step: Path) -> None:
    shard = next(step.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def test_resume_skips_damaged_checkpoints_to_the_newest_that_loads(three_checkpoints, tmp_path):
    def damage(root):
        truncate_shard(root / "step_000003")
        (root / "step_000002" / ".metadata").unlink()
        shutil.copytree(root / "step_000001", root / ".tmp_step_000004")  # a save cut by kill -9
        (root / ".tmp_step_000004" / "trainer_state.json").unlink()
    logdir = damaged_copy(three_checkpoints, tmp_path / "log", damage)
    r = run("train.py", *TINY_DMD, "--logdir", str(logdir), "--resume", "train.max_iters=2")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    log = r.stderr
    assert "step_000003: shard __0_0.distcp is truncated" in log and "step_000002: its DCP .metadata is missing" in log
    assert ".tmp_step_000004: an unfinished save" in log
    assert "resumed from" in log and "step_000001 at step 1" in log
    state = json.loads((logdir / "checkpoints" / "step_000002" / "trainer_state.json").read_text())
    assert state["step"] == 2  # the resumed run wrote a whole step 2 again
    assert not (logdir / "checkpoints" / ".tmp_step_000004").exists()


def test_resume_with_every_checkpoint_damaged_stops_with_one_line(three_checkpoints, tmp_path):
    def damage(root):
        for step in root.iterdir():
            truncate_shard(step)
    logdir = damaged_copy(three_checkpoints, tmp_path / "log", damage)
    before = {p: p.read_bytes() for p in (logdir / "checkpoints").rglob("*") if p.is_file()}
    r = run("train.py", *TINY_DMD, "--logdir", str(logdir), "--resume")
    one_error_line(r, "--resume", "no checkpoint", "step_000003", "truncated")
    assert before == {p: p.read_bytes() for p in (logdir / "checkpoints").rglob("*") if p.is_file()}


def test_resume_with_only_an_unfinished_save_does_not_start_over(three_checkpoints, tmp_path):
    def damage(root):
        for step in sorted(root.iterdir())[:-1]:
            shutil.rmtree(step)
        (root / "step_000003").rename(root / ".tmp_step_000003")
    logdir = damaged_copy(three_checkpoints, tmp_path / "log", damage)
    r = run("train.py", *TINY_DMD, "--logdir", str(logdir), "--resume")
    one_error_line(r, "--resume", "unfinished save")


def test_a_checkpoint_that_fails_to_load_falls_back_to_the_one_before(three_checkpoints, tmp_path, monkeypatch):
    """Damage the metadata's check cannot see (a shard of the right size with other bytes): the
    load itself fails, and the one before is loaded."""
    def damage(root):
        shard = next((root / "step_000003").glob("*.distcp"))
        shard.write_bytes(bytes(shard.stat().st_size))
    logdir = damaged_copy(three_checkpoints, tmp_path / "log", damage)
    r = run("train.py", *TINY_DMD, "--logdir", str(logdir), "--resume", "train.max_iters=2")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "step_000003 cannot be loaded" in r.stderr and "step_000002 at step 2" in r.stderr
    model = torch.load(logdir / "checkpoints" / "step_000002" / "model.pt", weights_only=True)
    assert "generator" in model


@pytest.mark.parametrize("change, reason, then_resume", [
    ("model.num_layers=3", "Missing key in checkpoint state_dict", True),
    ("model.num_layers=1", "Unexpected key in checkpoint state_dict", False),
    ("model.ffn_dim=48", "Size mismatch between saved", False)])
def test_resume_with_another_model_config_keeps_the_checkpoints(three_checkpoints, tmp_path, change, reason,
                                                                then_resume):
    """Whole checkpoints that do not fit the config given are not called damaged: the error says
    what differs and names the config they were written with, and that config resumes them
    (resumed once: the refusals differ, the resume after them does not)."""
    logdir = damaged_copy(three_checkpoints, tmp_path / "log", lambda root: None)
    before = {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}
    r = run("train.py", *TINY_DMD, "--logdir", str(logdir), "--resume", change)
    line = one_error_line(r, "--resume", "different model/config", reason, f"--config_path {logdir / 'config.yaml'}")
    assert "delete" not in line and "CheckpointException" not in line
    assert before == {p: p.read_bytes() for p in logdir.rglob("*") if p.is_file()}  # config.yaml too
    if not then_resume:
        return
    r = run("train.py", "--config_path", str(logdir / "config.yaml"), "--disable-wandb", "--logdir", str(logdir),
            "--resume", "train.max_iters=4")
    assert r.returncode == 0 and "step_000003 at step 3" in r.stderr, r.stderr[-3000:]


def test_cut_render_transcript_is_consistent(tmp_path):
    """The plan recorded with a cut render still describes the requested video (for a re-render)."""
    r = run("inference.py", "--prompt", "a[10s] | b[10s#]", *TINY, "--output_folder", str(tmp_path),
            limit_bytes=150_000)
    record = check_cut_video(tmp_path, r)
    plan = plan_prompt(record["prompt"], load_config("configs/tiny.yaml"), 4)
    assert plan.to_json_dict() == record["plan"]


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path):
    """kill -9 while a checkpoint is being written (seen as its .tmp_step_N folder): the complete
    checkpoints are untouched, --resume reports the unfinished save and continues from the newest."""
    proc = subprocess.Popen([sys.executable, "train.py", *TINY_DMD, "--logdir", str(tmp_path), "train.max_iters=200",
                             "train.save_every=1", "train.keep_checkpoints=2"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = tmp_path / "checkpoints"
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if root.is_dir() and any(p.name.startswith(".tmp_step_") for p in os.scandir(root)) \
                    and any(p.name.startswith("step_") for p in os.scandir(root)):
                proc.kill()
                break
            time.sleep(0.0005)
    finally:
        proc.kill()
        proc.wait(30)
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".tmp_step_")]
    if not leftovers:
        pytest.skip("the kill did not land inside a save this time")
    newest = max(p.name for p in root.iterdir() if p.name.startswith("step_"))
    r = run("train.py", *TINY_DMD, "--logdir", str(tmp_path), "--resume", f"train.max_iters={int(newest[5:]) + 1}")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"{leftovers[0]}: an unfinished save" in r.stderr and f"{newest} at step {int(newest[5:])}" in r.stderr
    assert not any(p.name.startswith(".tmp_step_") for p in root.iterdir())

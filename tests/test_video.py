"""utils/video.py: the streaming mp4 writer, its behaviour on errors and interruptions, subtitles."""
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import torch

from utils.errors import UserError
from utils.video import (FONT_PATH, PendingFrames, SubtitleRenderer, Terminated, VideoSizeError, VideoWriter,
                         frames_to_uint8, probe_video, read_video, sigterm_as_interrupt)

REPO_ROOT = Path(__file__).resolve().parent.parent


def gradient_frames(num: int, height: int = 48, width: int = 64) -> np.ndarray:
    """Smooth colour gradients that drift over time (easy for H.264, so read-back is close)."""
    t = np.arange(num)[:, None, None]
    y = np.arange(height)[None, :, None]
    x = np.arange(width)[None, None, :]
    r = 40 + 150 * x / width + 2 * t
    g = 40 + 150 * y / height + t
    b = np.broadcast_to(120 + 60 * np.sin(t / 5.0), r.shape)
    return np.stack(np.broadcast_arrays(r, g, b), axis=-1).clip(0, 255).astype(np.uint8)


def folder_contents(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_bundled_ffmpeg_is_used():
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    if os.environ.get("IMAGEIO_FFMPEG_EXE"):
        pytest.skip("IMAGEIO_FFMPEG_EXE overrides the bundled binary")
    assert Path(exe).resolve().is_relative_to(Path(imageio_ffmpeg.__file__).resolve().parent)


def test_write_probe_and_read_back(tmp_path):
    frames = gradient_frames(37)
    path = tmp_path / "clip.mp4"
    with VideoWriter(path, fps=16, width=64, height=48) as writer:
        writer.write(frames[:9])  # numpy uint8 [T, H, W, 3]
        writer.write(torch.from_numpy(frames[9:]).permute(0, 3, 1, 2).float() / 127.5 - 1)
        assert writer.frames_written == 37
    assert folder_contents(tmp_path) == ["clip.mp4"]
    info = probe_video(path)
    assert info["frames"] == 37
    assert info["fps"] == 16
    assert (info["width"], info["height"]) == (64, 48)
    assert (info["codec"], info["pix_fmt"]) == ("h264", "yuv420p")
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(np.float32) - frames).mean() < 8


def test_frames_to_uint8():
    x = torch.tensor([-1.0, -2.0, 0.0, 1.0, 5.0, 0.5]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    out = frames_to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 6, 3) and out.flags.c_contiguous
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255, 191]
    single = frames_to_uint8(torch.zeros(3, 4, 6, dtype=torch.bfloat16))
    assert single.shape == (1, 4, 6, 3)
    arr = np.zeros((2, 4, 6, 3), np.uint8)
    assert frames_to_uint8(arr) is arr
    with pytest.raises(TypeError):
        frames_to_uint8(np.zeros((2, 4, 6, 3), np.float32))
    with pytest.raises(ValueError):
        frames_to_uint8(torch.zeros(2, 4, 6, 3))


def test_odd_size_is_a_clear_user_error(tmp_path):
    with pytest.raises(VideoSizeError, match="even") as info:
        VideoWriter(tmp_path / "odd.mp4", 16, 65, 48)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    with pytest.raises(VideoSizeError, match="even"):
        VideoWriter(tmp_path / "odd.mp4", 16, 64, 47)
    assert folder_contents(tmp_path) == []


def test_wrong_frame_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="64x48"):
        with VideoWriter(tmp_path / "v.mp4", 16, 64, 48) as writer:
            writer.write(np.zeros((2, 48, 66, 3), np.uint8))
    assert folder_contents(tmp_path) == []


def test_error_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(tmp_path / "v.mp4", 16, 64, 48) as writer:
            writer.write(gradient_frames(5))
            raise RuntimeError("boom")
    assert folder_contents(tmp_path) == []


def test_zero_frames_leaves_no_file(tmp_path):
    with VideoWriter(tmp_path / "v.mp4", 16, 64, 48):
        pass
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "w.mp4", 16, 64, 48):
            raise KeyboardInterrupt
    assert folder_contents(tmp_path) == []


def test_keyboard_interrupt_keeps_a_playable_file(tmp_path):
    path = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, 16, 64, 48) as writer:
            for block in np.split(gradient_frames(20), 5):
                writer.write(block)
                if writer.frames_written == 12:
                    raise KeyboardInterrupt
    assert folder_contents(tmp_path) == ["v.mp4"]
    assert probe_video(path)["frames"] == 12


@pytest.fixture
def sigint_raises():
    """Ctrl-C raises KeyboardInterrupt here even when the runner was started with SIGINT ignored
    (a background job of a non-interactive shell is)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_a_write_is_held_until_the_frames_are_piped(tmp_path, monkeypatch, sigint_raises):
    """imageio-ffmpeg kills ffmpeg (no mp4 index) if an interrupt lands inside its generator, so
    the writer holds SIGINT while piping: the interrupt surfaces after write() and the file keeps
    every frame."""
    real_write_frames = imageio_ffmpeg.write_frames

    class InterruptOnThirdFrame:
        def __init__(self, *args, **kwargs):
            self.encoder, self.sent = real_write_frames(*args, **kwargs), 0

        def send(self, frame):
            if frame is not None:
                self.sent += 1
                if self.sent == 3:
                    os.kill(os.getpid(), signal.SIGINT)
            return self.encoder.send(frame)

        def close(self):
            self.encoder.close()

    monkeypatch.setattr(imageio_ffmpeg, "write_frames", InterruptOnThirdFrame)
    path = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, 16, 64, 48) as writer:
            try:
                writer.write(gradient_frames(10))
            finally:
                assert writer.frames_written == 10
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert probe_video(path)["frames"] == 10


def test_sigterm_as_interrupt_restores_the_previous_handler():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous


CHILD = textwrap.dedent("""
    import logging, sys, time
    import numpy as np
    from utils.video import Terminated, VideoWriter, sigterm_as_interrupt

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    log = logging.getLogger("child")
    try:
        with sigterm_as_interrupt(), VideoWriter(sys.argv[1], 16, 64, 48) as writer:
            for i in range(2000):
                writer.write(np.full((1, 48, 64, 3), (7 * i) % 256, np.uint8))
                log.info("written %d", writer.frames_written)
                time.sleep(0.01)
    except Terminated:
        log.info("terminated after %d", writer.frames_written)
        sys.exit(143)
""")


def test_sigterm_keeps_a_playable_file(tmp_path):
    path = tmp_path / "v.mp4"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in child.stdout:
            if line.strip() == "written 8":
                break
        else:
            pytest.fail(f"child ended early: {child.stderr.read()}")
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert child.returncode == 143, err
    last = out.strip().splitlines()[-1]
    assert last.startswith("terminated after "), out
    written = int(last.split()[-1])
    assert written >= 8
    assert folder_contents(tmp_path) == ["v.mp4"]
    assert probe_video(path)["frames"] == written


def noise_frames(num: int, height: int = 64, width: int = 96) -> np.ndarray:
    """Random frames: large to encode, so each second's fragment is tens of kilobytes."""
    return np.random.default_rng(0).integers(0, 256, (num, height, width, 3), dtype=np.uint8)


def fragments_of(path: Path) -> list[tuple[bytes, int, int]]:
    """Top-level MP4 boxes (kind, offset, length), read independently of utils.video."""
    data, boxes, end = path.read_bytes(), [], 0
    while end + 8 <= len(data):
        length = int.from_bytes(data[end:end + 4], "big")
        boxes.append((data[end + 4:end + 8], end, length))
        end += length
    return boxes


def test_whole_fragments_of_a_file_cut_anywhere(tmp_path):
    """The box walk that decides what of a cut file plays: every frame of a whole file; of a
    file cut at any byte, the fragments before the cut and the frames in them (ffmpeg agrees)."""
    from utils.video import _whole_fragments

    path = tmp_path / "v.mp4"
    with VideoWriter(path, fps=16, width=96, height=64) as writer:
        writer.write(noise_frames(40))  # 2.5 s: fragments of 16, 16 and 8 frames
    assert _whole_fragments(path) == (path.stat().st_size, 40)
    moofs = [offset for kind, offset, _ in fragments_of(path) if kind == b"moof"]
    assert len(moofs) == 3
    data = path.read_bytes()
    cut = tmp_path / "cut.mp4"
    for at, frames in ((moofs[0] + 100, 0), (moofs[1], 16), (moofs[1] + 5000, 16), (moofs[2] + 300, 32),
                       (len(data) - 1, 40)):
        cut.write_bytes(data[:at])
        good, counted = _whole_fragments(cut)
        assert counted == frames and good <= at, (at, good, counted)
        if frames:
            cut.write_bytes(data[:good])
            assert probe_video(cut)["frames"] == frames
    # an MP4 that is not fragmented (no mvex in its moov: an ffmpeg that ignored the flags) cannot
    # be counted this way: whole, frames unknown, so closing it is not taken for a failure
    plain = tmp_path / "plain.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-c", "copy", str(plain)],
                   check=True)
    assert _whole_fragments(plain) == (plain.stat().st_size, None)
    cut.write_bytes(data[:[offset for kind, offset, _ in fragments_of(path) if kind == b"moov"][0]])  # ftyp alone
    assert _whole_fragments(cut) == (cut.stat().st_size, 0)  # nothing plays: not taken for whole


FINAL_FLUSH = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from utils.video import VideoWriteError, VideoWriter

    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    writer = VideoWriter(sys.argv[1], 16, 96, 64)
    writer.write(np.random.default_rng(0).integers(0, 256, (40, 64, 96, 3), dtype=np.uint8))
    try:
        writer.close()
    except VideoWriteError as exc:
        print(f"{exc.frames_kept} | {exc}")
        sys.exit(2)
""")


def test_a_write_that_fails_at_close_is_reported_and_trimmed(tmp_path):
    """ffmpeg writes the last fragment only at close; a file-size limit inside it (a disk that
    fills at the very end) kills ffmpeg there, and imageio-ffmpeg does not report its exit
    status. The writer notices from the file itself: VideoWriteError, the whole fragments kept
    under the final name (playable), nothing partial left."""
    reference = tmp_path / "reference" / "v.mp4"
    with VideoWriter(reference, fps=16, width=96, height=64) as writer:
        writer.write(noise_frames(40))
    last = [offset for kind, offset, _ in fragments_of(reference) if kind == b"moof"][-1]
    path = tmp_path / "cut" / "v.mp4"
    child = subprocess.run([sys.executable, "-c", FINAL_FLUSH, str(path), str(last + 1000)], cwd=REPO_ROOT,
                           env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == 2, child.stderr
    kept, message = child.stdout.strip().split(" | ", 1)
    assert kept == "32" and "32 whole frames of the 40 sent" in message, message
    assert folder_contents(path.parent) == ["v.mp4"] and path.stat().st_size == last
    assert probe_video(path)["frames"] == 32


# ---------------------------------------------------------------------------------- subtitles


def test_font_is_bundled():
    assert FONT_PATH.is_file() and FONT_PATH.parent == REPO_ROOT / "utils" / "fonts"
    assert (FONT_PATH.parent / "LICENSE-DejaVu.txt").is_file()


def test_characters_the_font_lacks_are_named_once(caplog):
    """DejaVu has Latin, Greek and Cyrillic, not CJK or emoji: those draw as its missing-glyph box,
    and the subtitle is warned about once (each distinct text is rendered once)."""
    renderer = SubtitleRenderer(160, 120)
    assert renderer.missing("café Ωμέγα жар — 1/2 ∞") == ""
    assert renderer.missing("狐狸 runs 🦊 狐") == "狐狸🦊"
    box = renderer.overlay("\U0010FFFF")
    assert np.array_equal(renderer.overlay("狐").alpha, box.alpha)  # what the warning is about
    with caplog.at_level(logging.WARNING, logger="utils.video"):
        frames = np.full((2, 120, 160, 3), 128, np.uint8)
        for _ in range(3):
            renderer.render(frames, "the fox 狐狸")
        renderer.render(frames, "no box here")
    warned = [r.getMessage() for r in caplog.records if "no glyph" in r.getMessage()]
    assert not any("no box here" in w for w in warned)
    warned = [w for w in warned if "the fox" in w]
    assert len(warned) == 1 and "'狐狸'" in warned[0] and "subtitle_font" in warned[0]


def test_subtitle_font_is_a_font_file_or_one_clear_error(tmp_path):
    same = SubtitleRenderer(160, 120, font_path=str(FONT_PATH))
    assert np.array_equal(same.overlay("a fox").alpha, SubtitleRenderer(160, 120).overlay("a fox").alpha)
    (tmp_path / "notes.ttf").write_text("not a font")
    for path, what in ((tmp_path / "missing.ttf", "does not exist"), (tmp_path, "is a folder"),
                       (tmp_path / "notes.ttf", "cannot be loaded as a font")):
        with pytest.raises(UserError, match=what) as err:
            SubtitleRenderer(160, 120, font_path=path)
        assert "\n" not in str(err.value) and "subtitle_font" in str(err.value)


def test_subtitle_only_touches_the_bottom():
    height, width = 120, 160
    frames = np.full((4, height, width, 3), 128, np.uint8)
    renderer = SubtitleRenderer(width, height)
    out = renderer.render(frames, "a fox runs")
    assert out.shape == frames.shape and out.dtype == np.uint8
    changed_rows = np.nonzero((out != frames).any(axis=(0, 2, 3)))[0]
    assert len(changed_rows) > 0
    assert changed_rows.min() >= height // 2  # the top half is untouched
    assert changed_rows.max() < height
    bottom = out[:, height // 2:]
    assert (bottom >= 250).all(axis=-1).any() and (bottom <= 5).all(axis=-1).any()  # white + black outline
    assert np.array_equal(out[0], out[3])  # same subtitle on every frame


def test_empty_subtitle_leaves_frames_unchanged():
    frames = gradient_frames(2)
    renderer = SubtitleRenderer(64, 48)
    for text in (None, "", "   "):
        assert renderer.render(frames, text) is frames


def test_long_subtitle_wraps_within_the_frame():
    width, height = 160, 120
    renderer = SubtitleRenderer(width, height)
    short = renderer.overlay("run")
    long_text = "the fox jumps over the lazy dog and keeps running into the night " * 2
    long = renderer.overlay(long_text)
    assert len(short.lines) == 1 and len(long.lines) > 2
    assert long.height > short.height
    assert " ".join(long.lines) == " ".join(long_text.split())
    assert all(renderer.text_width(line) <= renderer.max_text_width for line in long.lines)
    margin = renderer.margin_x
    assert long.alpha[:, :margin].max() == 0 and long.alpha[:, width - margin:].max() == 0
    assert renderer.overlay(long_text) is long  # cached per text

    unbroken = renderer.overlay("x" * 200)  # a single word wider than the frame is split
    assert len(unbroken.lines) > 1 and "".join(unbroken.lines) == "x" * 200
    assert unbroken.alpha[:, :margin].max() == 0 and unbroken.alpha[:, width - margin:].max() == 0


def test_subtitled_frames_survive_encoding(tmp_path):
    renderer = SubtitleRenderer(64, 48)
    assert renderer.font_size == 10  # height / 18 would be under the 10 px minimum
    frames = np.full((6, 48, 64, 3), 90, np.uint8)
    path = tmp_path / "s.mp4"
    with VideoWriter(path, 16, 64, 48) as writer:
        writer.write(frames[:3])
        writer.write(renderer.render(frames[3:], "hi"))
    back = read_video(path).astype(np.float32)
    bottom = slice(renderer.overlay("hi").top, 48)
    assert np.abs(back[:3] - 90).max() < 4
    assert np.abs(back[3:, bottom] - 90).max() > 100
    assert np.abs(back[3:, :20] - 90).max() < 4


def test_background_writer_writes_the_same_video(tmp_path):
    """The writer thread is a fast path: the file is identical to the one written in line."""
    frames = gradient_frames(50)
    for name, background in (("sync.mp4", False), ("thread.mp4", True)):
        with VideoWriter(tmp_path / name, 16, 64, 48, background=background) as writer:
            for block in np.array_split(frames, 7):
                writer.write(block)
        assert writer.frames_written == 50
    assert np.array_equal(read_video(tmp_path / "sync.mp4"), read_video(tmp_path / "thread.mp4"))
    assert folder_contents(tmp_path) == ["sync.mp4", "thread.mp4"]


class HookedEncoder:
    """imageio-ffmpeg's frame writer with ``hook(frame)`` called before each frame is sent."""

    def __init__(self, inner, hook):
        self.inner, self.hook = inner, hook

    def send(self, frame):
        if frame is not None:
            self.hook(frame)
        return self.inner.send(frame)

    def close(self):
        self.inner.close()


def hook_encoder(monkeypatch, hook):
    real = imageio_ffmpeg.write_frames
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", lambda *a, **k: HookedEncoder(real(*a, **k), hook))


def test_background_writer_keeps_interrupted_and_bounds_its_queue(tmp_path, monkeypatch):
    """Ctrl-C: every frame handed over is piped before the file is closed. A slow ffmpeg makes
    write() wait once `queue_writes` writes are pending (memory stays bounded)."""
    import threading
    import time

    gate = threading.Event()
    hook_encoder(monkeypatch, lambda frame: gate.wait())
    path = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(path, 16, 64, 48, background=True, queue_writes=2) as writer:
            blocks = np.split(gradient_frames(24), 6)
            for block in blocks[:3]:  # the sender holds one, two wait in the queue
                writer.write(block)
            waiting = threading.Thread(target=writer.write, args=(blocks[3],))
            waiting.start()
            time.sleep(0.3)
            assert waiting.is_alive()  # the queue is full: the caller waits
            gate.set()
            waiting.join(10)
            raise KeyboardInterrupt
    assert probe_video(path)["frames"] == 16


def test_background_writer_reports_a_failed_write_at_the_next_call(tmp_path, monkeypatch):
    from utils.video import VideoWriteError

    sent = []

    def fail_after_20(frame):
        if len(sent) == 20:
            raise OSError(28, "No space left on device")
        sent.append(1)
    hook_encoder(monkeypatch, fail_after_20)
    path = tmp_path / "v.mp4"
    with pytest.raises(VideoWriteError) as exc:
        with VideoWriter(path, 16, 64, 48, background=True) as writer:
            for block in np.split(gradient_frames(48), 4):
                writer.write(block)
    assert "failed after 20 frames" in str(exc.value) and "\n" not in str(exc.value)
    kept = exc.value.frames_kept
    assert (probe_video(path)["frames"] == kept) if kept else not path.exists()
    assert not list(tmp_path.glob(".*"))


def test_background_writer_raises_a_bug_in_the_callers_thread(tmp_path, monkeypatch):
    def bug(frame):
        raise ZeroDivisionError("a bug")
    hook_encoder(monkeypatch, bug)
    with pytest.raises(ZeroDivisionError):
        with VideoWriter(tmp_path / "v.mp4", 16, 64, 48, background=True) as writer:
            for block in np.split(gradient_frames(12), 3):
                writer.write(block)
    assert folder_contents(tmp_path) == []


# ------------------------------------------------------------------ frames finished off the critical path
def float_frames(num: int, seed: int = 0) -> torch.Tensor:
    """Decoder-like float frames [T, 3, 48, 64] in [-1, 1] (with values outside, clamped)."""
    return torch.randn(num, 3, 48, 64, generator=torch.Generator().manual_seed(seed)) * 0.7


def test_pending_frames_equal_the_in_line_path():
    """PendingFrames does what the render loop did in line: uint8, lead frames first, trim,
    subtitle; its length is known before any of it runs, and the host work runs once."""
    lead = frames_to_uint8(float_frames(1, seed=1))
    renderer = SubtitleRenderer(64, 48)
    calls = []

    def finish(arr):
        calls.append(len(arr))
        return renderer.render(arr, "hello")

    x = float_frames(12)
    pending = PendingFrames(x, lead=lead, stop=10, finish=finish)
    assert len(pending) == 10 and pending.shape == (10, 48, 64, 3) and not calls
    want = renderer.render(np.concatenate([lead, frames_to_uint8(x)])[:10], "hello")
    assert np.array_equal(pending.numpy(), want) and np.array_equal(np.asarray(pending), want)
    assert calls == [10]  # once, however often it is read
    assert np.array_equal(frames_to_uint8(PendingFrames(x)), frames_to_uint8(x))
    assert len(PendingFrames(x, stop=0)) == 0 and PendingFrames(x, stop=0).numpy().shape == (0, 48, 64, 3)


def test_background_writer_finishes_pending_frames_in_its_thread(tmp_path):
    """A batch render hands PendingFrames over: the subtitle is burned in by the writer's thread,
    not the caller's, and the file equals the one written from finished arrays in line."""
    import threading

    renderer = SubtitleRenderer(64, 48)
    threads = []

    def finish(arr):
        threads.append(threading.current_thread().name)
        return renderer.render(arr, "a subtitle")

    blocks = [float_frames(n, seed=n) for n in (9, 12, 12, 7)]
    with VideoWriter(tmp_path / "inline.mp4", 16, 64, 48) as writer:
        for x in blocks:
            writer.write(renderer.render(frames_to_uint8(x), "a subtitle"))
    with VideoWriter(tmp_path / "thread.mp4", 16, 64, 48, background=True) as writer:
        for x in blocks:
            writer.write(PendingFrames(x, finish=finish))
    assert writer.frames_written == 40
    assert set(threads) == {"video-writer"}
    assert np.array_equal(read_video(tmp_path / "inline.mp4"), read_video(tmp_path / "thread.mp4"))


def test_a_failing_subtitle_in_the_writer_thread_reaches_the_caller(tmp_path):
    def finish(arr):
        raise ZeroDivisionError("a bug in the subtitle")
    with pytest.raises(ZeroDivisionError):
        with VideoWriter(tmp_path / "v.mp4", 16, 64, 48, background=True) as writer:
            for _ in range(3):
                writer.write(PendingFrames(float_frames(4), finish=finish))
    assert folder_contents(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pending_frames_from_the_gpu_equal_the_cpu_conversion():
    """On a GPU the conversion and the copy into pinned memory are queued without waiting; the
    frames read later (after more GPU work was queued) equal the CPU conversion."""
    x = float_frames(12)
    pending = PendingFrames(x.cuda())
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(10):
        busy = busy @ busy.T / 4096  # more work on the stream after the copy
    assert np.array_equal(pending.numpy(), frames_to_uint8(x))


def test_an_output_folder_removed_while_writing_is_a_one_line_error(tmp_path):
    import shutil

    from utils.video import VideoWriteError

    folder = tmp_path / "out"
    writer = VideoWriter(folder / "v.mp4", 16, 64, 48)
    writer.write(gradient_frames(20))
    shutil.rmtree(folder)  # ffmpeg goes on writing a file that no longer has a name
    with pytest.raises(VideoWriteError, match="is gone after 20 frames were sent") as err:
        writer.close()
    assert err.value.frames_kept == 0 and "\n" not in str(err.value)


def test_a_finished_video_that_cannot_be_renamed_is_kept_and_named(tmp_path, monkeypatch):
    """A folder made read-only during the render: the finished file stays under its hidden
    name, and the one-line error says where."""
    from utils.video import VideoWriteError, partial_name

    path = tmp_path / "v.mp4"
    writer = VideoWriter(path, 16, 64, 48)
    writer.write(gradient_frames(20))

    def refuse(src, dst):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(VideoWriteError, match=f"permission denied.*its 20 frames are kept in "
                                              f"{partial_name(path)}") as err:
        writer.close()
    monkeypatch.undo()
    assert err.value.frames_kept == 20 and probe_video(partial_name(path))["frames"] == 20

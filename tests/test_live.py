"""Live action control through the Python API and the terminal (configs/tiny.yaml, CPU): actions
land on the next block boundary, the transcript replays bit for bit, memory stays flat, pacing
holds generation to playback, and a piped terminal session is recorded and replayable."""
import io
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.generate import VideoGenerator, build_models, write_sidecar
from pipeline.grammar import parse, render
from pipeline.live import LiveError, LiveSession, PlaybackClock, paced, transcript_script
from pipeline.live_terminal import parse_line, run_terminal
from pipeline.plan import plan_prompt
from tests.test_rollout import live_tensor_bytes
from utils.config import load_config
from utils.video import probe_video, read_video

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models():
    return build_models(load_config("configs/tiny.yaml"))


@pytest.fixture
def gen(models):
    return VideoGenerator(load_config("configs/tiny.yaml"), models)


def steer_at(session, schedule):
    """Iterate ``session``, calling ``schedule[block index](session)`` after that block; returns
    the latents of every block."""
    latents = []
    for block in session:
        latents.append(block.latents.clone())
        if block.index in schedule:
            schedule[block.index](session)
    return latents


def capture_render(gen, monkeypatch):
    """Latents of every block the batch path (VideoGenerator.generate) renders."""
    seen, render = [], gen.render

    def spy(*args, **kw):
        for block in render(*args, **kw):
            seen.append(block.latents.clone())
            yield block
    monkeypatch.setattr(gen, "render", spy)
    return seen


def test_actions_land_on_the_next_block_and_the_transcript_replays_bit_for_bit(gen, tmp_path, monkeypatch):
    session = LiveSession(gen, "a fox | runs [fast]", seed=7, subtitle="run", output_folder=tmp_path)
    live = steer_at(session, {
        1: lambda s: (s.next_action("the fox jumps"), s.next_action("the fox lands ; softly")),
        4: lambda s: s.new_scene("a harbour at dawn", subtitle="the harbour"),
        6: lambda s: s.stop(),
    })
    assert len(live) == 7 and session.complete and session.finished
    # two actions sent together land on successive blocks, in order; a scene cut on the next one
    assert [(a.kind, a.block) for a in session.segments] == [("start", 0), ("flush", 2), ("flush", 3), ("cut", 5)]
    assert all(a.landed >= a.submitted for a in session.segments)
    assert session.transcript == ("a fox \\| runs \\[fast\\][1.3125s] | the fox jumps[0.75s] | "
                                  "the fox lands \\; softly[1.5s] | a harbour at dawn[1.5s#] ; run |  |  | the harbour")

    record = json.loads(session.path.with_suffix(".json").read_text())
    assert record["prompt"] == session.transcript and record["seed"] == 7 and record["complete"]
    assert record["frames_written"] == session.frames_written == probe_video(session.path)["frames"]
    assert [a["block"] for a in record["live"]["actions"]] == [0, 2, 3, 5]
    plan = plan_prompt(session.transcript, gen.cfg, gen.m.vae.temporal_factor)
    assert [(s.first_block, s.event) for s in plan.segments] == [(0, "start"), (2, "flush"), (3, "flush"), (5, "cut")]
    assert plan.total_blocks == 7 and plan.total_frames == session.frames_written

    batch = capture_render(gen, monkeypatch)
    replay = tmp_path / "replay.mp4"
    rec = gen.generate(record["prompt"], replay, seed=record["seed"])
    assert rec["frames_written"] == session.frames_written
    assert len(batch) == len(live) and all(torch.equal(a, b) for a, b in zip(live, batch))
    assert np.array_equal(read_video(session.path), read_video(replay))


def test_image_start_session_replays_with_the_image(gen, tmp_path, monkeypatch):
    from PIL import Image
    Image.fromarray(np.full((64, 96, 3), 200, np.uint8)).save(tmp_path / "start.png")
    session = LiveSession(gen, "a door opens", seed=1, output_folder=tmp_path, image=tmp_path / "start.png")
    live = steer_at(session, {0: lambda s: s.new_scene("a garden"), 2: lambda s: s.stop()})
    assert session.transcript == "a door opens[0.8125s] | a garden[1.5s#]"  # 1 + 12 frames, then 2 blocks
    batch = capture_render(gen, monkeypatch)
    rec = gen.generate(session.transcript, tmp_path / "replay.mp4", seed=1, image=tmp_path / "start.png")
    assert rec["frames_written"] == session.frames_written == 37
    assert all(torch.equal(a, b) for a, b in zip(live, batch))


@settings(max_examples=200, deadline=None)
@given(fps=st.sampled_from([16, 24, 30, 12.5, 15, 8]), fpb=st.integers(1, 4), lead=st.integers(0, 1),
       gaps=st.lists(st.integers(1, 40), min_size=1, max_size=8), cuts=st.lists(st.booleans(), min_size=8, max_size=8))
def test_transcript_plans_to_the_same_blocks(fps, fpb, lead, gaps, cuts):
    firsts = [sum(gaps[:k]) for k in range(len(gaps))]
    blocks = sum(gaps)
    segments = [(f"action {k}", None, cuts[k], first) for k, first in enumerate(firsts)]
    script = transcript_script(segments, blocks, fps=fps, frames_per_block=fpb, temporal_factor=4, lead_frames=lead)
    prompt = render(script)
    assert parse(prompt, 5.0) == script  # what a live sidecar's plan is made from (no parse per block)
    cfg = load_config(None, [f"fps={fps}", f"num_frame_per_block={fpb}", f"local_attn_size={fpb + 3}",
                             "flush_keep=0"])
    plan = plan_prompt(prompt, cfg, 4, image_start=bool(lead))
    assert [s.first_block for s in plan.segments] == firsts
    assert [s.event for s in plan.segments][1:] == ["cut" if c else "flush" for c in cuts[1:len(gaps)]]
    assert plan.total_blocks == blocks and plan.total_frames == plan.frames_after(blocks)


def test_bad_actions_are_refused_and_the_session_goes_on(gen, tmp_path, caplog):
    with pytest.raises(LiveError, match="empty"):
        LiveSession(gen, "   ", seed=0, output_folder=tmp_path)
    session = LiveSession(gen, "a fox runs", seed=0, output_folder=tmp_path)
    errors = []

    def bad(s):
        for call in (lambda: s.next_action(""), lambda: s.new_scene("\n\t")):
            with pytest.raises(LiveError) as exc:
                call()
            errors.append(str(exc.value))
        long = s.next_action("word " * 200)  # tiny text_len is 64 tokens: truncated, with a warning
        assert long.warning and "64" in long.warning
        s.stop()
    steer_at(session, {0: bad})
    assert len(errors) == 2 and all("empty" in e for e in errors)
    assert [a.kind for a in session.segments] == ["start"]  # stopped before the long one landed
    with pytest.raises(LiveError, match="stopped"):
        session.next_action("after the end")
    assert "was not generated" in caplog.text
    with pytest.raises(RuntimeError, match="once"):
        next(iter(session))


@pytest.mark.parametrize("text, subtitle", [("caf\udce9", None), ("a fox", "\ud800 run")])
def test_text_that_is_not_utf8_is_refused_in_one_line(gen, tmp_path, text, subtitle):
    """Lone surrogates (undecodable stdin, a page's split emoji): refused, for the first action and later ones."""
    with pytest.raises(LiveError, match="not valid text"):
        LiveSession(gen, text, seed=0, subtitle=subtitle, output_folder=tmp_path)
    session = LiveSession(gen, "a fox runs", seed=0, output_folder=tmp_path)
    for steer in (session.next_action, session.new_scene):
        with pytest.raises(LiveError, match="not valid text") as exc:
            steer(text, subtitle)
        assert "\n" not in str(exc.value)
    session.stop()
    assert list(session) == [] and session.pending == []


def test_a_record_that_cannot_be_written_still_frees_the_generator(gen, tmp_path, caplog):
    """The final sidecar write fails with something other than an OSError: logged in one line, no
    temporary file left, and the generator is free for the next session."""
    session = LiveSession(gen, "a fox runs", seed=0, output_folder=tmp_path)
    blocks = iter(session)
    next(blocks)
    session.segments[0].subtitle = "caf\udce9"  # past _make_action's check, as a bug would let it through
    session.stop()
    assert list(blocks) == []
    assert session.finished and not gen.lock.locked()
    assert [r.getMessage() for r in caplog.records if "cannot write the record" in r.getMessage()]
    assert sorted(p.name for p in tmp_path.iterdir()) == [session.path.with_suffix(".json").name, session.path.name]
    second = LiveSession(gen, "a harbour", seed=0, output_folder=tmp_path, index=1)
    steer_at(second, {0: lambda s: s.stop()})
    assert second.complete and second.blocks_done == 1


def test_a_sidecar_that_cannot_be_serialised_leaves_no_file(tmp_path):
    for record, error in (({"prompt": "caf\udce9"}, UnicodeEncodeError), ({"seed": object()}, TypeError)):
        with pytest.raises(error):
            write_sidecar(tmp_path / "v.mp4", record)
    assert list(tmp_path.iterdir()) == []


def test_stop_before_the_first_block_leaves_nothing(gen, tmp_path):
    session = LiveSession(gen, "a fox runs", seed=0, output_folder=tmp_path)
    session.stop()
    assert list(session) == [] and session.transcript == ""
    assert list(tmp_path.iterdir()) == []


def test_one_session_per_generator(gen, tmp_path):
    first = LiveSession(gen, "a", seed=0, output_folder=tmp_path)
    blocks = iter(first)
    next(blocks)
    with pytest.raises(LiveError, match="another session"):
        next(iter(LiveSession(gen, "b", seed=0, output_folder=tmp_path)))
    first.stop()
    list(blocks)


def test_memory_is_flat_over_a_long_session(gen, tmp_path, monkeypatch):
    # the generator keeps the embeddings of its last TEXTS_KEPT texts (64: 256 MiB of host memory at
    # full size, then flat); 2 here, so that it is full before the first mark
    monkeypatch.setattr(gen, "TEXTS_KEPT", 2)
    session = LiveSession(gen, "a long walk", seed=0, output_folder=tmp_path)
    marks = {}

    def each(block):
        if block.index % 6 == 3:  # a new action every 6 blocks (its embedding replaces the last), every other a cut
            (session.new_scene if block.index % 12 == 3 else session.next_action)(f"walk {block.index}")
        if block.index in (12, 48):  # both 3 blocks after an action
            marks[block.index] = live_tensor_bytes()
        if block.index == 50:
            session.stop()
    for block in session:
        each(block)
    assert len(session.segments) == 9
    assert marks[48] <= marks[12] * 1.01, marks
    assert len(gen._kept) == 2
    assert sum(a.context is not None for a in session.segments) == 0  # all freed at the end


def test_a_queue_of_actions_holds_text_only_and_each_lands_with_its_embedding(gen, tmp_path, monkeypatch):
    """Actions sent faster than blocks (a script piped in at once) wait as text: the first few are
    encoded as they are sent (so they land with a copy), the rest as they land; memory does not
    grow with the queue, and each action lands with its own text's embedding."""
    monkeypatch.setattr(gen, "TEXTS_KEPT", 4)
    encoded = []
    encoder = gen.m.text_encoder
    monkeypatch.setattr(gen.m, "text_encoder", _CountingEncoder(encoder, encoded))
    session = LiveSession(gen, "walk 0", seed=0, output_folder=tmp_path)
    for k in range(1, 12):
        session.next_action(f"walk {k}")
    assert all(a.context is None for a in session.pending) and len(gen._kept) <= 4
    assert encoded == [f"walk {k}" for k in range(2)]  # queued behind fewer than TEXTS_KEPT // 2
    contexts = {}
    for block in session:
        contexts[block.action.text] = block.action.context.clone()
        if block.index == 12:
            session.stop()
    assert [(a.text, a.block) for a in session.segments] == [(f"walk {k}", k) for k in range(12)]
    assert encoded == [f"walk {k}" for k in range(12)]  # every text encoded once
    for k in range(12):
        assert torch.equal(contexts[f"walk {k}"], encoder([f"walk {k}"]))


class _CountingEncoder:
    """The text encoder, recording the texts it encodes."""

    def __init__(self, encoder, log):
        self.encoder, self.log = encoder, log

    def __call__(self, texts):
        self.log.extend(texts)
        return self.encoder(texts)

    def __getattr__(self, name):
        return getattr(self.encoder, name)


def test_ctrl_c_while_a_block_is_written_counts_that_block_in_the_sidecar(gen, tmp_path, monkeypatch):
    """SIGINT that lands while a block's frames are piped is held until they are sent (the
    video keeps them) and surfaces before the block reaches the session's loop: the sidecar still
    counts that block, and its transcript plans to exactly the frames in the video."""
    import os
    import signal

    from utils.video import VideoWriter

    send, calls = VideoWriter._send, []

    def interrupt_third_block(self, arr):
        calls.append(len(arr))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return send(self, arr)
    monkeypatch.setattr(VideoWriter, "_send", interrupt_third_block)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        session = LiveSession(gen, "a fox runs", seed=0, output_folder=tmp_path)
        with pytest.raises(KeyboardInterrupt):
            for _ in session:
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
    record = json.loads(session.path.with_suffix(".json").read_text())
    frames = probe_video(session.path)["frames"]
    assert frames == sum(calls) == record["frames_written"] and record["live"]["blocks"] == 3
    assert not record["complete"]
    assert plan_prompt(record["prompt"], gen.cfg, gen.m.vae.temporal_factor).total_frames == frames


def test_a_long_sessions_sidecar_is_rewritten_within_its_share_of_the_time(gen, tmp_path, monkeypatch):
    """The record grows with the actions; rewriting it after every block would cost a long
    session more than a block's time. It is rewritten after each block while that is quick,
    else no more often than keeps it to RECORD_SHARE of the time; the last record is complete."""
    clock = [0.0]
    monkeypatch.setattr("pipeline.live.time.perf_counter", lambda: clock[0])
    writes = []

    def slow_write(video, record):  # each write takes 1 s of the fake clock
        writes.append(record["live"]["blocks"])
        clock[0] += 1.0
        write_sidecar(video, record)
    monkeypatch.setattr("pipeline.live.write_sidecar", slow_write)
    session = LiveSession(gen, "a fox runs", seed=0, output_folder=tmp_path)
    for block in session:
        clock[0] += 10.0  # each block takes 10 s: with writes of 1 s, one write per 50 s (5 blocks)
        if block.index == 11:
            session.stop()
    assert writes[:-1] == [1, 6, 11] and writes[-1] == 12
    record = json.loads(session.path.with_suffix(".json").read_text())
    assert record["complete"] and record["live"]["blocks"] == 12


def test_the_record_plans_what_its_prompt_parses_to(gen, tmp_path):
    """The sidecar's plan is made from the segments the transcript is rendered from (no parse
    per block): the same as planning the prompt it records."""
    session = LiveSession(gen, "a fox ; run", seed=0, output_folder=tmp_path)
    steer_at(session, {1: lambda s: s.new_scene("a \\ harbour | dawn [x]", subtitle="the ; harbour"),
                       3: lambda s: s.next_action("   the  sea  "), 4: lambda s: s.stop()})
    record = session.record()
    assert record["plan"] == gen.plan(record["prompt"]).to_json_dict()


def test_playback_clock_advances_in_real_time_and_stalls_when_starved():
    now = [0.0]
    clock = PlaybackClock(16, now=lambda: now[0])
    clock.add(12)
    now[0] = 0.5
    assert clock.played == 8 and clock.buffered == 4
    now[0] = 2.0
    assert clock.played == 12  # starved: playback waits for frames
    clock.add(12)
    now[0] = 2.25
    assert clock.played == 16
    clock.pause()
    now[0] = 10
    assert clock.played == 16 and clock.buffered == 8
    clock.resume()
    now[0] = 10.25
    assert clock.played == 20


def test_paced_generation_stays_within_the_lead(gen, tmp_path):
    """With ahead_blocks 1, a block starts only once less than one block waits to be played:
    generation follows real time (0.75 s per block of the tiny config), not the CPU's speed."""
    session = LiveSession(gen, "a fox runs", seed=0, output_folder=tmp_path)
    clock = PlaybackClock(float(gen.cfg.fps))
    per_block = 12 / 16
    start, leads = time.monotonic(), []
    for block in paced(session, clock, ahead_blocks=1):
        leads.append(clock.buffered)
        if block.index == 5:
            session.stop()
    elapsed = time.monotonic() - start
    assert max(leads) <= 2 * 12 + 1e-6  # at most the block in hand and one waiting
    assert elapsed >= 4 * per_block  # five waits of at least (lead - one block) each, minus slack


def test_stop_wakes_a_paused_session(gen, tmp_path):
    session = LiveSession(gen, "a fox runs", seed=0, output_folder=tmp_path)
    clock = PlaybackClock(float(gen.cfg.fps))
    clock.pause()
    done = threading.Event()

    def run():
        for _ in paced(session, clock, ahead_blocks=1):
            pass
        done.set()
    threading.Thread(target=run, daemon=True).start()
    end = time.monotonic() + 60
    while session.blocks_done < 1 and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.5)
    assert not done.is_set() and session.blocks_done == 1  # paused: one block made, then waiting
    session.stop()  # from another thread, and nobody wakes the clock: the paused wait notices it
    assert done.wait(5) and session.finished and session.complete


@pytest.mark.parametrize("line, parsed", [
    ("the fox jumps", ("flush", "the fox jumps", None)),
    ("  # a harbour at dawn ; the harbour ", ("cut", "a harbour at dawn", "the harbour")),
    ("a \\; b ; c", ("flush", "a ; b", "c")),
    ("", None), ("   \n", None),
])
def test_terminal_lines(line, parsed):
    assert parse_line(line) == parsed


def test_terminal_input_that_ends_at_once_generates_every_action_first(gen, tmp_path, caplog):
    """A file of actions (every line there at once, then its end): each action lands, one block
    each, before the end of input stops the session; none is dropped."""
    lines = io.StringIO("a fox runs ; run\n# a harbour at dawn ; harbour\nthe boats rock\n")
    session = run_terminal(gen, lines, ahead_blocks=1000, seed=3, output_folder=tmp_path)
    assert [(a.kind, a.text, a.block) for a in session.segments] == [
        ("start", "a fox runs", 0), ("cut", "a harbour at dawn", 1), ("flush", "the boats rock", 2)]
    assert session.blocks_done == 3 and session.complete
    assert "was not generated" not in caplog.text
    record = json.loads(session.path.with_suffix(".json").read_text())
    assert [a["kind"] for a in record["live"]["actions"]] == ["start", "cut", "flush"]


def run_terminal_within(gen, lines, tmp_path, timeout=60):
    """run_terminal in a thread: fails (instead of hanging) if the session never stops."""
    result = []
    worker = threading.Thread(target=lambda: result.append(
        run_terminal(gen, lines, ahead_blocks=1000, seed=3, output_folder=tmp_path)), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), "the session never stopped"
    return result[0]


def test_terminal_skips_a_line_that_is_not_utf8_and_still_stops(gen, tmp_path, caplog):
    """stdin decoded with surrogateescape (a C locale): the bad line is one error line, the others land."""
    lines = io.TextIOWrapper(io.BytesIO(b"a fox runs\ncaf\xe9 au lait\nthe fox jumps\n"), encoding="utf-8",
                             errors="surrogateescape")
    session = run_terminal_within(gen, lines, tmp_path)
    assert [a.text for a in session.segments] == ["a fox runs", "the fox jumps"] and session.complete
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not valid text" in errors[0], errors


class UndecodableAfter(io.StringIO):
    """Lines, then a line that strict UTF-8 decoding refuses (as sys.stdin raises)."""

    def readline(self, *args):
        line = super().readline(*args)
        if line.startswith("BAD"):
            raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")
        return line


def test_terminal_input_that_cannot_be_decoded_ends_it_in_one_line(gen, tmp_path, caplog, monkeypatch):
    encode = gen.keep_text  # encodes an action when it is sent (the queue is short)
    monkeypatch.setattr(gen, "keep_text", lambda text: encode(text) if text != "boom" else 1 / 0)  # a bug
    lines = UndecodableAfter("a fox runs\nboom\nthe fox jumps\nBAD\nnever read\n")
    session = run_terminal_within(gen, lines, tmp_path)
    assert [a.text for a in session.segments] == ["a fox runs", "the fox jumps"] and session.complete
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and "ZeroDivisionError" in errors[0] and "not UTF-8" in errors[1], errors
    with pytest.raises(LiveError, match="not UTF-8"):  # before the first action: the run ends with one line
        run_terminal(gen, UndecodableAfter("BAD\n"), ahead_blocks=1, seed=0, output_folder=tmp_path)


@pytest.mark.slow
def test_terminal_session_through_a_pipe_is_recorded_and_replays(tmp_path):
    """inference.py --live with a pipe for stdin: actions land on the logged blocks, the sidecar
    transcript re-renders with inference.py --prompt into the same frames."""
    proc = subprocess.Popen([sys.executable, "inference.py", "--live", "--config_path", "configs/tiny.yaml",
                             "--output_folder", str(tmp_path), "--seed", "11"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()

    def wait_for(fragment, timeout=60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = [line for line in lines if fragment in line]
            if found:
                return found[0]
            time.sleep(0.05)
        raise AssertionError(f"{fragment!r} never logged:\n" + "".join(lines[-20:]))

    proc.stdin.write("a fox runs ; run\n")
    proc.stdin.flush()
    wait_for("action 1 start")
    proc.stdin.write("# \nthe fox jumps\n")  # a bare '#' (no text) is refused; the next line is an action
    proc.stdin.flush()
    wait_for("action 2 flush")
    proc.stdin.write("# a harbour at dawn ; harbour\n")
    proc.stdin.flush()
    wait_for("action 3 cut")
    proc.stdin.write("\n")  # stop
    proc.stdin.flush()
    assert proc.wait(60) == 0, "".join(lines)
    reader.join(5)
    log = "".join(lines)
    assert "empty" in log and "Traceback" not in log
    landed = {int(line.split("action ")[1].split()[0]): int(line.split("block ")[1].split(":")[0])
              for line in lines if " landed " in line}
    video = next(tmp_path.glob("*.mp4"))
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["complete"] and record["seed"] == 11
    assert {a["id"]: a["block"] for a in record["live"]["actions"]} == landed
    assert [a["kind"] for a in record["live"]["actions"]] == ["start", "flush", "cut"]
    assert probe_video(video)["frames"] == record["frames_written"] == record["plan"]["total_frames"]

    replay_dir = tmp_path / "replay"
    r = subprocess.run([sys.executable, "inference.py", "--replay", str(video.with_suffix(".json")),
                        "--output_folder", str(replay_dir)],  # the config, seed and prompt from the sidecar
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(read_video(video), read_video(next(replay_dir.glob("*.mp4"))))


def wait_until(predicate, timeout=60, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@pytest.mark.slow
def test_a_killed_session_leaves_a_playable_video_and_its_transcript(tmp_path):
    """SIGKILL in the middle of a live session: the mp4 under its final name plays (ffmpeg
    finishes it when its input closes), holding what the sidecar records (at most one block more),
    and the sidecar's transcript plans to exactly the frames it records."""
    proc = subprocess.Popen([sys.executable, "inference.py", "--live", "--stdin", "--config_path", "configs/tiny.yaml",
                             "--output_folder", str(tmp_path), "live.ahead_blocks=1000"], cwd=REPO,
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    proc.stdin.write("a fox runs\n")
    proc.stdin.flush()
    sidecar = wait_until(lambda: next(tmp_path.glob("*.json"), None), what="the sidecar")
    wait_until(lambda: (read_json(sidecar) or {}).get("live", {}).get("blocks", 0) >= 4, what="4 blocks")
    proc.kill()
    proc.wait(30)
    video = sidecar.with_suffix(".mp4")

    def playable():
        try:
            return probe_video(video)
        except Exception:  # noqa: BLE001 - ffmpeg may still be finishing the file
            return None
    info = wait_until(playable, 30, "a playable video")
    record = read_json(sidecar)
    assert not record["complete"] and not list(tmp_path.glob(".*"))
    assert info["frames"] in (record["frames_written"], record["frames_written"] + 12)
    assert plan_prompt(record["prompt"], load_config("configs/tiny.yaml"), 4).total_frames == record["frames_written"]


def test_a_session_records_a_path_that_is_not_utf8(gen, tmp_path):
    """A start picture whose name holds a Latin-1 byte: the sidecar (rewritten every block) records
    it as \\xe9 instead of failing to write."""
    import os

    from PIL import Image

    image = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")  # as Python hands over such a command-line path
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(image)
    session = LiveSession(gen, "a door opens", seed=0, output_folder=tmp_path, image=image)
    steer_at(session, {1: lambda s: s.stop()})
    record = json.loads(session.path.with_suffix(".json").read_text(encoding="utf-8"))
    assert session.complete and record["image"] == f"{tmp_path}/caf\\xe9.png"

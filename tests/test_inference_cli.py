"""End to end through the CLI on configs/tiny.yaml (random weights, CPU)."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import pytest

from pipeline.generate import VideoGenerator, build_models
from utils.config import load_config
from utils.video import probe_video, read_video

REPO = Path(__file__).resolve().parent.parent
TINY = ["--config_path", "configs/tiny.yaml"]


def cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "inference.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kw)


def dry_plan(prompt, *extra):
    r = cli("--prompt", prompt, "--dry_run", *TINY, *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.slow
def test_video_has_exactly_the_planned_frames(tmp_path):
    prompt = "a fox runs[1.5s] | the fox jumps[1s#] ; run | jump"
    plan = dry_plan(prompt)
    r = subprocess.run(["bash", "inference.sh", prompt, *TINY, "--output_folder", str(tmp_path), "--seed", "5"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    videos = list(tmp_path.glob("*.mp4"))
    assert len(videos) == 1 and not list(tmp_path.glob(".*partial*"))
    info = probe_video(videos[0])
    assert info["frames"] == plan["total_frames"] == round(2.5 * 16)
    assert info["fps"] == 16 and (info["width"], info["height"]) == (96, 64)
    assert info["codec"] == "h264" and info["pix_fmt"] == "yuv420p"
    sidecar = json.loads(videos[0].with_suffix(".json").read_text())
    assert sidecar["plan"] == plan and sidecar["seed"] == 5 and sidecar["complete"]
    assert sidecar["frames_written"] == plan["total_frames"] and sidecar["prompt"] == prompt
    assert sidecar["config"]["sink_size"] == 1


def test_prompt_file_with_a_byte_order_mark_skips_its_comment(tmp_path):
    """Notepad saves UTF-8 with a byte-order mark; the first line is still a comment."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("# my prompts\na fox runs[1s]\n".encode("utf-8-sig"))
    r = cli("--data_path", str(prompts), "--dry_run", *TINY)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["segments"][0]["text"] for line in r.stdout.splitlines()] == ["a fox runs"]


def test_dry_run_json_matches_plan_and_touches_no_model():
    plan = dry_plan("walks[5s] | runs[10s] | new place[10s#] ; a | b | c", "model.num_layers=999")
    assert set(plan) == {"fps", "frames_per_block", "total_blocks", "total_frames", "segments"}
    assert plan["total_frames"] == 400 and [s["event"] for s in plan["segments"]] == ["start", "flush", "cut"]
    assert [s["subtitle"] for s in plan["segments"]] == ["a", "b", "c"]
    frames = [s["frames"] for s in plan["segments"]]
    assert frames[0][0] == 0 and frames[-1][1] == 400
    assert all(a[1] == b[0] for a, b in zip(frames, frames[1:]))


def test_plans_and_prompt_mistakes_are_answered_without_torch(tmp_path):
    """``--dry_run`` and a prompt's mistakes need only the config and the grammar: torch (seconds
    to import) is not loaded for them, with the tiny VAE or a downloaded Wan VAE's config.json."""
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"dim_mult": [1, 2, 4, 4],
                                                              "temperal_downsample": [False, True, True]}))
    code = ("import sys, inference\n"
            "for argv in (['--prompt', 'a[1s] | b[2s#]', '--dry_run', *sys.argv[1:]],\n"
            "             ['--prompt', 'walks[5s', *sys.argv[1:]]):\n"
            "    try:\n"
            "        inference.main(argv)\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 2\n"
            "print('torch' in sys.modules)")
    for args in (TINY, ["random_init=false", f"wan_model_path={tmp_path}"]):
        r = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.splitlines()[-1] == "False", (r.stdout, r.stderr)
        assert "bracket" in r.stderr


@pytest.mark.parametrize("prompt, fragment", [
    ("walks[10m]", "unit"),
    ("walks[5s] | [3s]", "segment 2"),
    ("a[1s] | b[1s] ; only one", "subtitle"),
    ("walks[5s", "bracket"),
])
def test_bad_prompt_exits_2_with_one_line(prompt, fragment):
    r = cli("--prompt", prompt, *TINY)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--prompt", "a[1s]", "--config_path", "configs/tiny.yaml", "sink_sizee=2"], "did you mean 'sink_size'?"),
    (["--prompt", "a[1s]", "--config_path", "configs/tiny.yaml", "model.num_layer=2"], "'model.num_layers'?"),
    (["--prompt", "a[1s]", "--config_path", "configs/tiny.yaml", "fps=abc"], "'fps' in the command-line overrides "
     "must be a finite number, not 'abc'"),
    (["--prompt", "a[1s]", "--config_path", "configs/tiny.yaml", "--seed", str(2**64)], "seed"),
    (["--prompt", "a[1s]", "--config_path", "configs/tiny.yaml", "--checkpoint_path", "mine.pt"],
     "--checkpoint_path mine.pt is not read with random_init=true"),
    (["--prompt", "a[1s]", "--config_path", "configs/nope.yaml"], "configs/nope.yaml"),
    (["--data_path", "does/not/exist.txt", "--config_path", "configs/tiny.yaml"], "does/not/exist.txt"),
    (["--prompt", "a[1s]", "--checkpoint_path", "missing.pt", "device=cpu", "dtype=float32"], "missing.pt"),
])
def test_user_mistakes_exit_2_with_one_line(args, fragment):
    r = cli(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("override, fragment", [
    ("train.lr=abc", "'train.lr' in the command-line overrides must be a finite number, not 'abc'"),
    ("fps=.inf", "'fps' in the command-line overrides must be a finite number, not inf"),
    ("num_frame_per_block=1.5", "'num_frame_per_block' in the command-line overrides must be an integer, not 1.5"),
    ("train.same_step_across_blocks=maybe", "must be true or false, not 'maybe'"),
    ("seed=abc", "'seed' in the command-line overrides must be an integer"),
    ("sink_size=null", "'sink_size' in the command-line overrides must be an integer, not null"),
    ("live=5", "'live' in the command-line overrides must be a mapping"),
    ("model=1", "'model' in the command-line overrides must be a mapping"),
    ("negative_prompt=null", "'negative_prompt' in the command-line overrides must be a string"),
    ("denoising_step_list=5", "must be a list, not 5"),
    ("denoising_step_list=[abc]", "must be a list of numbers, not ['abc']"),
    ("compile=maybe", "must be true, false or auto"),
    ("height=-64", "height (-64) and width (96) must be > 0"),
])
def test_config_values_of_the_wrong_kind_are_config_errors(override, fragment):
    from utils.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_config_file_values_are_checked_and_legal_kinds_pass(tmp_path):
    from utils.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text('train:\n  max_iters: "4"\n')
    with pytest.raises(ConfigError, match=f"'train.max_iters' in {bad} must be an integer, not '4'"):
        load_config(bad)
    # what the defaults' kinds allow: a fraction of a frame rate, an int for a float, a null
    # generator init, auto switches, a float step
    cfg = load_config("configs/tiny.yaml", ["fps=23.976", "train.lr=1", "train.generator_ckpt=null",
                                            "cuda_graphs=auto", "compile=true", "denoising_step_list=[1000,500.5]"])
    assert cfg.fps == 23.976 and cfg.train.generator_ckpt is None and cfg.compile is True
    # the edges of what the model checks allow
    cfg = load_config("configs/tiny.yaml", ["device=cuda:1", "fps=1000", "model.patch_size=[1,1,1]",
                                            "tiny_vae.num_res_blocks=0", "tiny_vae.dim_mult=[1,2]",
                                            "tiny_vae.temperal_downsample=[true]",
                                            "tokenizer_path=tests/assets/tokenizer"])
    assert cfg.device == "cuda:1" and cfg.tiny_vae.dim_mult == [1, 2]
    # ${...} interpolations resolve against the merged config, and are checked once resolved
    linked = tmp_path / "linked.yaml"
    linked.write_text("train:\n  lr_critic: ${train.lr}\n")
    assert load_config(linked, ["train.lr=0.5"]).train.lr_critic == 0.5
    for value, fragment in (("${nope.x}", "do not resolve: Interpolation key 'nope.x' not found"),
                            ("${device}", "'train.lr_critic' in the config (its ${...} resolved) must be a finite "
                                          "number, not 'cuda'")):
        linked.write_text(f"train:\n  lr_critic: {value}\n")
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            load_config(linked)


def test_random_weights_do_not_depend_on_the_run_seed():
    """The seed draws the noise only, as with real weights: a tiny live session started with its
    own seed replays with that --seed."""
    weights = [dict(build_models(load_config("configs/tiny.yaml", [f"seed={seed}"])).dit.state_dict())
               for seed in (0, 3)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def default_signals():
    """The child reacts to SIGINT as a terminal program does, even when this runner was started
    with SIGINT ignored (as a background job of a non-interactive shell is)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_leaves_a_playable_file(tmp_path, sig, code):
    proc = subprocess.Popen([sys.executable, "inference.py", "--prompt", "a very long walk[600s]", *TINY,
                             "--output_folder", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    def started():  # ffmpeg writes the file's header once it has a frame (zero frames leave no file)
        return any(p.stat().st_size > 0 for p in tmp_path.glob(".*partial*.mp4"))
    deadline = time.time() + 120
    while not started() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    videos = list(tmp_path.glob("*.mp4"))
    assert len(videos) == 1 and not list(tmp_path.glob(".*partial*")), list(tmp_path.iterdir())
    info = probe_video(videos[0])
    assert 0 < info["frames"] < 600 * 16
    sidecar = json.loads(videos[0].with_suffix(".json").read_text())
    assert sidecar["complete"] is False and sidecar["frames_written"] == info["frames"]


def test_subtitles_only_in_their_segments_frames(tmp_path, monkeypatch):
    """Frames are captured before encoding: with and without subtitles (same seed), they are
    identical outside the subtitled segment and differ in every frame inside it."""
    cfg = load_config("configs/tiny.yaml")
    gen = VideoGenerator(cfg, build_models(cfg))
    captured = {}

    import utils.video as video

    def capture(self, frames):
        captured.setdefault(self.path.name, []).append(np.array(frames))
        return original(self, frames)
    original = video.VideoWriter.write
    monkeypatch.setattr(video.VideoWriter, "write", capture)
    plain = gen.generate("a fox[1s] | a cat[1s] | a dog[1s]", tmp_path / "plain.mp4", seed=1)
    subbed = gen.generate("a fox[1s] | a cat[1s] | a dog[1s] ; | MEOW |", tmp_path / "subbed.mp4", seed=1)
    a = np.concatenate(captured["plain.mp4"])
    b = np.concatenate(captured["subbed.mp4"])
    assert a.shape == b.shape and a.shape[0] == plain["plan"]["total_frames"]
    lo, hi = subbed["plan"]["segments"][1]["frames"]
    changed = [bool((a[i] != b[i]).any()) for i in range(a.shape[0])]
    assert changed == [lo <= i < hi for i in range(a.shape[0])]
    # and only in the lower part of the frame
    assert not (a[lo:hi, : a.shape[1] // 2] != b[lo:hi, : a.shape[1] // 2]).any()


def test_image_start_shows_the_image_first(tmp_path):
    from PIL import Image

    cfg = load_config("configs/tiny.yaml")
    gen = VideoGenerator(cfg, build_models(cfg))
    img = np.zeros((64, 96, 3), dtype=np.uint8)
    img[:, :48] = 255
    Image.fromarray(img).save(tmp_path / "start.png")
    rec = gen.generate("a door opens[1s]", tmp_path / "i2v.mp4", seed=0, image=tmp_path / "start.png")
    assert rec["complete"] and rec["image"].endswith("start.png")
    assert probe_video(tmp_path / "i2v.mp4")["frames"] == rec["plan"]["total_frames"] == 16
    assert rec["plan"]["total_blocks"] == 2   # 1 image frame + 12 per block covers 16 frames


@pytest.mark.parametrize("warm", [False, True], ids=["eager-cpu", "compiled-or-gpu"])
def test_live_warms_up_before_the_first_action_when_something_compiles(tmp_path, monkeypatch, caplog, warm):
    """``inference.py --live`` warms the generator up (compile, graph capture, kernel plans) before
    it takes actions, where there is something to warm (``needs_warm_up``: a GPU, or a compile);
    tiny on a CPU, all eager, starts at once."""
    import importlib

    import pipeline.generate as generate
    import pipeline.live_terminal as live_terminal

    monkeypatch.syspath_prepend(str(REPO))
    inference = importlib.import_module("inference")
    picture = str(REPO / "docs" / "live.png")
    order = []
    monkeypatch.setattr(generate, "needs_warm_up", lambda cfg, device: warm)
    monkeypatch.setattr(generate.VideoGenerator, "warm_up", lambda self, image: order.append(("warm-up", image)) or 0.5)
    monkeypatch.setattr(live_terminal, "run_terminal", lambda gen, stream, **kw: order.append("session"))
    with caplog.at_level("INFO", logger="inference"):
        assert inference.main(["--live", "--stdin", *TINY, "--output_folder", str(tmp_path), "--image", picture]) == 0
    assert order == ([("warm-up", picture), "session"] if warm else ["session"])  # the sessions' picture too
    assert any("warmed up in 0.5 s" in r.getMessage() for r in caplog.records) == warm


def test_live_stopped_while_warming_up_exits_quietly(tmp_path, monkeypatch):
    """Ctrl-C during the live warm-up (a minute of compiling on a first start) ends the run with
    130 and one line, no traceback and no session, and nothing written."""
    import importlib

    import pipeline.generate as generate
    import pipeline.live_terminal as live_terminal

    def interrupted(self, image):
        raise KeyboardInterrupt

    monkeypatch.syspath_prepend(str(REPO))
    inference = importlib.import_module("inference")
    monkeypatch.setattr(generate, "needs_warm_up", lambda cfg, device: True)
    monkeypatch.setattr(generate.VideoGenerator, "warm_up", interrupted)
    monkeypatch.setattr(live_terminal, "run_terminal", lambda *a, **kw: pytest.fail("no session after an interrupt"))
    assert inference.main(["--live", "--stdin", *TINY, "--output_folder", str(tmp_path)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_generator_keeps_recent_text_embeddings(monkeypatch):
    """A text encoded again (a live action sent a second time) comes from the kept embeddings,
    equal bit for bit and without running the encoder; the least recently used text goes first
    once more than ``TEXTS_KEPT`` are kept."""
    cfg = load_config("configs/tiny.yaml")
    gen = VideoGenerator(cfg, build_models(cfg))
    encoded = []
    encode = gen.m.text_encoder.forward
    monkeypatch.setattr(gen.m.text_encoder, "forward", lambda texts, **kw: encoded.append(texts[0]) or
                        encode(texts, **kw))
    monkeypatch.setattr(VideoGenerator, "TEXTS_KEPT", 2)
    walk = gen.encode_text("the fox walks")
    assert torch.equal(gen.encode_text("the fox walks"), walk) and encoded == ["the fox walks"]
    gen.encode_text("the fox runs")
    gen.encode_text("the fox walks")  # used again: now the most recent
    gen.encode_text("a harbour")      # a third text: "the fox runs" goes
    gen.encode_text("the fox walks")
    assert encoded == ["the fox walks", "the fox runs", "a harbour"]
    gen.encode_text("the fox runs")
    assert encoded[-1] == "the fox runs" and len(encoded) == 4
    assert torch.equal(gen.encode_text("the fox walks"), walk)


def test_renders_into_one_folder_at_once_reserve_distinct_names(tmp_path):
    """Two renders of the same prompt and seed started together: the second gets ``-1``, not the
    first's hidden partial file; a render that fails before writing gives its name back."""
    from pipeline.generate import _unreserve, output_name
    from utils.video import partial_name

    first = output_name(tmp_path, 0, "a fox runs", 0, reserve=True)
    second = output_name(tmp_path, 0, "a fox runs", 0, reserve=True)
    assert (first.name, second.name) == ("000_a-fox-runs_seed0.mp4", "000_a-fox-runs_seed0-1.mp4")
    assert partial_name(first).is_file() and partial_name(second).is_file()
    _unreserve(second)
    assert not partial_name(second).exists()
    assert output_name(tmp_path, 0, "a fox runs", 0) == second  # free again


def test_generate_that_fails_before_writing_leaves_nothing(tmp_path, monkeypatch):
    cfg = load_config("configs/tiny.yaml")
    gen = VideoGenerator(cfg, build_models(cfg))
    from pipeline.generate import output_name

    path = output_name(tmp_path, 0, "a fox runs", 0, reserve=True)

    def broken(text):
        raise RuntimeError("the text encoder broke")
    monkeypatch.setattr(gen, "encode_text", broken)
    with pytest.raises(RuntimeError, match="broke"):
        gen.generate("a fox runs[1s]", path, 0)
    assert list(tmp_path.iterdir()) == []


def test_start_images_load_upright_in_full_range_or_fail_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.generate import load_image
    from utils.errors import ConfigError

    # a phone photo: stored sideways (left half black) with an EXIF tag saying "rotate 90°"
    stored = np.zeros((64, 64, 3), np.uint8)
    stored[:, 32:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show it rotated
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_image(tmp_path / "phone.jpg", 64, 64)[0, 0].mean(0)  # [H, W]
    assert abs(upright[:32].mean() - upright[32:].mean()) > 1.5  # now split top / bottom
    assert abs(upright[:, :32].mean() - upright[:, 32:].mean()) < 0.1
    # 16-bit greyscale mid-grey stays mid-grey (not clipped to white)
    Image.fromarray(np.full((16, 16), 32768, np.uint16)).save(tmp_path / "grey16.png")
    assert abs(float(load_image(tmp_path / "grey16.png", 16, 16).mean())) < 0.02
    # an image too large for PIL's decompression-bomb guard: one line, not a traceback
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ConfigError, match="cannot read image .*phone.jpg"):
        load_image(tmp_path / "phone.jpg", 64, 64)


def test_a_bad_start_image_is_reported_before_the_models_load(tmp_path):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    r = cli("--prompt", "a[1s]", *TINY, "--image", str(not_an_image), "--output_folder", str(tmp_path / "out"))
    assert r.returncode == 2 and "cannot read image" in r.stderr and "random weights" not in r.stderr, r.stderr


def test_ctrl_c_while_the_models_load_is_one_line(tmp_path, monkeypatch, caplog):
    import inference
    import pipeline.generate as generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(generate, "build_models", interrupted)
    assert inference.main(["--prompt", "a[1s]", *TINY, "--output_folder", str(tmp_path)]) == 130
    assert "interrupted while loading the models; nothing was written" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_the_models_load_is_one_line(tmp_path, monkeypatch, caplog):
    """SIGTERM (a job scheduler's stop) during the loading stops it as Ctrl-C does: one line that
    says so, exit code 143, nothing written, and SIGTERM's handler as it was before."""
    import os
    import signal
    import time

    import inference
    import pipeline.generate as generate

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises in this thread first
        raise AssertionError("SIGTERM did not stop the loading")
    monkeypatch.setattr(generate, "build_models", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert inference.main(["--prompt", "a[1s]", *TINY, "--output_folder", str(tmp_path)]) == 143
    assert "terminated while loading the models; nothing was written" in caplog.text
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) is before


@pytest.fixture
def run_main(monkeypatch, capsys):
    """``inference.main(argv)`` in this process, from the repository root: (exit code, stdout,
    stderr). A traceback (anything but a user error's exit) fails the test by itself."""
    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO))
    import inference

    def run(*argv):
        try:
            code = inference.main([str(a) for a in argv])
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, fragment", [
    (["--prompt", "a[1s]", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["--prompt", "a[1s]", "--num_samples", "1.5"], "argument --num_samples: invalid int value: '1.5'"),
    (["--prompt", "a[1s]", "--data_path", "p.txt"], "argument --data_path: not allowed with argument --prompt"),
    (["--prompt", "a[1s]", "--bogus"], "unrecognized arguments: --bogus"),
    (["fps=8"], "one of the arguments --prompt --data_path --live --replay is required"),
])
def test_argument_mistakes_are_one_line(run_main, argv, fragment):
    code, _, err = run_main(*argv)
    line = one_error_line(err)
    assert code == 2 and fragment in line and line.endswith("; see inference.py -h"), err


@pytest.mark.parametrize("content, fragment", [
    ("caf\xe9[1s]\n".encode("latin-1"), "prompts.txt is not UTF-8 text (line 1 has the byte 0xe9"),
    ("# mine\nok[1s]\nb\xe9[1s]\n".encode("cp1252"), "(line 3 has the byte 0xe9"),
    (b"\xef\xbb\xbfok[1s]\ncaf\xe9[1s]\n", "(line 2 has the byte 0xe9"),  # after a UTF-8 byte-order mark
    ("a[1s]\n".encode("utf-16"), "(it starts with a UTF-16 byte-order mark)"),
    ("a[1s]\n".encode("utf-16-le"), "(line 1 has a NUL byte: UTF-16 text"),
    (b"# comment\n\na[1s]\n\n  # also a comment\nb[1s] | [2s]\n", "prompts.txt line 6: prompt segment 2"),
    (b"a[1s]\nb[1,5s]\n", "prompts.txt line 2: prompt segment 1"),
])
def test_prompt_file_mistakes_name_the_file_and_line(run_main, tmp_path, content, fragment):
    (tmp_path / "prompts.txt").write_bytes(content)
    code, out, err = run_main("--data_path", tmp_path / "prompts.txt", "--dry_run", *TINY)
    assert code == 2 and fragment in one_error_line(err) and out == "", err


def test_overrides_go_anywhere_among_the_flags(run_main):
    code, out, err = run_main("--prompt", "a[1s]", "fps=8", "--dry_run", "sink_size=1", *TINY, "local_attn_size=7")
    assert code == 0 and json.loads(out)["fps"] == 8, err


@pytest.mark.parametrize("args, prompts", [
    (["a[1s]", "fps=8", "--dry_run", "sink_size=1"], 1),  # overrides before and after a flag
    (["fps=8", "--dry_run"], 4),         # an override first: the prompt file, not the prompt "fps=8"
    (["model.num_layers=1", "--dry_run"], 4),
    (["--prompt", "fps=8 on a board[1s]", "--dry_run", "fps=8"], 1),  # a prompt of an override's shape
    (["--dry_run", "--prompt=a[1s] | b[1s]", "fps=8"], 1),
])
def test_inference_sh_passes_overrides_anywhere(args, prompts):
    r = subprocess.run(["bash", "inference.sh", *args, *TINY], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    plans = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(plans) == prompts and all(p["fps"] == 8 for p in plans) == (args[0] != "model.num_layers=1")


@pytest.mark.parametrize("override, fragment", [
    ("model.num_heads=0", "model.num_heads (0) must be a positive integer"),
    ("model.num_layers=-1", "model.num_layers (-1) must be a positive integer"),
    ("model.freq_dim=3", "model.freq_dim (3) must be even"),
    ("model.out_dim=4", "model.out_dim (4) must equal model.in_dim (16)"),
    ("model.patch_size=[1,0,2]", "model.patch_size ([1, 0, 2]) must be a list of 3 positive integers"),
    ("model.patch_size=[1,-2,2]", "model.patch_size ([1, -2, 2]) must be a list of 3 positive integers"),
    ("model.patch_size=[1,1.5,2]", "must be a list of 3 positive integers"),
    ("model.patch_size=[1,2]", "must be a list of 3 positive integers"),
    ("model.patch_size=[2,2,2]", "model.patch_size ([2, 2, 2]) must start with 1"),
    ("model.rope_theta=0", "model.rope_theta (0) must be > 0"),
    ("device=mps", "device must be cpu, cuda or cuda:N (an NVIDIA GPU), not 'mps'"),
    ("fps=1e-300", "fps (1e-300) must be between 1 and 1000"),
    ("fps=1e6", "fps (1000000.0) must be between 1 and 1000"),
    ("tokenizer_path=5", "'tokenizer_path' in the command-line overrides must be null or a string"),
    ("tiny_vae=5", "'tiny_vae' in the command-line overrides must be null or a mapping"),
    ("tiny_text_encoder=5", "'tiny_text_encoder' in the command-line overrides must be null or a mapping"),
    ("tiny_vae.dim_mult=abc", "tiny_vae.dim_mult must be a list of positive integers"),
    ("tiny_vae.dim_mult=[1,0]", "tiny_vae.dim_mult must be a list of positive integers"),
    ("tiny_vae.temperal_downsample=[true]", "tiny_vae.temperal_downsample ([True]) must have one entry per "
                                            "downsampling level, len(tiny_vae.dim_mult) - 1 = 3"),
    ("tiny_vae.temperal_downsample=[0,1,1]", "tiny_vae.temperal_downsample must be a list of true/false"),
    ("tiny_vae.z_dim=4", "tiny_vae.z_dim (4) must equal model.in_dim (16)"),
    ("tiny_vae.base_dim=0", "tiny_vae.base_dim must be a positive integer, not 0"),
    ("tiny_text_encoder.num_layers=abc", "tiny_text_encoder.num_layers must be a positive integer, not 'abc'"),
    ("tiny_text_encoder.d_model=16", "tiny_text_encoder.d_model (16) must equal model.text_dim (32)"),
    ("tiny_text_encoder.dropout_rate=2", "tiny_text_encoder.dropout_rate must be a number in [0, 1)"),
])
def test_model_sizes_and_values_are_checked_before_anything_is_built(override, fragment):
    """Each value as the code that reads it needs it (a head count divides, a patch is a kernel
    size, the timestep embedding halves freq_dim...), refused in one line naming the key."""
    from utils.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("argv, fragment", [
    (["--prompt", "a[0.5s]", *TINY, "model.num_heads=0"], "model.num_heads (0) must be a positive integer"),
    (["--prompt", "a[0.5s]", "--config_path", "configs"], "config file configs is a folder; pass a YAML file"),
    # a byte that is not UTF-8 on the command line (Python hands it over as a lone surrogate)
    (["--prompt", "a[0.5s]", *TINY, "negative_prompt=bad\udce9"],
     "override 'negative_prompt=bad\\xe9' is not UTF-8 text"),
    (["--prompt", "a[0.5s]", *TINY, "negative_prompt=bad\x07"], "control characters are not allowed"),
    (["--prompt", "a[0.5s]", *TINY, "--seed", str(2**63 - 1), "--num_samples", "2"],
     f"needs seeds up to {2**63}, past the largest, 2**63 - 1"),
    (["--prompt", "a[0.5s]", *TINY, "subtitle_font=nowhere/font.ttf"], "subtitle_font nowhere/font.ttf does not exist"),
    (["--prompt", "a[0.5s]", *TINY, "subtitle_font=docs"], "subtitle_font docs is a folder"),
    (["--prompt", "a[0.5s]", *TINY, "live.allowed_origins=[my-gpu.example.com]"],
     "live.allowed_origins must be a list of origins such as 'https://my-gpu.example.com'"),
    (["--prompt", "a[0.5s]", *TINY, "--image", "docs"], "--image docs is a folder; pass a PNG or JPEG file"),
    (["--prompt", "a[0.5s]", *TINY, "--image", "nonexistent.png"], "--image nonexistent.png does not exist"),
    (["--prompt", "a[0.5s]", *TINY, "--image", "README.md"], "cannot read image README.md"),
    (["--prompt", "a[0.5s]", *TINY, "--use_ema"], "--use_ema is not read with random_init=true"),
    (["--prompt", "a[0.5s]", *TINY, "--checkpoint_path", "mine.pt"],
     "--checkpoint_path mine.pt is not read with random_init=true"),
])
def test_cli_mistakes_are_one_line_even_in_a_dry_run(run_main, argv, fragment):
    code, out, err = run_main(*argv, "--dry_run")
    assert code == 2 and fragment in one_error_line(err) and out == "", err


def test_sidecar_records_paths_that_are_not_utf8_and_the_seed_used(tmp_path):
    """A start image whose name holds a Latin-1 byte is recorded with ``\\xe9`` (JSON-safe), and
    the second of ``--num_samples`` records its own seed in its config too: rendering from the
    recorded config gives this video."""
    import os

    from PIL import Image

    cfg = load_config("configs/tiny.yaml", ["seed=5"])
    gen = VideoGenerator(cfg, build_models(cfg))
    image = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")  # as Python hands over such a command-line path
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(image)
    gen.generate("a door opens[0.5s]", tmp_path / "v.mp4", seed=6, image=image)
    sidecar = json.loads((tmp_path / "v.json").read_text(encoding="utf-8"))
    assert sidecar["complete"] and sidecar["image"] == f"{tmp_path}/caf\\xe9.png"
    assert sidecar["seed"] == sidecar["config"]["seed"] == 6 and cfg.seed == 5


def test_checkpoint_flags_are_recorded_in_the_config(run_main, tmp_path, monkeypatch):
    """--checkpoint_path and --use_ema become the config's keys: the config a sidecar records is
    the one the video ran with (a render from it loads the same weights)."""
    import inference

    seen = {}

    def load_generator(args, cfg, checkpoint, device=None):  # records what it was given, then stops as Ctrl-C
        seen.update(checkpoint=checkpoint, path=cfg.checkpoint_path, ema=cfg.use_ema)
        raise KeyboardInterrupt
    monkeypatch.setattr(inference, "load_generator", load_generator)
    code, _, err = run_main("--prompt", "a[0.5s]", "--config_path", "configs/tiny.yaml", "random_init=false",
                            "--checkpoint_path", "mine.pt", "--use_ema", "--output_folder", str(tmp_path))
    assert code == 130 and seen == {"checkpoint": "mine.pt", "path": "mine.pt", "ema": True}, err


def test_a_record_that_cannot_be_written_fails_before_the_render(tmp_path, monkeypatch):
    """The sidecar's record is serialised before the first block: a render never ends without it."""
    import os

    from PIL import Image

    import pipeline.generate as generate

    cfg = load_config("configs/tiny.yaml")
    gen = VideoGenerator(cfg, build_models(cfg))
    image = os.fsdecode(bytes(tmp_path) + b"/caf\xe9.png")
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(image)
    monkeypatch.setattr(generate, "safe_text", lambda text: text, raising=False)  # as if a path slipped by
    monkeypatch.setattr(generate.VideoGenerator, "render", lambda *a, **kw: pytest.fail("rendered"))
    out = tmp_path / "out"
    out.mkdir()
    path = generate.output_name(out, 0, "a", 0, reserve=True)
    with pytest.raises(UnicodeEncodeError):
        gen.generate("a[0.5s]", path, 0, image=image)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("prompt, name", [
    ("a fox runs ; hello", "000_a-fox-runs_seed0.mp4"),  # the first segment's text, not its subtitle
    ("A Fox runs[1s] | the fox jumps[1s]", "000_a-fox-runs_seed0.mp4"),
    ("a \\| b[1s]", "000_a-b_seed0.mp4"),  # an escaped '|' is text
    ("Ünïcödé fox[1s]", "000_ünïcödé-fox_seed0.mp4"),  # letters of any script, lower case
    ("狐狸在雪地里奔跑[1s]", "000_狐狸在雪地里奔跑_seed0.mp4"),
    ("x" * 47 + " y z[1s]", f"000_{'x' * 47}_seed0.mp4"),  # cut at 48 characters: no '-' left at its end
    ("!?[1s]", "000_video_seed0.mp4"),
])
def test_video_names_come_from_the_first_segments_words(run_main, monkeypatch, tmp_path, prompt, name):
    import inference

    names = []

    class Renders:
        def generate(self, prompt, path, seed, **kw):
            names.append(path.name)
    monkeypatch.setattr(inference, "load_generator", lambda *a, **kw: Renders())
    code, _, err = run_main("--prompt", prompt, *TINY, "--output_folder", tmp_path)
    assert code == 0 and names == [name], err


@pytest.mark.parametrize("argv", [["--prompt", "a[1s]"], ["--live", "--stdin"]], ids=["batch", "live"])
def test_ctrl_c_while_starting_up_is_one_line(run_main, monkeypatch, caplog, tmp_path, argv):
    """Ctrl-C while torch and the pipeline import (seconds, before any model loads) ends with one
    line and exit 130, not a traceback and death by SIGINT; nothing is written."""
    import types

    class Interrupted(types.ModuleType):  # the import is where the Ctrl-C lands
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise KeyboardInterrupt
    monkeypatch.setitem(sys.modules, "pipeline.generate", Interrupted("pipeline.generate"))
    try:
        code, _, err = run_main(*argv, *TINY, "--output_folder", tmp_path)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C went through inference.main: a traceback and death by SIGINT")
    assert code == 130 and "interrupted while starting up; nothing was written" in caplog.text, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("wrote, message", [
    (False, "interrupted before the first frame; nothing was written"),
    (True, "interrupted: the video was closed and stays playable"),
])
def test_live_ctrl_c_says_whether_a_video_was_written(run_main, monkeypatch, caplog, tmp_path, wrote, message):
    import pipeline.live_terminal as live_terminal

    def session(gen, lines, *, output_folder, **kw):
        if wrote:  # a recording has its final name from its first frame
            (output_folder / "000_a_seed0.mp4").write_bytes(b"frames")
        raise KeyboardInterrupt
    monkeypatch.setattr(live_terminal, "run_terminal", session)
    code, _, _ = run_main("--live", "--stdin", *TINY, "--output_folder", tmp_path)
    assert code == 130 and message in caplog.text and "stays playable" not in caplog.text.replace(message, "")


@pytest.mark.parametrize("stdin, code", [
    ("#\n;\n", 2),  # lines given, none of them an action
    ("", 0),        # nothing given: nothing to do
    ("\n", 0),      # an empty line: stop at once
])
def test_live_stdin_without_a_usable_first_action(run_main, monkeypatch, tmp_path, stdin, code):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    got, _, err = run_main("--live", "--stdin", *TINY, "--output_folder", tmp_path)
    assert got == code, err
    if code:
        assert "the input ended without a usable first action" in one_error_line(err)
    assert list(tmp_path.iterdir()) == []


def test_replay_renders_a_recorded_video_again(run_main, tmp_path, caplog):
    """--replay takes the prompt, seed, whole config (overrides included) and start image from a
    sidecar: the same video, frame for frame, with no --config_path; the .mp4's name works too, and
    --seed still overrides."""
    from PIL import Image

    Image.fromarray(np.full((64, 96, 3), 120, np.uint8)).save(tmp_path / "start.png")
    first = tmp_path / "first"
    code, _, err = run_main("--prompt", "a fox runs[1s] | a harbour[1s#] ; run | harbour", *TINY, "flush_keep=1",
                            "--seed", "4", "--image", tmp_path / "start.png", "--output_folder", first)
    assert code == 0, err
    video = next(first.glob("*.mp4"))
    for source in (video.with_suffix(".json"), video):
        again = tmp_path / f"again-{source.suffix[1:]}"
        code, _, err = run_main("--replay", source, "--output_folder", again)
        assert code == 0, err
        replayed = next(again.glob("*.mp4"))
        assert np.array_equal(read_video(video), read_video(replayed))
        record = json.loads(replayed.with_suffix(".json").read_text())
        assert record["config"]["flush_keep"] == 1 and record["seed"] == 4
        assert record["image"] == str(tmp_path / "start.png")
    code, _, err = run_main("--replay", video, "--seed", "5", "--output_folder", tmp_path / "seed5")
    assert code == 0, err
    assert json.loads(next((tmp_path / "seed5").glob("*.json")).read_text())["seed"] == 5

    # recorded by an older version: a key the project no longer reads is left out, with a warning;
    # the start picture moved: --image says where it is now
    record = json.loads(video.with_suffix(".json").read_text())
    record["config"]["renamed_since"] = 1
    record["image"] = "somewhere/else.png"
    (tmp_path / "old.json").write_text(json.dumps(record))
    code, _, err = run_main("--replay", tmp_path / "old.json", "--image", tmp_path / "start.png",
                            "--output_folder", tmp_path / "old")
    assert code == 0 and "config key 'renamed_since' is no longer read; left out" in caplog.text, err
    assert np.array_equal(read_video(video), read_video(next((tmp_path / "old").glob("*.mp4"))))


def test_replay_mistakes_are_one_line(run_main, tmp_path):
    (tmp_path / "notes.json").write_text("not json")
    (tmp_path / "other.json").write_text(json.dumps({"prompt": "a[1s]"}))
    (tmp_path / "empty.json").write_text(json.dumps({"prompt": "", "seed": 0, "config": {}, "checkpoint": None,
                                                     "image": None}))
    (tmp_path / "wrong.json").write_text(json.dumps({"prompt": "a[1s]", "seed": 0, "config": {"sink_size": "x"},
                                                     "checkpoint": None, "image": None}))
    (tmp_path / "moved.json").write_text(json.dumps({"prompt": "a[1s]", "seed": 0, "config": {},
                                                     "checkpoint": None, "image": "start.png"}))
    for argv, fragment in (
            (["--replay", tmp_path / "missing.json"], "missing.json: the file does not exist"),
            (["--replay", tmp_path], "is a folder"),
            (["--replay", tmp_path / "notes.json"], "is not a video's sidecar"),
            (["--replay", tmp_path / "other.json"], "is not a video's sidecar (no valid seed, config)"),
            (["--replay", tmp_path / "empty.json"], "ended before its first block"),
            (["--replay", tmp_path / "wrong.json"], "config key 'sink_size' in the config of"),
            (["--replay", tmp_path / "moved.json"], "its start image start.png is not there"),
            (["--replay", tmp_path / "wrong.json", *TINY], "--replay takes the config from the sidecar"),
            (["--replay", tmp_path / "wrong.json", "--prompt", "a"], "not allowed with argument")):
        code, out, err = run_main(*argv, "--dry_run")
        assert code == 2 and fragment in one_error_line(err) and out == "", (argv, err)


def test_inference_sh_replays_a_video_with_the_config_it_recorded(tmp_path):
    """``bash inference.sh --replay VIDEO.json``: no reference config or prompt file is added (the
    sidecar brings its config; --config_path would be refused)."""
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(load_config("configs/tiny.yaml", ["fps=8"]), resolve=True)
    record = {"prompt": "a fox runs[1s]", "seed": 3, "checkpoint": None, "image": None, "config": config}
    (tmp_path / "v.json").write_text(json.dumps(record))
    r = subprocess.run(["bash", "inference.sh", "--replay", str(tmp_path / "v.json"), "--dry_run"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["fps"] == 8

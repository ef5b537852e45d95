"""The live page's server in-process (aiohttp test client, configs/tiny.yaml, CPU): it serves
only its own files, answers every bad request with one clear message and keeps going, lets one
page steer while others watch, survives pages that leave mid-stream, and closes the video on
shutdown."""
import asyncio
import importlib
import io
import json
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType
from aiohttp.test_utils import TestClient, TestServer

from pipeline.generate import VideoGenerator, build_models
from pipeline.live_server import WS_MAX_MESSAGE, LiveServer, own_hosts
from pipeline.live_terminal import replay_command, run_terminal
from utils.config import load_config
from utils.video import probe_video

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 60


@pytest.fixture(scope="module")
def models():
    return build_models(load_config("configs/tiny.yaml"))


def make_server(models, tmp_path, ahead_blocks=1) -> LiveServer:
    cfg = load_config("configs/tiny.yaml", [f"live.ahead_blocks={ahead_blocks}"])
    return LiveServer(VideoGenerator(cfg, models), output_folder=tmp_path, seed=5)


def run(coro_fn, server):
    async def main():
        async with TestClient(TestServer(server.app)) as client:
            await coro_fn(client)
    asyncio.run(asyncio.wait_for(main(), 180))


async def recv(ws, want=None, timeout=TIMEOUT):
    """The next JSON message (of type ``want``, skipping others and frames)."""
    while True:
        msg = await asyncio.wait_for(ws.receive(), timeout)
        if msg.type == WSMsgType.TEXT:
            data = json.loads(msg.data)
            if want is None or data["type"] == want:
                return data
        elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING, WSMsgType.ERROR):
            raise ConnectionError(f"socket closed ({ws.close_code}) while waiting for {want}")


async def error_for(ws, payload) -> str:
    await (ws.send_bytes(payload) if isinstance(payload, bytes) else
           ws.send_str(payload if isinstance(payload, str) else json.dumps(payload)))
    return (await recv(ws, "error"))["message"]


def test_serves_its_page_and_nothing_else(models, tmp_path):
    async def body(client):
        for path, kind in (("/", "text/html"), ("/live.js", "text/javascript"), ("/live.css", "text/css")):
            r = await client.get(path)
            assert r.status == 200 and r.content_type == kind
        page = await (await client.get("/")).text()
        assert 'id="screen"' in page and "/live.js" in page
        for path in ("/../pyproject.toml", "/pipeline/live.py", "/outputs", "/index.html", "/live_page/live.js"):
            assert (await client.get(path)).status == 404, path
    run(body, make_server(models, tmp_path))


def test_only_the_servers_own_page_may_connect(models, tmp_path, caplog):
    """A web site open in the same browser cannot steer or watch: a websocket (or any request)
    whose Origin is not the page's own is refused with 403 and one log line. The page's own
    origin, as 127.0.0.1, localhost or through a tunnel to another local port, is served, and
    so is a client that sends no Origin (a script)."""
    async def body(client):
        port = client.port
        here = f"127.0.0.1:{port}"
        refused = [
            {"Origin": "https://evil.example.com"},                                      # another site
            {"Origin": f"http://evil.example.com:{port}"},
            {"Origin": f"http://evil.example.com:{port}", "Host": f"evil.example.com:{port}"},  # DNS rebinding
            {"Origin": f"http://localhost:{port + 1}"},                                  # another local server
            {"Origin": f"https://{here}"}, {"Origin": "null"}, {"Origin": "http://127.0.0.1:x"},
        ]
        for headers in refused:
            caplog.clear()
            server._refused.clear()  # each origin is logged the first time it is refused
            with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
                await client.ws_connect("/ws", headers=headers)
            assert refusal.value.status == 403, headers
            lines = [r.getMessage() for r in caplog.records if r.name == "live"]
            assert len(lines) == 1 and "refused" in lines[0] and headers["Origin"] in lines[0], lines
        assert (await client.post("/ws", headers={"Origin": "https://evil.example.com"})).status == 403
        caplog.clear()  # refused again (a page retries every second): logged once
        assert (await client.post("/ws", headers={"Origin": "https://evil.example.com"})).status == 403
        assert not [r for r in caplog.records if r.name == "live"]
        server.allowed_origins = {"https://my-gpu.example.com"}  # live.allowed_origins: a tunnel in front
        ws = await client.ws_connect("/ws", headers={"Origin": "https://My-GPU.example.com",
                                                     "Host": "my-gpu.example.com"})
        assert (await recv(ws, "hello"))["type"] == "hello"
        await ws.close()
        server.allowed_origins = set()
        accepted = [{}, {"Origin": f"http://{here}"},
                    {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"},
                    {"Origin": "http://localhost:8000", "Host": "localhost:8000"}]  # ssh -L 8000:127.0.0.1:<port>
        for headers in accepted:
            ws = await client.ws_connect("/ws", headers=headers)
            assert (await recv(ws, "hello"))["role"] == "controller", headers
            await ws.close()
        server.own_hosts = own_hosts("gpu-box.lab")  # started with --host gpu-box.lab
        ws = await client.ws_connect("/ws", headers={"Origin": f"http://gpu-box.lab:{port}",
                                                     "Host": f"gpu-box.lab:{port}"})
        assert (await recv(ws, "hello"))["type"] == "hello"
        await ws.close()
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await client.ws_connect("/ws", headers={"Origin": f"http://box.lab:{port}", "Host": f"box.lab:{port}"})
    server = make_server(models, tmp_path)
    with caplog.at_level("INFO", logger="live"):
        run(body, server)
    assert {"localhost", "127.0.0.1"} <= own_hosts("127.0.0.1") and "gpu-box.lab" in own_hosts("gpu-box.lab")
    assert socket.gethostname().lower() in own_hosts("0.0.0.0") and "0.0.0.0" not in own_hosts("0.0.0.0")


def test_bad_requests_get_one_clear_message_and_the_server_goes_on(models, tmp_path, caplog):
    server = make_server(models, tmp_path, ahead_blocks=1000)  # no pacing: blocks as fast as the CPU makes them

    async def body(client):
        ws = await client.ws_connect("/ws")
        hello = await recv(ws, "hello")
        assert hello["role"] == "controller" and not hello["state"]["running"]
        cases = [
            ("not json", "malformed"), ("[1, 2]", "malformed"), ({"no": "type"}, "malformed"),
            ("[" * 5000, "nested too deeply"), ('{"a":' * 3000, "nested too deeply"),  # under the size limit
            ({"type": "fly"}, "unknown message type"), (b"\x00\x01", "binary"),
            ({"type": "start", "text": "x" * 20000}, "refused"),     # past live.max_message_bytes
            ({"type": "start", "text": "x" * 5000}, "characters"),   # past live.max_text_chars
            ({"type": "action", "kind": "next", "text": "too early"}, "no session is running"),
            ({"type": "pause"}, "no session is running"), ({"type": "stop"}, "no session is running"),
            ({"type": "start", "text": "   "}, "empty"), ({"type": "start"}, "missing"),
            ({"type": "start", "text": 5}, "must be text"), ({"type": "start", "text": "a", "seed": "x"}, "seed"),
            ({"type": "start", "text": "a", "seed": -1}, "seed"),
            ({"type": "start", "text": "caf\udce9"}, "not valid text"),  # JSON "\udce9": a lone surrogate
            ({"type": "start", "text": "a", "subtitle": "\ud800"}, "not valid text"),
        ]
        for payload, fragment in cases:
            message = await error_for(ws, payload)
            assert fragment in message and "\n" not in message, (payload, message)

        await ws.send_str(json.dumps({"type": "start", "text": "a fox runs", "subtitle": "run", "ref": 1}))
        started = await recv(ws, "started")
        assert started["ref"] == 1 and started["video"].endswith(".mp4")
        assert "already running" in await error_for(ws, {"type": "start", "text": "again"})
        assert "kind" in await error_for(ws, {"type": "action", "kind": "jump", "text": "x"})
        assert "empty" in await error_for(ws, {"type": "action", "kind": "next", "text": ""})
        for bad in ({"text": "caf\udce9"}, {"text": "a", "subtitle": "\ud800"}):
            assert "not valid text" in await error_for(ws, {"type": "action", "kind": "scene", **bad})
        await ws.send_str(json.dumps({"type": "action", "kind": "next", "text": "word " * 100, "ref": 7}))
        queued = await recv(ws, "queued")   # tiny text_len 64: accepted, truncated, with a warning
        assert queued["ref"] == 7 and "64" in queued["action"]["warning"]
        block = await recv(ws, "block")
        assert block["frames"] > 0 and block["gen_fps"] > 0
        await ws.send_str(json.dumps({"type": "stop"}))
        stopped = await recv(ws, "stopped")
        assert stopped["complete"] and stopped["frames"] > 0 and stopped["transcript"].startswith("a fox runs[")
        assert "no session is running" in await error_for(ws, {"type": "action", "kind": "scene", "text": "late"})
        # the server is still whole: a new session starts, runs and stops
        await ws.send_str(json.dumps({"type": "start", "text": "a second video"}))
        second = await recv(ws, "started")
        assert second["video"] != started["video"]
        await recv(ws, "block")
        await ws.send_str(json.dumps({"type": "stop"}))
        await recv(ws, "stopped")
        await ws.close()
    run(body, server)
    assert not [r for r in caplog.records if r.exc_info], "a bad request logged a traceback"
    videos = sorted(tmp_path.glob("*.mp4"))
    assert len(videos) == 2
    for video in videos:
        record = json.loads(video.with_suffix(".json").read_text())
        assert record["complete"] and probe_video(video)["frames"] == record["frames_written"]


# prompts that %r printed wrong: a backslash doubled ("a\\;b" for "a;b"), $5 and a backtick
# expanded by the shell (double quotes around an apostrophe), a leading '-' read as an option
TRICKY = ["a;b", "it's $5 `echo hi` a;b", "-x"]


def replayed(command: str, monkeypatch) -> dict:
    """The sidecar that inference.py renders again from a printed command (``--replay``), split
    by shlex and by a real POSIX shell (which expands what the command leaves unquoted)."""
    words = shlex.split(command)
    shell = subprocess.run(["sh", "-c", 'printf "%s\\0" ' + command], capture_output=True, check=True)
    assert shell.stdout.decode().split("\0")[:-1] == words, command
    assert words[:2] == ["python", "inference.py"], command
    monkeypatch.syspath_prepend(str(REPO))
    inference = importlib.import_module("inference")
    return inference.read_record(inference.parse_args(words[2:]).replay)


def check_replay(command: str, video: Path, text: str, monkeypatch) -> None:
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["prompt"].startswith(text.replace(";", "\\;") + "["), record["prompt"]  # \; in the grammar
    assert replayed(command, monkeypatch) == record, command


def test_the_replay_command_runs_as_printed(models, tmp_path, caplog, monkeypatch):
    """The command that the server (its log and the page) and the terminal mode print to render a
    session again gives inference.py the sidecar's prompt exactly, through a POSIX shell."""
    server = make_server(models, tmp_path / "page", ahead_blocks=1000)

    async def body(client):
        ws = await client.ws_connect("/ws")
        for text in TRICKY:
            caplog.clear()
            await ws.send_str(json.dumps({"type": "start", "text": text}))
            await recv(ws, "block")
            await ws.send_str(json.dumps({"type": "stop"}))
            stopped = await recv(ws, "stopped")
            check_replay(stopped["replay"], tmp_path / "page" / stopped["video"], text, monkeypatch)
            logged = [r.getMessage() for r in caplog.records if "session ended" in r.getMessage()]
            assert len(logged) == 1 and logged[0].endswith(": " + stopped["replay"]), logged
        hello = await recv(await client.ws_connect("/ws"), "hello")   # a page that connects later
        assert hello["state"]["last"]["replay"] == stopped["replay"]
    with caplog.at_level("INFO", logger="live"):
        run(body, server)

    for text in TRICKY:
        caplog.clear()
        with caplog.at_level("INFO", logger="live"):
            session = run_terminal(server.gen, io.StringIO(text.replace(";", "\\;") + "\n"), ahead_blocks=1000,
                                   seed=3, output_folder=tmp_path / "terminal")
        logged = [r.getMessage() for r in caplog.records if "render it again" in r.getMessage()]
        assert len(logged) == 1, caplog.text
        check_replay(logged[0][logged[0].index("python inference.py"):], session.path, text, monkeypatch)
    assert shlex.split(replay_command(Path("-my $videos/000_a_seed2.mp4"))) == [
        "python", "inference.py", "--replay=-my $videos/000_a_seed2.json"]  # quoted, and not an option


def test_a_message_past_the_socket_limit_closes_only_that_page(models, tmp_path):
    async def body(client):
        ws = await client.ws_connect("/ws", max_msg_size=0)
        await recv(ws, "hello")
        await ws.send_str("x" * (WS_MAX_MESSAGE + 1))
        msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        while msg.type == WSMsgType.TEXT:
            msg = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED) and ws.close_code == 1009
        again = await client.ws_connect("/ws")
        assert (await recv(again, "hello"))["role"] == "controller"   # the server lives; control is free again
        await again.close()
    run(body, make_server(models, tmp_path))


def test_one_page_steers_others_watch_and_take_over_when_it_leaves(models, tmp_path):
    server = make_server(models, tmp_path, ahead_blocks=1)

    async def body(client):
        a = await client.ws_connect("/ws")
        assert (await recv(a, "hello"))["role"] == "controller"
        b = await client.ws_connect("/ws")
        assert (await recv(b, "hello"))["role"] == "viewer"
        await a.send_str(json.dumps({"type": "start", "text": "a fox runs"}))
        await recv(a, "started")
        block = await recv(b, "block")               # the viewer sees the stream: metadata, then frames
        frames = [await asyncio.wait_for(b.receive(), TIMEOUT) for _ in range(block["frames"])]
        assert all(f.type == WSMsgType.BINARY and f.data[:2] == b"\xff\xd8" for f in frames)  # JPEGs
        assert "another page is steering" in await error_for(b, {"type": "action", "kind": "next", "text": "x"})
        assert "another page is steering" in await error_for(b, {"type": "stop"})

        await a.close()                               # the steering page leaves mid-stream
        state = await recv(b, "state")
        while state["state"]["controlled"]:
            state = await recv(b, "state")
        assert state["state"]["running"] and state["state"]["paused"]
        await b.send_str(json.dumps({"type": "resume"}))   # the watcher takes over
        state = await recv(b, "state")
        while not (state["role"] == "controller" and not state["state"]["paused"]):
            state = await recv(b, "state")
        await b.send_str(json.dumps({"type": "action", "kind": "scene", "text": "a harbour", "ref": "h"}))
        queued = await recv(b, "queued")
        block = await recv(b, "block")
        while not block["landed"]:
            block = await recv(b, "block")
        assert block["landed"]["id"] == queued["action"]["id"] and block["landed"]["kind"] == "cut"
        await b.send_str(json.dumps({"type": "stop"}))
        stopped = await recv(b, "stopped")
        assert "a harbour[" in stopped["transcript"] and "#]" in stopped["transcript"]
        await b.close()
    run(body, server)
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [a["kind"] for a in record["live"]["actions"]] == ["start", "cut"] and record["complete"]


def test_shutdown_closes_the_running_video(models, tmp_path):
    server = make_server(models, tmp_path, ahead_blocks=1)

    async def body(client):
        ws = await client.ws_connect("/ws")
        await ws.send_str(json.dumps({"type": "start", "text": "a fox runs"}))
        await recv(ws, "block")
        await recv(ws, "block")
    run(body, server)  # leaving the client shuts the server down while the session runs
    video = next(tmp_path.glob("*.mp4"))
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["complete"] and record["live"]["blocks"] >= 2
    assert probe_video(video)["frames"] == record["frames_written"] == record["plan"]["total_frames"]


def test_cli_live_flags_and_a_taken_port_are_one_line_errors(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, fragment in ((["--prompt", "a[1s]", "--stdin"], "go with --live"),
                               (["--live", f"--port={port}"], "cannot listen"),
                               (["--live", "live.ahead_blocks=0"], "live.ahead_blocks")):
            r = subprocess.run([sys.executable, "inference.py", *args, "--config_path", "configs/tiny.yaml",
                                "--output_folder", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                               timeout=120, stdin=subprocess.DEVNULL)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and lines[-1].startswith("error:") and fragment in lines[-1], r.stderr
            assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_sigterm_stops_the_server_and_closes_the_video(tmp_path):
    proc = subprocess.Popen([sys.executable, "inference.py", "--live", "--config_path", "configs/tiny.yaml",
                             "--port", "0", "--output_folder", str(tmp_path)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = None
    for line in iter(proc.stderr.readline, ""):
        if "live: open " in line:
            url = line.split("open ")[1].split()[0]
            break
    assert url, "the server never printed its URL"

    async def steer():
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws") as ws:
            await ws.send_str(json.dumps({"type": "start", "text": "a fox runs"}))
            await recv(ws, "block")
            await recv(ws, "block")
            proc.send_signal(signal.SIGTERM)
            stopped = await recv(ws, "stopped")   # pages hear the session end before the server goes
            assert stopped["complete"]
    asyncio.run(asyncio.wait_for(steer(), 120))
    assert proc.wait(60) == 0
    rest = proc.stderr.read()
    assert "Traceback" not in rest
    video = next(tmp_path.glob("*.mp4"))
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["complete"] and record["live"]["blocks"] >= 2
    assert probe_video(video)["frames"] == record["frames_written"]


@pytest.mark.slow
def test_a_second_ctrl_c_while_closing_is_logged_and_the_close_finishes(tmp_path):
    """Ctrl-C twice: the first closes the session, the second (while the video is closing) is
    logged and dropped; the page hears the session end, the process exits 0 with no traceback,
    and the mp4 and its sidecar agree."""
    proc = subprocess.Popen([sys.executable, "inference.py", "--live", "--config_path", "configs/tiny.yaml",
                             "--port", "0", "--output_folder", str(tmp_path)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("live: open " in line for line in lines) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    url = next((line.split("open ")[1].split()[0] for line in lines if "live: open " in line), None)
    assert url, "the server never printed its URL:\n" + "".join(lines)

    async def steer():
        async with aiohttp.ClientSession() as http, http.ws_connect(url + "ws") as ws:
            await ws.send_str(json.dumps({"type": "start", "text": "a fox runs"}))
            await recv(ws, "block")
            await recv(ws, "block")
            proc.send_signal(signal.SIGINT)
            while not any("shutting down" in line for line in lines):  # the close has begun
                await asyncio.sleep(0.001)
            proc.send_signal(signal.SIGINT)
            stopped = await recv(ws, "stopped")
            assert stopped["complete"]
    asyncio.run(asyncio.wait_for(steer(), 120))
    assert proc.wait(60) == 0
    time.sleep(0.2)  # the reader thread takes the last lines
    err = "".join(lines)
    assert "Traceback" not in err and "ignored SIGINT while closing the video" in err, err
    video = next(tmp_path.glob("*.mp4"))
    record = json.loads(video.with_suffix(".json").read_text())
    assert record["complete"] and record["live"]["blocks"] >= 2
    assert probe_video(video)["frames"] == record["frames_written"]

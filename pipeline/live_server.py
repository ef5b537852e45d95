"""The live page (``inference.py --live``): a local web page that steers a :class:`LiveSession`.

aiohttp serves three files of ``pipeline/live_page/`` and one websocket, ``/ws``. Nothing else:
no file path ever comes from a client, and videos go to the configured output folder.

Protocol (JSON text messages; frames are binary JPEG messages):

* page → server: ``{"type": "start", "text", "subtitle"?, "seed"?}``,
  ``{"type": "action", "kind": "next" | "scene", "text", "subtitle"?, "ref"?}``,
  ``{"type": "pause" | "resume" | "stop"}``.
* server → page: ``hello`` (role, settings, state), ``state``, ``started``, ``queued`` (an
  action was accepted, with its id and the page's ``ref``), ``block`` (index, segment, the
  action that landed on it, speed and lead over playback) followed by one binary message per
  frame, ``stopped`` (video name, transcript and the shell command that renders it again),
  ``warning`` (an accepted action's note, e.g. text past the encoder's tokens), ``error`` (one
  line for a bad request).

Only the server's own page may connect: a request whose ``Origin`` header (every browser sends
one with a websocket) is not the origin the page was loaded from is refused with HTTP 403, so a
web site open in the same browser cannot steer the session or read its frames. The page's origin
is the ``Host`` it asked for, when that is a name no other site can take over: an IP address,
``localhost``, the ``--host`` given or this machine's name (an SSH tunnel to another local port
works; a DNS name pointed at this machine by someone else does not). Clients that send no
``Origin`` (scripts, not browsers) are served.

One session at a time. The first page to connect steers; pages that connect while it is there
watch, and are told so if they try to steer. When the steering page goes away the session pauses
and the next page that steers (or connects) takes over. Bad input never stops the server.
"""
from __future__ import annotations

import asyncio
import io
import ipaddress
import json
import logging
import signal
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from PIL import Image

from pipeline.generate import VideoGenerator
from pipeline.live import LiveBlock, LiveError, LiveSession, PlaybackClock, paced
from pipeline.live_terminal import replay_command
from utils.errors import UserError

log = logging.getLogger("live")

PAGE_DIR = Path(__file__).resolve().parent / "live_page"
PAGE_FILES = {"/": ("index.html", "text/html"), "/live.js": ("live.js", "text/javascript"),
              "/live.css": ("live.css", "text/css")}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
WS_MAX_MESSAGE = 1 << 20       # aiohttp closes the socket (code 1009) past this; our own limit is lower
CLIENT_MAX_BLOCKS = 8          # blocks queued for a slow page before it starts skipping blocks
REFUSED_ORIGINS_LOGGED = 1000  # distinct refused origins warned about once each; past it, refused silently


class BadRequest(Exception):
    """A page's request that is refused with a one-line message."""


def encode_jpegs(frames, quality: int) -> list[bytes]:
    out = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class Client:
    """One connected page: its socket and an ordered outbox drained by one sender task."""

    def __init__(self, ws: web.WebSocketResponse, number: int):
        self.ws, self.number = ws, number
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.blocks_queued = 0
        self.blocks_skipped = 0

    def send(self, message: dict) -> None:
        self.outbox.put_nowait((message, []))

    def offer_block(self, meta: dict, jpegs: list[bytes]) -> None:
        if self.blocks_queued >= CLIENT_MAX_BLOCKS:  # a page that cannot keep up skips blocks
            if not self.blocks_skipped:
                log.warning("page %d cannot keep up with the video (a slow connection?): it skips blocks", self.number)
            self.blocks_skipped += 1
            return
        self.blocks_queued += 1
        self.outbox.put_nowait((meta, jpegs))

    async def run_sender(self) -> None:
        while True:
            message, frames = await self.outbox.get()  # a JSON message, then its frames (a block's)
            if message["type"] == "block":
                self.blocks_queued -= 1
            if self.ws.closed:
                continue
            try:
                await self.ws.send_str(json.dumps(message))
                for jpeg in frames:
                    await self.ws.send_bytes(jpeg)
            except (ConnectionError, RuntimeError) as exc:  # the page went away mid-send
                log.info("page %d: %s; it no longer receives frames", self.number, exc)


class LiveServer:
    def __init__(self, gen: VideoGenerator, *, output_folder: str | Path, seed: int, checkpoint: str | None = None,
                 image: str | None = None):
        self.gen, self.cfg = gen, gen.cfg
        live = self.cfg.live
        self.output_folder = Path(output_folder)
        self.seed, self.checkpoint, self.image = int(seed), checkpoint, image
        self.ahead_blocks = int(live.ahead_blocks)
        self.jpeg_quality = int(live.jpeg_quality)
        self.max_message_bytes = int(live.max_message_bytes)
        self.max_text_chars = int(live.max_text_chars)
        self.fps = float(self.cfg.fps)
        self.clients: set[Client] = set()
        self.controller: Client | None = None
        self.session: LiveSession | None = None
        self._starting = False      # a start is encoding its first prompt
        self.clock: PlaybackClock | None = None
        self.worker: threading.Thread | None = None
        self.sessions_started = 0
        self.last_stopped: dict | None = None
        self._connections = 0
        self._tasks: set[asyncio.Task] = set()
        self.own_hosts = own_hosts("127.0.0.1")  # the names (besides IP addresses) the page may be loaded from
        self.allowed_origins = {str(o).lower() for o in live.allowed_origins}  # tunnels, proxies (the config's)
        self._refused: set[str] = set()  # origins refused and logged (once each: a page retries every second)
        self.app = web.Application(middlewares=[self._same_origin_only])
        for route in PAGE_FILES:
            self.app.router.add_get(route, self._page)
        self.app.router.add_get("/ws", self._websocket)
        self.app.on_startup.append(self._on_startup)
        self.app.on_shutdown.append(self._on_shutdown)

    # ------------------------------------------------------------------------- lifecycle
    async def _on_startup(self, app) -> None:
        self.loop = asyncio.get_running_loop()
        self.blocks: asyncio.Queue = asyncio.Queue(maxsize=2)  # worker → publisher (back-pressure)
        self._spawn(self._publisher())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_shutdown(self, app) -> None:
        """Stop the session (its video is closed and its sidecar written), then close the pages."""
        if self.session is not None:
            log.info("shutting down; closing the video of the running session")
            self._stop_session()
        if self.worker is not None:
            await asyncio.to_thread(self.worker.join)
        await self.blocks.join()
        for client in list(self.clients):
            await client.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
        for task in list(self._tasks):
            task.cancel()

    async def serve(self, host: str, port: int, ready=None) -> None:
        """Serve until SIGINT or SIGTERM (then shut down cleanly). ``ready(url)`` is called once
        the socket listens."""
        self.own_hosts = await asyncio.to_thread(own_hosts, host)
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        url = f"http://{shown}:{bound[1]}/"
        if host not in LOOPBACK_HOSTS:
            log.warning("listening on %s: anyone who can reach this machine can watch and steer", host)
        log.info("open %s (Ctrl-C stops)", url)
        if ready is not None:
            ready(url)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            # the close waits for the block being generated and the video's last frames: a second
            # Ctrl-C meanwhile is logged and dropped (as batch rendering does), not a traceback
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, _ignored_while_closing, sig)
            try:
                await runner.cleanup()
            finally:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(sig)

    # ----------------------------------------------------------------------------- HTTP
    @web.middleware
    async def _same_origin_only(self, request: web.Request, handler):
        """Refuse (403) a browser's request sent by a page that is not this server's own."""
        origin = request.headers.get("Origin")
        if origin is not None and origin.lower() not in self.allowed_origins and not self._own_origin(request, origin):
            if origin not in self._refused and len(self._refused) < REFUSED_ORIGINS_LOGGED:
                self._refused.add(origin)
                log.warning("refused a connection from the web page %s (at %s): only this server's own page, "
                            "opened at the address the server printed, may connect (a tunnel or proxy in front: "
                            "add its address to live.allowed_origins)", origin[:200], request.remote)
            raise web.HTTPForbidden(text="only this server's own page may connect\n")
        return await handler(request)

    def _own_origin(self, request: web.Request, origin: str) -> bool:
        """``origin`` is the origin the request was addressed to (scheme, host and port of its ``Host``),
        and that host is a name a foreign site cannot point here (DNS rebinding): an IP address,
        ``localhost``, the host the server was started with or this machine's name."""
        try:
            sent, asked = urlsplit(origin), urlsplit(f"//{request.headers.get('Host', '')}")
            sent_port = sent.port or {"http": 80, "https": 443}.get(sent.scheme)
            asked_port = asked.port or {"http": 80, "https": 443}.get(request.scheme)
        except ValueError:  # a port that is not a number
            return False
        if (sent.scheme, sent.hostname, sent_port) != (request.scheme, asked.hostname, asked_port) or not sent.hostname:
            return False
        try:
            ipaddress.ip_address(sent.hostname)
            return True
        except ValueError:
            return sent.hostname in self.own_hosts

    async def _page(self, request: web.Request) -> web.Response:
        name, content_type = PAGE_FILES[request.path]
        return web.Response(body=(PAGE_DIR / name).read_bytes(), content_type=content_type,
                            headers={"Cache-Control": "no-cache"})

    async def _websocket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=WS_MAX_MESSAGE, heartbeat=30)
        await ws.prepare(request)
        self._connections += 1
        client = Client(ws, self._connections)
        self.clients.add(client)
        sender = self._spawn(client.run_sender())
        if self.controller is None:
            self.controller = client
        client.send(self._hello(client))
        log.info("page %d connected (%s)", client.number, self._role(client))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._handle(client, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    client.send({"type": "error", "message": "binary messages are not understood; send JSON text"})
                elif msg.type == WSMsgType.ERROR:
                    log.info("page %d: connection error %s", client.number, ws.exception())
        finally:
            self.clients.discard(client)
            if ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
                log.warning("page %d sent a message over %d bytes; its connection was closed", client.number,
                            WS_MAX_MESSAGE)
            log.info("page %d disconnected", client.number)
            if self.controller is client:
                self.controller = None
                if self._running() and not self.clock.paused:
                    self.clock.pause()
                    log.info("the steering page left; paused until a page resumes")
                self._broadcast_state()
            await asyncio.sleep(0)  # let the sender drain what it can, then stop it
            sender.cancel()
        return ws

    # ------------------------------------------------------------------------- messages
    def _role(self, client: Client) -> str:
        return "controller" if self.controller is client else "viewer"

    def _running(self) -> bool:
        return self.session is not None and not self.session.stopping.is_set()

    def _state(self) -> dict:
        s = self.session
        return {"running": self._running(), "stopping": s is not None and s.stopping.is_set(),
                "paused": bool(self.clock and self.clock.paused), "controlled": self.controller is not None,
                "block": s.blocks_done if s else 0, "video_seconds": s.frames_written / self.fps if s else 0.0,
                "video": s.path.name if s else None, "seed": s.seed if s else self.seed,
                "actions": [a.to_json_dict(s.started) for a in s.segments] if s else [],
                "last": self.last_stopped}

    def _hello(self, client: Client) -> dict:
        return {"type": "hello", "role": self._role(client), "state": self._state(),
                "settings": {"fps": self.fps, "width": int(self.cfg.width), "height": int(self.cfg.height),
                             "ahead_blocks": self.ahead_blocks, "max_text_chars": self.max_text_chars,
                             "text_tokens": self.gen.m.text_encoder.text_len, "seed": self.seed}}

    def _broadcast(self, message: dict) -> None:
        for client in list(self.clients):
            client.send(message)

    def _broadcast_state(self) -> None:
        for client in list(self.clients):
            client.send({"type": "state", "role": self._role(client), "state": self._state()})

    async def _handle(self, client: Client, data: str) -> None:
        msg = None
        try:
            if len(data.encode()) > self.max_message_bytes:
                raise BadRequest(f"message of {len(data.encode())} bytes refused; the limit is "
                                 f"{self.max_message_bytes} (shorten the text)")
            try:
                msg = json.loads(data)
            except json.JSONDecodeError as exc:
                raise BadRequest(f"malformed message (not JSON: {exc.msg} at character {exc.pos})") from None
            except RecursionError:  # "[[[[..." under the size limit: deeper than the parser recurses
                raise BadRequest("malformed message (JSON nested too deeply)") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise BadRequest('malformed message: expected a JSON object with a "type"')
            kind = msg["type"]
            handler = {"start": self._start, "action": self._action, "pause": self._pause,
                       "resume": self._resume, "stop": self._stop}.get(kind)
            if handler is None:
                raise BadRequest(f"unknown message type {kind[:40]!r}; expected start, action, pause, resume "
                                 f"or stop")
            self._take_control(client)
            await handler(client, msg)
        except (BadRequest, LiveError) as exc:
            client.send({"type": "error", "message": str(exc), "ref": _ref(msg)})
        except Exception as exc:  # noqa: BLE001 - a bug must not take the server (and the video) down
            log.exception("request failed")
            client.send({"type": "error", "message": f"internal error: {type(exc).__name__}: {exc}"})

    def _take_control(self, client: Client) -> None:
        if self.controller is None or self.controller.ws.closed:
            self.controller = client
            log.info("page %d now steers the session", client.number)
            self._broadcast_state()
        elif self.controller is not client:
            raise BadRequest("another page is steering this session; this page can only watch "
                             "(close the other page to take over)")

    def _text(self, msg: dict, key: str, required: bool) -> str | None:
        value = msg.get(key)
        if value is None or (not required and value == ""):
            if required:
                raise BadRequest(f"the {key} is missing; type what should happen")
            return None
        if not isinstance(value, str):
            raise BadRequest(f"the {key} must be text")
        if len(value) > self.max_text_chars:
            raise BadRequest(f"the {key} is {len(value)} characters long; the limit is {self.max_text_chars}")
        return value

    async def _start(self, client: Client, msg: dict) -> None:
        if self._starting:
            raise BadRequest("a session is already starting")
        if self.session is not None:
            if self.session.stopping.is_set():
                raise BadRequest("the previous session is still closing its video; start again in a moment")
            raise BadRequest(f"a session is already running (block {self.session.blocks_done}); "
                             f"stop it before starting a new one")
        text, subtitle = self._text(msg, "text", True), self._text(msg, "subtitle", False)
        seed = msg.get("seed", self.seed)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise BadRequest("the seed must be a whole number between 0 and 2^63 - 1")
        self._starting = True  # the first prompt is encoded off the event loop; refuse a second start meanwhile
        try:
            session = await asyncio.to_thread(
                LiveSession, self.gen, text, seed=seed, subtitle=subtitle, output_folder=self.output_folder,
                index=self.sessions_started, checkpoint=self.checkpoint, image=self.image)
        finally:
            self._starting = False
        self.session, self.clock = session, PlaybackClock(self.fps)
        self.sessions_started += 1
        first = session.pending[0]
        self.worker = threading.Thread(target=self._generate, args=(session, self.clock), name="live-rollout",
                                       daemon=True)
        self.worker.start()
        log.info("session started (seed %d) → %s", seed, session.path)
        for other in list(self.clients):  # the page's own reference goes back to the page that asked only
            other.send({"type": "started", "video": session.path.name, "seed": seed,
                        "action": first.to_json_dict(session.started), "ref": _ref(msg) if other is client else None})
        if first.warning:
            client.send({"type": "warning", "message": first.warning, "ref": _ref(msg)})
        self._broadcast_state()

    def _need_session(self, what: str) -> LiveSession:
        if not self._running():
            raise BadRequest(f"no session is running; press Start before {what}")
        return self.session

    async def _action(self, client: Client, msg: dict) -> None:
        session = self._need_session("sending an action")
        kind = msg.get("kind")
        if kind not in ("next", "scene"):
            raise BadRequest('an action\'s "kind" must be "next" (next action) or "scene" (new scene)')
        text, subtitle = self._text(msg, "text", True), self._text(msg, "subtitle", False)
        steer = session.next_action if kind == "next" else session.new_scene
        action = await asyncio.to_thread(steer, text, subtitle)
        log.info("queued action %d (%s): %r", action.id, "new scene" if kind == "scene" else "next action",
                 action.text)
        client.send({"type": "queued", "ref": _ref(msg), "action": action.to_json_dict(session.started)})

    async def _pause(self, client: Client, msg: dict) -> None:
        self._need_session("pausing")
        self.clock.pause()
        self._broadcast_state()

    async def _resume(self, client: Client, msg: dict) -> None:
        self._need_session("resuming")
        self.clock.resume()
        self._broadcast_state()

    async def _stop(self, client: Client, msg: dict) -> None:
        self._need_session("stopping")
        self._stop_session()
        self._broadcast_state()

    def _stop_session(self) -> None:
        self.session.stop()
        self.clock.resume()  # a paused clock must not hold the last block back
        self.clock.wake()

    # ---------------------------------------------------------------- generation thread
    def _generate(self, session: LiveSession, clock: PlaybackClock) -> None:
        """The rollout, in its own thread: blocks go to the publisher in order; a failure is
        reported to the pages and closes the video (the frames so far stay playable)."""
        error = None
        try:
            for block in paced(session, clock, self.ahead_blocks):
                stats = {"ahead_s": clock.buffered / self.fps, "video_seconds": session.frames_written / self.fps}
                asyncio.run_coroutine_threadsafe(self.blocks.put((session, block, stats)), self.loop).result()
        except UserError as exc:  # disk full & co: one line; the video so far is kept
            log.error("%s", exc)
            error = str(exc)
        except Exception as exc:  # noqa: BLE001
            log.exception("generation failed")
            error = f"generation failed: {type(exc).__name__}: {exc}; the video so far is kept"
        finally:
            try:
                asyncio.run_coroutine_threadsafe(self.blocks.put((session, None, error)), self.loop).result()
            except RuntimeError:  # the event loop is gone (the process is exiting)
                pass

    async def _publisher(self) -> None:
        """Encode each block's frames (JPEG, off the event loop) and send them to every page."""
        while True:
            session, block, extra = await self.blocks.get()
            try:
                if block is None:
                    self._finish(session, extra)
                else:
                    jpegs = await asyncio.to_thread(encode_jpegs, block.frames, self.jpeg_quality)
                    meta = self._block_meta(block, extra)
                    for client in list(self.clients):
                        client.offer_block(meta, jpegs)
            except Exception:  # noqa: BLE001
                log.exception("publishing failed")
            finally:
                self.blocks.task_done()

    def _block_meta(self, block: LiveBlock, stats: dict) -> dict:
        meta = {"type": "block", "index": block.index, "frames": len(block.frames), "first_frame": block.first_frame,
                "action": block.action.id, "segment_text": block.action.text,
                "gen_fps": len(block.frames) / max(block.seconds, 1e-9), **stats, "landed": None}
        if block.landed is not None:
            a = block.landed
            meta["landed"] = {"id": a.id, "kind": a.kind, "text": a.text, "subtitle": a.subtitle,
                              "ready_after_s": a.landed - a.submitted}
            log.info("block %d: action %d %s %r landed %.2f s after it was sent", block.index, a.id, a.kind,
                     a.text, a.landed - a.submitted)
        return meta

    def _finish(self, session: LiveSession, error: str | None) -> None:
        self.last_stopped = {"video": session.path.name if session.path.exists() else None,
                             "transcript": session.transcript, "seed": session.seed, "blocks": session.blocks_done,
                             "frames": session.frames_written, "seconds": session.frames_written / self.fps,
                             "complete": session.complete, "error": error,
                             "replay": replay_command(session.path) if session.path.exists() else None}
        if self.last_stopped["replay"] is None:
            log.info("session ended before its first block: nothing was written")
        else:
            log.info("session ended: %d blocks, %d frames → %s; render it again with: %s", session.blocks_done,
                     session.frames_written, session.path, self.last_stopped["replay"])
        if self.session is session:
            self.session, self.worker = None, None
        self._broadcast({"type": "stopped", **self.last_stopped})
        self._broadcast_state()


def _ignored_while_closing(sig: signal.Signals) -> None:
    log.warning("ignored %s while closing the video", sig.name)


def own_hosts(host: str) -> set[str]:
    """The host names (IP addresses aside) that the page of a server listening on ``host`` may be
    loaded from: ``localhost``, ``host`` itself, and this machine's names when ``host`` is not
    loopback (other machines reach it by name)."""
    def name(h: str) -> str:  # as an origin's hostname reads it: lower case, IPv6 without brackets
        return h.strip().strip("[]").lower()

    names = {"localhost"}
    if name(host) not in WILDCARD_HOSTS:
        names.add(name(host))
    if name(host) not in LOOPBACK_HOSTS:
        names.add(name(socket.gethostname()))
        try:
            names.add(name(socket.getfqdn()))  # may ask DNS: once, at start
        except OSError:
            pass
    return names - {""}


def _ref(msg) -> object:
    """The page's own reference for a request (echoed back), if it is a short scalar."""
    ref = msg.get("ref") if isinstance(msg, dict) else None
    return ref if isinstance(ref, (int, str)) and len(str(ref)) <= 64 else None

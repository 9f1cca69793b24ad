"""A TCP proxy on 127.0.0.1 whose backend can be switched: a managed Redis's
"same address, new server" failover, as the app sees it.

Managed Redis plans that fail over (Heroku Key-Value Store premium, Render
Key Value, Upstash) keep the address the app was given and put the promoted
replica behind it; the connections to the old server end. `switch(port)`
does exactly that: new connections go to `port`, every open one is closed.
"""
from __future__ import annotations

import asyncio
import threading

from tests.harness.services import free_port, wait_for_port


class SwitchableProxy:
    def __init__(self, backend_port: int):
        self.port = free_port()
        self.backend_port = backend_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.pairs: set = set()
        self.server = None
        self.accepting = True

    def start(self) -> "SwitchableProxy":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        wait_for_port(self.port, what="tcp proxy")
        return self

    async def _serve(self):
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)

    async def _client(self, reader, writer):
        if not self.accepting:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                for w in pair:
                    w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.pairs.discard(pair)

    def _run(self, fn):
        async def call():
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def refuse(self) -> None:
        """Backend gone, nothing promoted yet: close what is open, refuse new connections."""
        def go():
            self.accepting = False
            for pair in list(self.pairs):
                for w in pair:
                    w.close()
        self._run(go)

    def switch(self, backend_port: int) -> None:
        """The promoted server takes the address: new connections go there."""
        def go():
            self.backend_port = backend_port
            for pair in list(self.pairs):
                for w in pair:
                    w.close()
            self.accepting = True
        self._run(go)

    def stop(self):
        def go():
            if self.server is not None:
                self.server.close()
            for pair in list(self.pairs):
                for w in pair:
                    w.close()
        try:
            self._run(go)
        except Exception:
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

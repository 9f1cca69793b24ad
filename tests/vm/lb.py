"""A TLS-terminating load balancer in front of one web host's port 80, as a
cloud load balancer would be: it runs in a container on the lab network
(python3 only, no third-party modules) and for every request it forwards
adds `X-Forwarded-Proto: https` and `X-Forwarded-For: <client>` (replacing
any the client sent). Websocket upgrades are piped both ways; other requests
get `Connection: close`, so every forwarded request carries the headers.

    python3 lb.py LISTEN_PORT UPSTREAM_HOST UPSTREAM_PORT CERT KEY
"""
import asyncio
import ssl
import sys

DROP = {b"x-forwarded-for", b"x-forwarded-proto", b"forwarded", b"connection", b"keep-alive"}


async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def handle(reader, writer, upstream):
    peer = writer.get_extra_info("peername")[0]
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    except Exception:
        writer.close()
        return
    lines = head[:-4].split(b"\r\n")
    request, headers = lines[0], lines[1:]
    upgrade = any(h.split(b":", 1)[0].strip().lower() == b"upgrade" for h in headers)
    kept = [h for h in headers if h.split(b":", 1)[0].strip().lower() not in DROP]
    kept.append(b"Connection: upgrade" if upgrade else b"Connection: close")
    kept += [b"X-Forwarded-Proto: https", b"X-Forwarded-For: " + peer.encode()]
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        writer.close()
        return
    up_writer.write(request + b"\r\n" + b"\r\n".join(kept) + b"\r\n\r\n")
    await up_writer.drain()
    to_client = asyncio.ensure_future(pipe(up_reader, writer))
    to_upstream = asyncio.ensure_future(pipe(reader, up_writer))
    await to_client            # the upstream answered and closed (or the socket ended)
    to_upstream.cancel()


async def main(port, host, upstream_port, cert, key):
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    server = await asyncio.start_server(lambda r, w: handle(r, w, (host, upstream_port)), "0.0.0.0", port, ssl=ctx)
    print(f"lb listening on {port} -> {host}:{upstream_port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p, h, up, c, k = sys.argv[1:6]
    asyncio.run(main(int(p), h, int(up), c, k))

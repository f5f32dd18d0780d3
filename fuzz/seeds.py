#!/usr/bin/env python3
"""Seed corpora for the fuzz targets (fuzz/corpus/<target>/).

  seeds.py record LISTEN_PORT UPSTREAM_HOST:PORT OUT_DIR
      A recording TCP proxy: forwards every connection to the broker at UPSTREAM
      and, when a client connection ends, writes what the client sent as seeds
      (see `write_session`). fuzz/record-seeds.sh runs the integration tests
      (lapin clients and raw sockets) through it.

  seeds.py handmade OUT_DIR
      Hand-built sessions the tests do not produce: nested field tables and
      arrays, every field type in message headers, runs of heartbeats, a body
      split over several frames, an AMQPLAIN login.

Seed files are named by the SHA-1 of their content, as libFuzzer names its own.
Input formats (fuzz/src/harness.rs): a `connection` input is one mode byte (bit 0:
the harness sends a handshake and channel.open on channel 1 first) and the bytes
after the protocol header; a `frame` input is 4 bytes choosing frame_max, then
the bytes after the protocol header.
"""

import asyncio
import hashlib
import os
import struct
import sys

HEADER = b"AMQP\x00\x00\x09\x01"
MAX_SEED = 16 * 1024
FRAME_MAX_131072 = struct.pack(">I", 131072 - 4096)


def save(out_dir, target, data):
    d = os.path.join(out_dir, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def frames(data):
    """Splits a client byte stream (after the header) into (type, channel, payload, end)."""
    out, i = [], 0
    while i + 7 <= len(data):
        kind, ch, size = struct.unpack(">BHI", data[i : i + 7])
        if i + 8 + size > len(data):
            break
        out.append((kind, ch, data[i + 7 : i + 7 + size], i + 8 + size))
        i += 8 + size
    return out


def method_id(payload):
    return struct.unpack(">HH", payload[:4]) if len(payload) >= 4 else None


def write_session(out_dir, data):
    """Seeds from one recorded client session (protocol header included)."""
    if not data.startswith(HEADER) or len(data) - 8 > MAX_SEED:
        return
    rest = data[8:]
    save(out_dir, "connection", b"\x00" + rest)
    save(out_dir, "frame", FRAME_MAX_131072 + rest)
    # The same session after the harness's own handshake: drop the client's
    # start-ok, tune-ok, open and channel.open on channel 1.
    wanted = [(0, (10, 11)), (0, (10, 31)), (0, (10, 40)), (1, (20, 10))]
    for kind, ch, payload, end in frames(rest):
        if kind == 8:
            continue
        if kind != 1 or (ch, method_id(payload)) != wanted[0]:
            return
        wanted.pop(0)
        if not wanted:
            save(out_dir, "connection", b"\x01" + rest[end:])
            return


async def record(listen_port, upstream, out_dir):
    host, port = upstream.rsplit(":", 1)

    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        sent = bytearray()

        async def pump(r, w, log):
            try:
                while True:
                    b = await r.read(65536)
                    if not b:
                        break
                    if log is not None:
                        log.extend(b)
                    w.write(b)
                    await w.drain()
            except (OSError, asyncio.IncompleteReadError):
                pass
            finally:
                try:
                    w.close()
                except OSError:
                    pass

        await asyncio.gather(pump(cr, uw, sent), pump(ur, cw, None))
        write_session(out_dir, bytes(sent))

    server = await asyncio.start_server(handle, "127.0.0.1", int(listen_port))
    async with server:
        await server.serve_forever()


# --- hand-made sessions ---------------------------------------------------


def frame(kind, ch, payload):
    return struct.pack(">BHI", kind, ch, len(payload)) + payload + b"\xce"


def method(ch, cls, mth, args=b""):
    return frame(1, ch, struct.pack(">HH", cls, mth) + args)


def shortstr(s):
    return bytes([len(s)]) + s


def longstr(s):
    return struct.pack(">I", len(s)) + s


def table(entries):
    body = b"".join(shortstr(k) + v for k, v in entries)
    return longstr(body)


def array(values):
    return longstr(b"".join(values))


def nested_table(depth):
    t = table([(b"leaf", b"I" + struct.pack(">i", 1))])
    for _ in range(depth):
        t = table([(b"x", b"F" + t)])
    return t


def nested_array(depth):
    a = array([b"b\x01"])
    for _ in range(depth):
        a = array([b"A" + a])
    return table([(b"a", b"A" + a)])


def every_type():
    return table(
        [
            (b"t", b"t\x01"),
            (b"b", b"b\xff"),
            (b"B", b"B\xff"),
            (b"s", b"s" + struct.pack(">h", -2)),
            (b"u", b"u" + struct.pack(">H", 65535)),
            (b"I", b"I" + struct.pack(">i", -3)),
            (b"i", b"i" + struct.pack(">I", 2**32 - 1)),
            (b"l", b"l" + struct.pack(">q", -4)),
            (b"f", b"f" + struct.pack(">f", 1.5)),
            (b"d", b"d" + struct.pack(">d", -2.5)),
            (b"D", b"D\x02" + struct.pack(">I", 12345)),
            (b"S", b"S" + longstr(b"long string")),
            (b"x", b"x" + longstr(b"\x00\x01bytes")),
            (b"T", b"T" + struct.pack(">Q", 1700000000)),
            (b"V", b"V"),
            (b"A", b"A" + array([b"I" + struct.pack(">i", 7), b"S" + longstr(b"s"), b"V"])),
            (b"F", b"F" + table([(b"k", b"t\x00")])),
        ]
    )


def start_ok(mechanism=b"PLAIN", response=b"\x00guest\x00guest", props=b"\x00\x00\x00\x00"):
    return method(0, 10, 11, props + shortstr(mechanism) + longstr(response) + shortstr(b"en_US"))


def tune_ok(heartbeat=0, frame_max=131072):
    return method(0, 10, 31, struct.pack(">HIH", 2047, frame_max, heartbeat))


def conn_open():
    return method(0, 10, 40, shortstr(b"/") + shortstr(b"") + b"\x00")


def queue_declare(ch, name, flags, args):
    return method(ch, 50, 10, b"\x00\x00" + shortstr(name) + bytes([flags]) + args)


def publish(ch, exchange, key, body, props_flags=0, props=b"", frame_size=None):
    out = method(ch, 60, 40, b"\x00\x00" + shortstr(exchange) + shortstr(key) + b"\x00")
    out += frame(2, ch, struct.pack(">HHQH", 60, 0, len(body), props_flags) + props)
    step = frame_size or max(len(body), 1)
    for i in range(0, len(body), step):
        out += frame(3, ch, body[i : i + step])
    return out


def consume(ch, queue, tag, no_ack):
    return method(ch, 60, 20, b"\x00\x00" + shortstr(queue) + shortstr(tag) + bytes([2 if no_ack else 0]) + longstr(b""))


def ack(ch, tag, multiple=False):
    return method(ch, 60, 80, struct.pack(">QB", tag, 1 if multiple else 0))


def handmade(out_dir):
    hb = frame(8, 0, b"")
    login = start_ok() + tune_ok() + conn_open()
    chan1 = method(1, 20, 10, shortstr(b""))
    sessions = {
        # mode 1: after the harness's handshake and channel.open
        "declare-nested-table": b"\x01" + queue_declare(1, b"q-nest", 0, nested_table(16)),
        "declare-nested-array": b"\x01" + queue_declare(1, b"q-arr", 0, nested_array(16)),
        "declare-every-type": b"\x01" + queue_declare(1, b"q-types", 0, every_type()),
        "publish-headers-every-type": b"\x01"
        + queue_declare(1, b"q-h", 0b1000, table([]))  # auto-delete
        + publish(1, b"", b"q-h", b"hello", 0x2000, every_type()),
        "publish-headers-nested": b"\x01" + publish(1, b"", b"q-h", b"x", 0x2000, nested_table(12)),
        "publish-all-properties": b"\x01"
        + publish(
            1,
            b"",
            b"q-h",
            b"body",
            0xFFFC,
            shortstr(b"text/plain")
            + shortstr(b"gzip")
            + table([(b"h", b"S" + longstr(b"v"))])
            + b"\x02\x05"
            + shortstr(b"corr")
            + shortstr(b"reply")
            + shortstr(b"60000")
            + shortstr(b"id")
            + struct.pack(">Q", 1700000000)
            + shortstr(b"type")
            + shortstr(b"guest")
            + shortstr(b"app")
            + shortstr(b""),
        ),
        "publish-split-body": b"\x01"
        + queue_declare(1, b"", 0b0100, table([]))
        + publish(1, b"", b"amq.gen-none", bytes(range(256)) * 40, frame_size=4000),
        "consume-publish-ack": b"\x01"
        + queue_declare(1, b"q-c", 0b1000, table([]))
        + consume(1, b"q-c", b"ctag", False)
        + publish(1, b"", b"q-c", b"m1")
        + publish(1, b"", b"q-c", b"m2")
        + ack(1, 2, True),
        "heartbeats-after-open": b"\x01" + hb * 40 + frame(8, 1, b""),
        # mode 0: the input does the handshake itself
        "heartbeats-before-start-ok": b"\x00" + hb * 40 + login + chan1,
        "heartbeats-between-handshake": b"\x00" + hb * 8 + start_ok() + hb * 8 + tune_ok() + hb * 8 + conn_open() + chan1,
        "amqplain-login": b"\x00"
        + start_ok(
            b"AMQPLAIN",
            table([(b"LOGIN", b"S" + longstr(b"guest")), (b"PASSWORD", b"S" + longstr(b"guest"))])[4:],
        )
        + tune_ok(60, 4096)
        + conn_open()
        + chan1,
        "client-properties-nested": b"\x00"
        + start_ok(props=table([(b"capabilities", b"F" + table([(b"connection.blocked", b"t\x01")])), (b"n", b"F" + nested_table(12))]))
        + tune_ok()
        + conn_open(),
    }
    for name, data in sessions.items():
        save(out_dir, "connection", data)
        # The same bytes for the codec alone (the handshake prefix does not matter there).
        save(out_dir, "frame", FRAME_MAX_131072 + data[1:])
    # frame_max at both ends of the frame target's range.
    save(out_dir, "frame", struct.pack(">I", 0) + hb + frame(3, 1, b"x" * 4088))
    save(out_dir, "frame", struct.pack(">I", 1024 * 1024 - 4096) + frame(3, 1, b"y" * 12000) + hb)


def main():
    if len(sys.argv) == 5 and sys.argv[1] == "record":
        asyncio.run(record(sys.argv[2], sys.argv[3], sys.argv[4]))
    elif len(sys.argv) == 3 and sys.argv[1] == "handmade":
        handmade(sys.argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

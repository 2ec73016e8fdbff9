#!/usr/bin/env python3
"""A minimal OTLP/HTTP trace sink for `cargo xtask bench`.

    otlp-sink.py serve DIR [--port N]   accept POST /v1/traces, answer 200, append each body to
                                        DIR/bodies.bin; GET /stats gives {"requests", "bytes"}.
                                        Prints "otlp-sink listening on 127.0.0.1:PORT" when ready.
    otlp-sink.py count DIR              decode DIR/bodies.bin afterwards and print span counts as
                                        JSON: total, and per HTTP method and span kind.

Decoding happens after the run, not while the benchmark runs, so the sink costs the machine
little more than a socket read and a file write per export. Only the standard library is used:
a tiny protobuf walker reads ExportTraceServiceRequest -> ResourceSpans(1) -> ScopeSpans(2) ->
Span(2), and from each span its name (5) and kind (6).
"""
import gzip
import json
import struct
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def fields(buf):
    """Yields (field number, wire type, value) of one protobuf message; value is bytes for
    length-delimited fields and an int otherwise."""
    i, n = 0, len(buf)
    while i < n:
        key, i = varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = varint(buf, i)
        elif wt == 1:
            v, i = buf[i : i + 8], i + 8
        elif wt == 2:
            ln, i = varint(buf, i)
            v, i = buf[i : i + ln], i + ln
        elif wt == 5:
            v, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield num, wt, v


def count_request(body, out):
    for num, wt, rs in fields(body):
        if num != 1 or wt != 2:
            continue
        for num2, wt2, ss in fields(rs):
            if num2 != 2 or wt2 != 2:
                continue
            for num3, wt3, span in fields(ss):
                if num3 != 2 or wt3 != 2:
                    continue
                name, kind = "", 0
                for f, w, v in fields(span):
                    if f == 5 and w == 2:
                        name = bytes(v).decode("utf-8", "replace")
                    elif f == 6 and w == 0:
                        kind = v
                method = name.split(" ", 1)[0] or "?"
                key = f"{method} {KINDS.get(kind, kind)}"
                out["spans"] += 1
                out["by_method_kind"][key] = out["by_method_kind"].get(key, 0) + 1


def count(directory):
    out = {"requests": 0, "spans": 0, "by_method_kind": {}, "undecodable": 0}
    with open(f"{directory}/bodies.bin", "rb") as f:
        data = f.read()
    i = 0
    while i < len(data):
        (ln,) = struct.unpack_from("<I", data, i)
        body = data[i + 4 : i + 4 + ln]
        i += 4 + ln
        out["requests"] += 1
        try:
            count_request(body, out)
        except (IndexError, ValueError):
            out["undecodable"] += 1
    print(json.dumps(out, sort_keys=True))


def serve(directory, port):
    lock = threading.Lock()
    sink = open(f"{directory}/bodies.bin", "wb")
    stats = {"requests": 0, "bytes": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, code, body=b"", ctype="application/x-protobuf"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def read_body(self):
            if "chunked" not in (self.headers.get("Transfer-Encoding") or "").lower():
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))
            # Chunked (Node.js's exporter streams its body): size lines, chunks, an empty last one.
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers, then the blank line
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()

        def do_POST(self):
            body = self.read_body()
            if self.path != "/v1/traces":
                return self.reply(404)
            enc = (self.headers.get("Content-Encoding") or "").lower()
            if enc == "gzip":
                body = gzip.decompress(body)
            elif enc == "deflate":
                body = zlib.decompress(body)
            with lock:
                sink.write(struct.pack("<I", len(body)))
                sink.write(body)
                sink.flush()  # so a SIGTERM'd sink leaves whole records behind
                stats["requests"] += 1
                stats["bytes"] += len(body)
            # An empty ExportTraceServiceResponse: full success.
            self.reply(200)

        def do_GET(self):
            if self.path != "/stats":
                return self.reply(404)
            with lock:
                body = json.dumps(stats).encode()
            self.reply(200, body, "application/json")

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    print(f"otlp-sink listening on 127.0.0.1:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sink.close()


def main(argv):
    if len(argv) >= 3 and argv[1] == "serve":
        port = int(argv[4]) if len(argv) >= 5 and argv[3] == "--port" else 0
        serve(argv[2], port)
    elif len(argv) == 3 and argv[1] == "count":
        count(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)

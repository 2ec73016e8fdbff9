#!/usr/bin/env python3
"""Counts the spans the benchmarks' OTLP sink received (`cargo xtask otlp-sink DIR`, in
xtask/src/sink.rs, stores each request's body in DIR/bodies.bin while a run goes on).

    otlp-sink.py count DIR    decode DIR/bodies.bin and print span counts as JSON: total, and
                              per HTTP method and span kind.

bodies.bin holds one record per request: a little-endian u32 length (of the body), the body's
Content-Encoding as one byte (0 none, 1 gzip, 2 deflate, 3 another) and the body. Only the
standard library is used: a tiny protobuf walker reads ExportTraceServiceRequest ->
ResourceSpans(1) -> ScopeSpans(2) -> Span(2), and from each span its name (5) and kind (6).
"""
import gzip
import json
import struct
import sys
import zlib

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
        (ln, enc) = struct.unpack_from("<IB", data, i)
        body = data[i + 5 : i + 5 + ln]
        i += 5 + ln
        out["requests"] += 1
        try:
            if enc == 1:
                body = gzip.decompress(body)
            elif enc == 2:
                body = zlib.decompress(body)
            elif enc != 0:
                raise ValueError(f"content encoding {enc}")
            count_request(body, out)
        except (IndexError, ValueError, OSError, zlib.error):
            out["undecodable"] += 1
    print(json.dumps(out, sort_keys=True))


def main(argv):
    if len(argv) == 3 and argv[1] == "count":
        count(argv[2])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)

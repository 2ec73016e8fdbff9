"""hello.py PORT [--backend URL]: a Flask service on waitress (HTTP/1.1 keep-alive, one I/O
thread and THREADS worker threads, 8 by default) answering GET /, after one keep-alive call to
URL when given. `cargo xtask bench overhead` runs it plainly and under
`opentelemetry-instrument` (versions pinned in python-requirements.txt), whose Flask and urllib3
instrumentations patch at import: nothing here is OpenTelemetry-specific."""
import logging
import os
import signal
import sys

import urllib3
from flask import Flask
from waitress import create_server

port = int(sys.argv[1])
backend = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else None
threads = int(os.environ.get("THREADS", "8"))
logging.getLogger("waitress").setLevel(logging.ERROR)  # no "Task queue depth" warnings

app = Flask(__name__)
# urllib3 directly: requests scans the environment for proxies on every call (~3x the CPU).
pool = urllib3.PoolManager(maxsize=threads, timeout=10.0, retries=False)


@app.get("/")
def hello():
    if backend:
        r = pool.request("GET", backend)
        return f"front got {r.status} {len(r.data)} bytes\n"
    return "hello world\n"


server = create_server(app, host="127.0.0.1", port=port, threads=threads)
# SIGTERM/SIGINT exit through SystemExit so that atexit hooks run: under opentelemetry-instrument
# that is the tracer provider's shutdown, which sends the spans still queued.
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: sys.exit(0))
print("listening", flush=True)
server.run()

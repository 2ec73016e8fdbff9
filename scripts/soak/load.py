"""Paced keep-alive load: RATE requests/s in all for SECONDS, split between nginx and a Python
server, 4 connections each; prints {"sent", "ok", "seconds"}."""
import http.client, json, sys, threading, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
targets = [(18380, "/index.html"), (18381, "/soak")]
lock = threading.Lock(); sent = ok = 0
def worker(port, path, per_sec):
    global sent, ok
    c = http.client.HTTPConnection("127.0.0.1", port)
    t0 = time.time(); n = 0
    while time.time() - t0 < seconds:
        due = t0 + n / per_sec
        if due > time.time(): time.sleep(due - time.time())
        try:
            c.request("GET", path); r = c.getresponse(); r.read(); good = r.status == 200
        except Exception:
            c = http.client.HTTPConnection("127.0.0.1", port); good = False
        with lock:
            sent += 1; ok += good
        n += 1
ts = [threading.Thread(target=worker, args=(p, path, rate / 8)) for p, path in targets for _ in range(4)]
t0 = time.time(); [t.start() for t in ts]; [t.join() for t in ts]
print(json.dumps({"sent": sent, "ok": ok, "seconds": time.time() - t0}))

#!/usr/bin/env python3
"""Scores a "last waker" hand-off rule (scripts/wake-rule.bt's output) against a bed's truth file:
for the first call each request caused, is the thread that last woke the calling thread the one
that read the request? Usage: wake-rule-score.py TRACE TRUTH"""
import json, re, sys, collections
trace, truth = sys.argv[1], sys.argv[2]
reqs = {}          # /work/<tok> -> server tid that read it
call_of = {}       # call path -> request path
for l in open(truth):
    t = json.loads(l)
    for c in t["calls"]:
        call_of[c] = t["in"]
first = {}         # request path -> (worker tid, last waker) at its first call
for l in open(trace, errors="replace"):
    p = l.split(" ", 3)
    if len(p) < 3: continue
    if p[0] == "R":
        m = re.search(r"GET (/work/[0-9a-f]+)", l)
        if m: reqs.setdefault(m.group(1), int(p[1]))
    elif p[0] == "W":
        m = re.search(r"(GET|POST) (/(inventory|price|charge)/[0-9a-f]+)", l)
        if m and m.group(2) in call_of:
            r = call_of[m.group(2)]
            first.setdefault(r, (int(p[1]), int(p[2])))
n = right = 0
for r, (worker, waker) in first.items():
    if r not in reqs: continue
    n += 1
    right += waker == reqs[r]
print("first calls scored %d: last waker is the thread that read the request in %d (%.1f %%)" % (n, right, 100.0 * right / max(n, 1)))

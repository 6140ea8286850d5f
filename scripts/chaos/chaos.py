#!/usr/bin/env python3
"""Chaos run for shoal (issue 19): three real `shoal up` processes in network
namespaces that scripts/chaos/chaos.sh created, random file operations on
all three folders, kill -9 and partitions, then a check that nothing was
lost or torn and that the folders converged.

  chaos.py run --bin SHOAL --work DIR --seed S --rounds N --ns A,B,C
               --ips 10.x.0.1,10.x.0.2,10.x.0.3 --bridge BRNS [--timeout SECS]
  chaos.py table RESULT.json...

Every traffic goes to the namespaces' 10.x addresses (the nodes run with
--no-mdns and explicit --peer) and to 127.0.0.1 inside each namespace (the
local API). Standard library only.
"""

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

NAMES = "abc"
SPACE = "chaos"
# A small pool of paths so that operations collide.
DIRS = ["d1", "d2", "d1/sub", "d3"]
FILES = ["a.txt", "b.txt", "c.bin", "d1/a.txt", "d1/b.txt", "d1/sub/x.txt", "d2/a.txt", "d3/y.txt"]
BIGS = ["big1.bin", "big2.bin", "d2/big.bin"]
EMPTY = hashlib.sha256(b"").hexdigest()


def now():
    return time.time()


def sha(b):
    return hashlib.sha256(b).hexdigest()


def stamp():
    return time.strftime("%H:%M:%S", time.gmtime()) + f".{int(now() * 1000) % 1000:03d}"


class Node:
    def __init__(self, i, a):
        self.i = i
        self.name = NAMES[i]
        self.ns = a.ns[i]
        self.ip = a.ips[i]
        self.port = a.port
        self.bin = a.bin
        self.home = os.path.join(a.work, "home-" + self.name)
        self.folder = os.path.join(a.work, self.name, SPACE)
        self.log = os.path.join(a.work, self.name + ".log")
        self.proc = None
        self.id = None
        self.starts = 0
        self.joined = False

    def cli(self, *args, timeout=90, check=True):
        cmd = ["ip", "netns", "exec", self.ns, self.bin, "--home", self.home, "--json", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{self.name}: {' '.join(args)}: rc {r.returncode}: {r.stderr.strip()}")
        return r

    def addr(self):
        return f"/ip4/{self.ip}/tcp/{self.port}/p2p/{self.id}"

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, peers):
        self.starts += 1
        out = self.home + ".out"
        with open(self.log, "a") as lg:
            lg.write(f"\n===== chaos: start #{self.starts} at {stamp()} =====\n")
        cmd = ["ip", "netns", "exec", self.ns, self.bin, "--home", self.home, "--json", "up",
               "--no-mdns", "--listen", f"/ip4/{self.ip}/tcp/{self.port}"]
        for p in peers:
            cmd += ["--peer", p]
        if self.joined:
            cmd += ["--folder", self.folder]
        # `ip netns exec` execs the command: the pid is shoal's own.
        with open(out, "w") as so, open(self.log, "a") as se:
            self.proc = subprocess.Popen(cmd, stdout=so, stderr=se, stdin=subprocess.DEVNULL)
        deadline = now() + 60
        while now() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: shoal up exited {self.proc.returncode} (see {self.log})")
            try:
                with open(out) as f:
                    line = f.readline()
                if line.strip():
                    self.id = json.loads(line)["device_id"]
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: shoal up printed nothing in 60 s")

    def kill9(self):
        if self.alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        self.proc = None

    def status(self):
        r = self.cli("status", timeout=20, check=False)
        if r.returncode != 0:
            return None
        try:
            v = json.loads(r.stdout)
        except ValueError:
            return None
        for s in v.get("spaces", []):
            if s.get("name") == SPACE and s.get("folder"):
                return s["folder"]
        return None


def tree(folder):
    """path -> ('d',) or ('f', sha) or ('l', target); `.shoal/` left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        if rel == ".":
            rel = ""
            dirnames[:] = [d for d in dirnames if d != ".shoal"]
        for d in list(dirnames):
            p = os.path.join(dirpath, d)
            if os.path.islink(p):
                out[os.path.join(rel, d)] = ("l", os.readlink(p))
                dirnames.remove(d)
            else:
                out[os.path.join(rel, d)] = ("d",)
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            try:
                if os.path.islink(p):
                    out[os.path.join(rel, fn)] = ("l", os.readlink(p))
                else:
                    with open(p, "rb") as f:
                        out[os.path.join(rel, fn)] = ("f", sha(f.read()))
            except OSError:
                out[os.path.join(rel, fn)] = ("?",)
    return out


def all_hashes(root):
    s = {}
    if not os.path.isdir(root):
        return s
    for dirpath, _, filenames in os.walk(root):
        for fn in filenames:
            p = os.path.join(dirpath, fn)
            try:
                if not os.path.islink(p):
                    with open(p, "rb") as f:
                        s.setdefault(sha(f.read()), p)
            except OSError:
                pass
    return s


class Chaos:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.nodes = [Node(i, a) for i in range(3)]
        self.oplog = open(os.path.join(a.work, "ops.jsonl"), "w")
        self.opn = 0
        self.ops = 0
        self.ops_failed = 0
        self.kills = 0
        self.kills_in_flight = 0
        self.partitions = 0
        self.crashes = []
        self.written = {}  # sha -> first op that wrote it
        self.last = {}  # (dev, path) -> sha of the last content dev wrote there, or None
        self.down_until = {}  # node index -> round at which it restarts
        self.parts = []  # active partitions: (kind, i, j, heal_round)
        self.t_last_op = now()
        self.round = -1

    # ---- log -------------------------------------------------------------
    def log(self, **rec):
        rec.setdefault("t", round(now(), 3))
        rec.setdefault("round", self.round)
        self.oplog.write(json.dumps(rec) + "\n")
        self.oplog.flush()

    def say(self, msg):
        print(f"chaos[{self.a.seed}] {stamp()} {msg}", flush=True)

    # ---- nodes -----------------------------------------------------------
    def peers_of(self, n):
        return [m.addr() for m in self.nodes if m is not n and m.id]

    def start(self, n):
        n.start(self.peers_of(n))
        self.log(event="start", dev=n.name, pid=n.proc.pid)

    def kill(self, n, why):
        n.kill9()
        self.kills += 1
        self.down_until[n.i] = self.round + self.rng.randint(0, 2)
        self.log(event="kill9", dev=n.name, why=why)
        self.say(f"kill -9 {n.name} ({why})")

    def check_crashes(self):
        for n in self.nodes:
            if n.proc is not None and n.proc.poll() is not None:
                rc = n.proc.returncode
                self.crashes.append({"dev": n.name, "rc": rc, "t": now(), "round": self.round})
                self.log(event="crash", dev=n.name, rc=rc)
                self.say(f"node {n.name} exited by itself, rc {rc}: see {n.log}")
                n.proc = None
                self.down_until[n.i] = self.round

    def setup(self):
        a, b, c = self.nodes
        for n in self.nodes:
            n.cli("init", "--name", n.name)
            cfg = os.path.join(n.home, "config.toml")
            text = open(cfg).read()
            # Keep every old version: retention must not be what loses a file.
            text, k = re.subn(r"(?m)^versions_max_mib = .*$", "versions_max_mib = 0", text)
            if not k:
                text += "\nversions_max_mib = 0\n"
            open(cfg, "w").write(text)
        os.makedirs(a.folder)
        a.joined = True
        self.start(a)
        self.start(b)
        self.start(c)
        for n in (b, c):
            code = json.loads(a.cli("invite", SPACE, "--role", "editor", "--expires", "1h").stdout)["code"]
            n.cli("join", code, "--folder", n.folder, "--timeout", "60s", timeout=120)
            n.joined = True
        self.say(f"paired: a={a.id} b={b.id} c={c.id}")
        if not self.wait_converged(120, need_peers=2)[0]:
            raise RuntimeError("the three nodes did not come in sync after pairing")

    # ---- partitions ------------------------------------------------------
    def ip(self, *args):
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)

    def partition(self, kind=None, i=None, j=None):
        rng = self.rng
        kind = kind or ("isolate" if rng.random() < 0.5 else "cut")
        if kind == "isolate":
            i = rng.randrange(3) if i is None else i
            if any(p[0] == "isolate" and p[1] == i for p in self.parts):
                return
            self.ip("-n", self.a.bridge, "link", "set", f"p{i}", "down")
            p = ("isolate", i, None)
            desc = f"isolate {NAMES[i]} (bridge port down)"
        else:
            if i is None:
                i, j = rng.sample(range(3), 2)
            i, j = sorted((i, j))
            if any(p[0] == "cut" and p[1] == i and p[2] == j for p in self.parts):
                return
            self.ip("-n", self.a.ns[i], "route", "add", "blackhole", self.a.ips[j] + "/32")
            self.ip("-n", self.a.ns[j], "route", "add", "blackhole", self.a.ips[i] + "/32")
            p = ("cut", i, j)
            desc = f"cut {NAMES[i]}-{NAMES[j]} (blackhole routes)"
        self.parts.append((*p, self.round + rng.randint(1, 3)))
        self.partitions += 1
        self.log(event="partition", kind=p[0], a=NAMES[p[1]], b=NAMES[p[2]] if p[2] is not None else None)
        self.say(desc)

    def heal(self, part):
        kind, i, j, _ = part
        if kind == "isolate":
            self.ip("-n", self.a.bridge, "link", "set", f"p{i}", "up")
        else:
            self.ip("-n", self.a.ns[i], "route", "del", "blackhole", self.a.ips[j] + "/32")
            self.ip("-n", self.a.ns[j], "route", "del", "blackhole", self.a.ips[i] + "/32")
        self.parts.remove(part)
        self.log(event="heal", kind=kind, a=NAMES[i], b=NAMES[j] if j is not None else None)
        self.say(f"heal {kind} {NAMES[i]}{'-' + NAMES[j] if j is not None else ''}")

    # ---- file operations ---------------------------------------------------
    def content(self, dev, kind, path, big=False):
        self.opn += 1
        head = f"chaos seed={self.a.seed} dev={dev} op={self.opn} kind={kind} path={path}\n".encode()
        n = self.rng.randint(1 << 20, 6 << 20) if big else self.rng.randint(0, 3000)
        return head + self.rng.randbytes(n)

    def wrote(self, dev, path, data, kind):
        h = sha(data)
        self.written.setdefault(h, {"op": self.ops, "dev": dev, "kind": kind, "path": path, "size": len(data)})
        self.last[(dev, path)] = h
        return h

    def forget(self, dev, prefix, whole_tree=False):
        for (d, p) in list(self.last):
            if d == dev and (p == prefix or (whole_tree and p.startswith(prefix + "/"))):
                self.last[(d, p)] = None

    def do_op(self, n, force=None, path=None, dst=None):
        rng = self.rng
        dev, root = n.name, n.folder
        P = lambda p: os.path.join(root, p)
        existing = [f for f in FILES if os.path.isfile(P(f)) and not os.path.islink(P(f))]
        dirs = [d for d in DIRS if os.path.isdir(P(d))]
        kinds = ["create", "overwrite", "replace", "append", "truncate", "delete", "rename",
                 "renamedir", "mkdir", "rmdir", "big"]
        weights = [10, 10, 10, 8, 5, 6, 6, 3, 3, 2, 3]
        kind = force or rng.choices(kinds, weights)[0]
        if path is None:
            if kind in ("append", "truncate", "delete", "rename") and not existing:
                kind = "create"
            if kind in ("renamedir", "rmdir") and not dirs:
                kind = "mkdir"
        else:  # a scripted op: its path, whatever the pools say
            existing, dirs = [path], [path]
        pick = lambda pool: path if path is not None else rng.choice(pool)
        self.ops += 1
        rec = {"op": self.ops, "dev": dev, "kind": kind, "alive": n.alive()}
        t0 = now()
        try:
            if kind in ("create", "overwrite", "replace", "big"):
                path = pick(BIGS if kind == "big" else FILES)
                rec["path"] = path
                data = self.content(dev, kind, path, big=kind == "big")
                os.makedirs(os.path.dirname(P(path)) or root, exist_ok=True)
                if kind in ("replace", "big"):
                    d, b = os.path.split(P(path))
                    tmp = os.path.join(d, f".{b}.chaos.tmp")
                    with open(tmp, "wb") as f:
                        f.write(data)
                    os.rename(tmp, P(path))
                else:
                    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if kind == "create" else os.O_TRUNC)
                    try:
                        fd = os.open(P(path), flags, 0o644)
                    except FileExistsError:
                        rec["kind"] = kind = "create->overwrite"
                        fd = os.open(P(path), os.O_WRONLY | os.O_TRUNC)
                    try:
                        w = os.write(fd, data)
                        assert w == len(data), "short write"
                    finally:
                        os.close(fd)
                rec["sha"] = self.wrote(dev, path, data, kind)
                rec["size"] = len(data)
            elif kind in ("append", "truncate"):
                path = pick(existing)
                rec["path"] = path
                fd = os.open(P(path), os.O_RDWR | (os.O_APPEND if kind == "append" else 0))
                try:
                    if kind == "append":
                        suffix = self.content(dev, kind, path)
                        os.write(fd, suffix)
                    else:
                        size = os.fstat(fd).st_size
                        os.ftruncate(fd, rng.randint(0, size))
                    # Read back through the same descriptor: exactly what
                    # this inode holds after our write.
                    os.lseek(fd, 0, os.SEEK_SET)
                    chunks = []
                    while True:
                        b = os.read(fd, 1 << 20)
                        if not b:
                            break
                        chunks.append(b)
                    data = b"".join(chunks)
                finally:
                    os.close(fd)
                rec["sha"] = self.wrote(dev, path, data, kind)
                rec["size"] = len(data)
            elif kind == "delete":
                path = pick(existing)
                rec["path"] = path
                os.unlink(P(path))
                self.forget(dev, path)
            elif kind == "rename":
                src = pick(existing)
                dst = dst or rng.choice([f for f in FILES if f != src])
                rec["path"], rec["dst"] = src, dst
                os.makedirs(os.path.dirname(P(dst)) or root, exist_ok=True)
                os.rename(P(src), P(dst))
                self.forget(dev, src)
                self.forget(dev, dst)
            elif kind == "renamedir":
                src = pick(dirs)
                cands = [d for d in DIRS if d != src and not d.startswith(src + "/")
                         and not os.path.exists(P(d))]
                if not cands and not dst:
                    raise FileExistsError("no free folder name")
                dst = dst or rng.choice(cands)
                rec["path"], rec["dst"] = src, dst
                os.makedirs(os.path.dirname(P(dst)) or root, exist_ok=True)
                os.rename(P(src), P(dst))
                self.forget(dev, src, True)
                self.forget(dev, dst, True)
            elif kind == "mkdir":
                path = pick(DIRS)
                rec["path"] = path
                os.makedirs(P(path), exist_ok=True)
            elif kind == "rmdir":
                path = pick(dirs)
                rec["path"] = path
                shutil.rmtree(P(path))
                self.forget(dev, path, True)
        except Exception as e:  # a collision with a remote change: fine, logged
            self.ops_failed += 1
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["ms"] = round((now() - t0) * 1000, 1)
        self.t_last_op = now()
        self.log(**rec)
        return rec

    # ---- the run -----------------------------------------------------------
    def restart_due(self, force=False):
        for n in self.nodes:
            if n.proc is None and (force or self.down_until.get(n.i, 0) <= self.round):
                self.start(n)
                self.say(f"restart {n.name}")

    def chaos_rounds(self):
        rng = self.rng
        for r in range(self.a.rounds):
            self.round = r
            self.check_crashes()
            for p in [p for p in self.parts if p[3] <= r]:
                self.heal(p)
            self.restart_due()
            if rng.random() < 0.3:
                self.partition()
            for _ in range(rng.randint(3, 8)):
                n = rng.choice(self.nodes)
                rec = self.do_op(n)
                alive = [m for m in self.nodes if m.alive()]
                if rec["kind"] == "big" and "error" not in rec and alive and rng.random() < 0.7:
                    # Kill while the big file is hashed, announced or in flight.
                    time.sleep(rng.uniform(0.05, 1.5))
                    alive = [m for m in self.nodes if m.alive()]
                    if alive:
                        self.kills_in_flight += 1
                        self.kill(rng.choice(alive), f"{rec['path']} from {n.name} in flight")
                elif len(alive) >= 2 and rng.random() < 0.06:
                    self.kill(rng.choice(alive), "random moment")
                time.sleep(rng.uniform(0, 0.4))
            time.sleep(rng.uniform(0.2, 2.5))
        self.round += 1

    def run_script(self, path):
        """Replays a scenario, one step a line (`#` starts a comment):
        DEV KIND PATH [DST] (a file operation: create, overwrite, replace,
        append, truncate, delete, rename, renamedir, mkdir, rmdir, big),
        kill DEV, start DEV, cut DEV DEV, isolate DEV, heal [DEV [DEV]],
        sleep SECS, settle [SECS] (wait for convergence, at most SECS)."""
        ix = {n: i for i, n in enumerate(NAMES)}
        for lineno, line in enumerate(open(path), 1):
            w = line.split("#", 1)[0].split()
            if not w:
                continue
            self.round = lineno
            self.say("step: " + " ".join(w))
            if w[0] in ix:
                self.do_op(self.nodes[ix[w[0]]], force=w[1], path=w[2] if len(w) > 2 else None,
                           dst=w[3] if len(w) > 3 else None)
            elif w[0] == "kill":
                self.kill(self.nodes[ix[w[1]]], "scripted")
            elif w[0] == "start":
                n = self.nodes[ix[w[1]]]
                if n.proc is None:
                    self.start(n)
            elif w[0] == "cut":
                self.partition("cut", ix[w[1]], ix[w[2]])
            elif w[0] == "isolate":
                self.partition("isolate", ix[w[1]])
            elif w[0] == "heal":  # heal [DEV [DEV]]: that partition, or all
                want = sorted(ix[x] for x in w[1:])
                for p in list(self.parts):
                    if not want or sorted(x for x in p[1:3] if x is not None) == want:
                        self.heal(p)
            elif w[0] == "sleep":
                time.sleep(float(w[1]))
            elif w[0] == "settle":
                self.wait_converged(float(w[1]) if len(w) > 1 else 60)
            else:
                raise ValueError(f"{path}:{lineno}: unknown step {line.strip()!r}")
        self.round += 1

    def converged_once(self, need_peers=0):
        trees = [tree(n.folder) for n in self.nodes]
        same = trees[0] == trees[1] == trees[2]
        states = [n.status() for n in self.nodes]
        ok = same and all(s is not None and s.get("state") == "in sync" and s.get("peers", 0) >= need_peers
                          for s in states)
        return ok, same, trees, states

    def wait_converged(self, timeout, need_peers=0):
        """Polls until all three say in sync and the trees are the same for
        three polls in a row (3 s at least); returns (ok, time of the first
        of those, trees, states). Also notes in self.t_identical when the
        trees alone first held still and identical that way."""
        deadline = now() + timeout
        streak_start, streak = None, 0
        same_start, same_streak = None, 0
        self.t_identical = None
        trees, states = None, None
        while now() < deadline:
            self.check_crashes()
            self.restart_due(force=True)
            ok, same, trees, states = self.converged_once(need_peers)
            if same:
                if same_streak == 0:
                    same_start = now()
                same_streak += 1
                if same_streak >= 3 and now() - same_start >= 3 and self.t_identical is None:
                    self.t_identical = same_start
            else:
                same_streak, self.t_identical = 0, None
            if ok:
                if streak == 0:
                    streak_start = now()
                streak += 1
                if streak >= 3 and now() - streak_start >= 3:
                    return True, streak_start, trees, states
            else:
                streak = 0
            time.sleep(1)
        return False, None, trees, states

    def check(self, trees):
        # Everything that survives anywhere: live files (conflict copies
        # included) and old versions of every device.
        live = {}
        versions = {}
        for n in self.nodes:
            for p, v in tree(n.folder).items():
                if v[0] == "f":
                    live.setdefault(v[1], []).append(f"{n.name}:{p}")
            for h, p in all_hashes(os.path.join(n.folder, ".shoal", "versions")).items():
                versions.setdefault(h, p)
        lost = []
        for (dev, path), h in sorted(self.last.items()):
            if h is None or h in live or h in versions:
                continue
            lost.append({"dev": dev, "path": path, "sha": h, "written_by": self.written.get(h)})
        written = set(self.written) | {EMPTY}
        torn = []
        for h, where in sorted(live.items()):
            if h not in written:
                torn.append({"sha": h, "where": where})
        return lost, torn

    def run(self):
        t_start = now()
        result = {"seed": self.a.seed, "rounds": 0 if self.a.script else self.a.rounds, "ok": False,
                  "script": self.a.script}
        try:
            self.setup()
            if self.a.script:
                self.say(f"scenario {self.a.script}")
                self.run_script(self.a.script)
            else:
                self.say(f"{self.a.rounds} rounds of chaos")
                self.chaos_rounds()
            for p in list(self.parts):
                self.heal(p)
            self.restart_due(force=True)
            self.say(f"all healed; waiting for convergence (timeout {self.a.timeout} s)")
            ok, t_conv, trees, states = self.wait_converged(self.a.timeout)
            lost, torn = self.check(trees)
            # The index as each node sees it, for the post-mortem.
            for n in self.nodes:
                for what in ("ls", "conflicts", "status"):
                    args = (what,) if what == "status" else (what, SPACE)
                    r = n.cli(*args, timeout=30, check=False)
                    with open(os.path.join(self.a.work, f"{n.name}-{what}.json"), "w") as f:
                        f.write(r.stdout or r.stderr)
            diverged = []
            if not ok and trees:
                keys = sorted(set().union(*trees))
                for k in keys:
                    vals = [t.get(k) for t in trees]
                    if not (vals[0] == vals[1] == vals[2]):
                        diverged.append({"path": k, "a": vals[0], "b": vals[1], "c": vals[2]})
            result.update({
                "ops": self.ops, "ops_failed": self.ops_failed, "kills": self.kills,
                "kills_in_flight": self.kills_in_flight, "partitions": self.partitions,
                "crashes": self.crashes, "lost": lost, "torn": torn, "converged": ok,
                "converge_secs": round(t_conv - self.t_last_op, 1) if ok else None,
                "identical_secs": round(self.t_identical - self.t_last_op, 1) if self.t_identical else None,
                "diverged": diverged[:200], "states": states,
                "files": len([v for v in (trees[0] if trees else {}).values() if v[0] == "f"]),
                "conflict_copies": len([k for k in (trees[0] if trees else {}) if ".sync-conflict-" in k]),
                "wall_secs": round(now() - t_start, 1),
            })
            result["ok"] = ok and not lost and not torn and not self.crashes
        except Exception as e:
            result["error"] = f"{type(e).__name__}: {e}"
            self.say(f"ERROR {result['error']}")
        finally:
            for n in self.nodes:
                if n.alive():
                    n.proc.send_signal(signal.SIGTERM)
            for n in self.nodes:
                if n.proc is not None:
                    try:
                        n.proc.wait(timeout=15)
                    except subprocess.TimeoutExpired:
                        n.kill9()
        with open(os.path.join(self.a.work, "result.json"), "w") as f:
            json.dump(result, f, indent=1)
        self.say(summary(result))
        for x in result.get("lost", []):
            self.say(f"LOST: {json.dumps(x)}")
        for x in result.get("torn", []):
            self.say(f"TORN: {json.dumps(x)}")
        for x in result.get("diverged", [])[:20]:
            self.say(f"DIVERGED: {json.dumps(x)}")
        return 0 if result["ok"] else 1


def summary(r):
    if "error" in r and "ops" not in r:
        return f"seed {r['seed']}: could not run: {r['error']}"
    return (f"seed {r['seed']}: {r['ops']} ops ({r['ops_failed']} failed), {r['kills']} kills "
            f"({r['kills_in_flight']} in flight), {r['partitions']} partitions, {len(r['crashes'])} crashes, "
            f"lost {len(r['lost'])}, torn {len(r['torn'])}, "
            f"converged {'in %.1f s' % r['converge_secs'] if r['converged'] else 'NO'}"
            f"{'' if r['converged'] or r.get('identical_secs') is None else ' (trees identical after %.1f s)' % r['identical_secs']}; "
            f"{r['files']} files ({r['conflict_copies']} conflict copies) -> {'PASS' if r['ok'] else 'FAIL'}")


def table(paths):
    rows = []
    for p in paths:
        try:
            rows.append(json.load(open(p)))
        except (OSError, ValueError) as e:
            print(f"{p}: {e}")
    hdr = ["seed", "rounds", "operations", "kills (in flight)", "partitions", "crashes",
           "files lost", "torn files", "seconds to converge", "result"]
    lines = []
    for r in rows:
        if "ops" not in r:
            lines.append([str(r["seed"]), str(r["rounds"]), "-", "-", "-", "-", "-", "-", "-",
                          "ERROR " + r.get("error", "")])
            continue
        lines.append([str(r["seed"]), "script" if r.get("script") else str(r["rounds"]), str(r["ops"]),
                      f"{r['kills']} ({r['kills_in_flight']})", str(r["partitions"]), str(len(r["crashes"])),
                      str(len(r["lost"])), str(len(r["torn"])),
                      f"{r['converge_secs']:.1f}" if r["converged"] else
                      ("did not (trees identical %.1f)" % r["identical_secs"] if r.get("identical_secs") is not None
                       else "did not"),
                      "PASS" if r["ok"] else "FAIL"])
    done = [r for r in rows if "ops" in r]
    conv = [r["converge_secs"] for r in done if r["converged"]]
    lines.append([f"{len(rows)} runs", str(sum(r["rounds"] for r in rows)), str(sum(r["ops"] for r in done)),
                  f"{sum(r['kills'] for r in done)} ({sum(r['kills_in_flight'] for r in done)})",
                  str(sum(r["partitions"] for r in done)), str(sum(len(r["crashes"]) for r in done)),
                  str(sum(len(r["lost"]) for r in done)), str(sum(len(r["torn"]) for r in done)),
                  f"max {max(conv):.1f}" if conv else "-",
                  f"{sum(1 for r in rows if r.get('ok'))}/{len(rows)} pass"])
    w = [max(len(hdr[i]), *(len(l[i]) for l in lines)) for i in range(len(hdr))]
    fmt = lambda l: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(l)) + " |"
    print(fmt(hdr))
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for l in lines:
        print(fmt(l))


def to_script(work):
    """Turns a run's op log into a scenario for --script: the same
    operations, kills, restarts and partitions in the same order, with the
    pauses between them (at most 3 s each). New content, same shape."""
    last = None
    print(f"# from {os.path.join(work, 'ops.jsonl')}")
    for l in open(os.path.join(work, "ops.jsonl")):
        r = json.loads(l)
        if r.get("round", 0) < 0:
            continue
        if last is not None and r["t"] - last > 0.05:
            print(f"sleep {min(r['t'] - last, 3.0):.2f}")
        last = r["t"]
        ev = r.get("event")
        if ev == "kill9":
            print(f"kill {r['dev']}")
        elif ev == "start":
            print(f"start {r['dev']}")
        elif ev == "partition":
            print(f"cut {r['a']} {r['b']}" if r["kind"] == "cut" else f"isolate {r['a']}")
        elif ev == "heal":
            print(f"heal {r['a']} {r['b'] or ''}".rstrip())
        elif ev is None and "error" not in r and "path" in r:
            kind = r["kind"].replace("create->overwrite", "overwrite")
            print(f"{r['dev']} {kind} {r['path']} {r.get('dst', '')}".rstrip())


def explain(work):
    """For a failed run: each path that the index of a node lists and its
    folder lacks, the operation that wrote that content (matched by writer,
    size and time) and where that content is on disk now."""
    ops = [json.loads(l) for l in open(os.path.join(work, "ops.jsonl"))]
    ids = {}
    for n in NAMES:
        try:
            ids[json.load(open(os.path.join(work, f"home-{n}.out")))["device_id"]] = n
        except (OSError, ValueError):
            pass
    where = {}
    for n in NAMES:
        for h, p in all_hashes(os.path.join(work, n, SPACE)).items():
            where.setdefault(h, []).append(f"{n}:{os.path.relpath(p, os.path.join(work, n, SPACE))}")
    for n in NAMES:
        try:
            listing = json.load(open(os.path.join(work, f"{n}-ls.json")))
        except (OSError, ValueError):
            continue
        for e in listing:
            if e["kind"] != "file" or os.path.exists(os.path.join(work, n, SPACE, e["path"])):
                continue
            dev = ids.get(e["device"], e["device"][-8:])
            cands = [o for o in ops if o.get("sha") and o.get("size") == e["size"] and o.get("dev") == dev
                     and abs(o["t"] - e["mtime"]) < 3]
            print(f"{n}: index lists {e['path']} ({e['size']} bytes, by {dev}, mtime "
                  f"{time.strftime('%H:%M:%S', time.gmtime(e['mtime']))}) but the folder lacks it")
            for o in cands:
                print(f"    written by op {o['op']} ({o['dev']} {o['kind']} {o['path']} at "
                      f"{time.strftime('%H:%M:%S', time.gmtime(o['t']))}); that content is now at: "
                      f"{', '.join(where.get(o['sha'], ['nowhere']))}")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--bin", required=True)
    r.add_argument("--work", required=True)
    r.add_argument("--seed", type=int, required=True)
    r.add_argument("--rounds", type=int, default=20)
    r.add_argument("--timeout", type=int, default=240)
    r.add_argument("--ns", required=True, type=lambda s: s.split(","))
    r.add_argument("--ips", required=True, type=lambda s: s.split(","))
    r.add_argument("--bridge", required=True)
    r.add_argument("--port", type=int, default=4801)
    r.add_argument("--script", help="replay a scenario instead of random rounds")
    sc = sub.add_parser("script")
    sc.add_argument("work")
    x = sub.add_parser("explain")
    x.add_argument("work")
    t = sub.add_parser("table")
    t.add_argument("results", nargs="*")
    a = ap.parse_args()
    if a.cmd == "script":
        to_script(a.work)
        return 0
    if a.cmd == "explain":
        explain(a.work)
        return 0
    if a.cmd == "table":
        table(a.results)
        return 0
    return Chaos(a).run()


if __name__ == "__main__":
    sys.exit(main())

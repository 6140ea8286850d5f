#!/usr/bin/env python3
"""Folder-sync benchmark: shoal and Syncthing side by side on a two-namespace
LAN (veth). Run through scripts/bench/folders.sh, which creates the
namespaces and builds shoal; this driver starts the nodes inside them, runs
the workloads, and prints one table.

Timing is the same for both tools: the clock starts when a change is in
place on A (files are prepared outside the folder and renamed in, or edited
in place) and stops when B's folder holds the expected content, found by
polling B's files from outside both tools.
"""

import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

MiB = 1 << 20


def ns_cmd(ns, args):
    return ["ip", "netns", "exec", ns] + list(args)


def link_bytes(ns, dev):
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", dev],
                         capture_output=True, text=True, check=True).stdout
    st = json.loads(out)[0]["stats64"]
    return st["rx"]["bytes"] + st["tx"]["bytes"]


def tree(pid):
    """pid and all its descendants (Syncthing runs a monitor and a child)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def rss_kib(pid, field):
    """Sum of `field` (VmRSS or VmHWM) over the process tree of pid."""
    total = 0
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def reset_peak(pid):
    for p in tree(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def settle():
    """Writes back what earlier steps left dirty (the prepared inputs, the
    last workload's files) before a clock starts: on a real LAN the two
    devices have a disk each, here they share one, and one tool's writeback
    should not be timed as the next workload's fsync."""
    os.sync()


def wait_until(pred, timeout, step=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def write_random(path, size):
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 8 * MiB)
            f.write(os.urandom(n))
            left -= n


def same_file(a, b):
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MiB), fb.read(8 * MiB)
            if x != y:
                return False
            if not x:
                return True


class Node:
    """A tool's node process inside a namespace."""
    proc = None

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


class Shoal(Node):
    name = "shoal"

    def __init__(self, bin_path, work, ns, ip, peer_ns=None):
        self.bin, self.ns, self.ip = bin_path, ns, ip
        self.home = os.path.join(work, f"shoal-home-{ns}")
        self.folder = os.path.join(work, f"shoal-folder-{ns}")
        self.proc = None

    def cli(self, *args):
        out = subprocess.run(ns_cmd(self.ns, [self.bin, "--home", self.home, "--json"] + list(args)),
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"shoal {args}: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def listen_addr(self):
        if TRANSPORT == "quic":
            return f"/ip4/{self.ip}/udp/4747/quic-v1"
        return f"/ip4/{self.ip}/tcp/4747"

    def start(self):
        log = open(os.path.join(os.path.dirname(self.home), f"shoal-{self.ns}.log"), "a")
        self.proc = subprocess.Popen(
            ns_cmd(self.ns, [self.bin, "--home", self.home, "--json", "up", "--no-mdns",
                             "--listen", self.listen_addr()]),
            stdout=subprocess.PIPE, stderr=log, text=True,
            env=dict(os.environ, RUST_LOG=os.environ.get("SHOAL_LOG", "warn,shoal_node=info")))
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("shoal up did not start")
        return json.loads(line)


TRANSPORT = "tcp"


def pair_shoal(a, b):
    a.start()
    b.start()
    a.cli("space", "create", "bench", "--folder", a.folder)
    code = a.cli("invite", "bench")["code"]
    b.cli("join", code, "--folder", b.folder, "--timeout", "30s")


class Syncthing(Node):
    name = "syncthing"

    def __init__(self, work, ns, ip, delay):
        self.ns, self.ip, self.delay = ns, ip, delay
        self.home = os.path.join(work, f"st-home-{ns}")
        self.folder = os.path.join(work, f"st-folder-{ns}")
        self.proc = None
        os.makedirs(self.folder, exist_ok=True)
        subprocess.run(["syncthing", "generate", "--no-default-folder", "--home", self.home],
                       capture_output=True, check=True)
        root = ET.parse(self.cfg()).getroot()
        self.id = root.find("device").get("id")

    def cfg(self):
        return os.path.join(self.home, "config.xml")

    def configure(self, peer):
        tree = ET.parse(self.cfg())
        root = tree.getroot()
        opts = root.find("options")
        for key, val in [("globalAnnounceEnabled", "false"), ("localAnnounceEnabled", "false"),
                         ("relaysEnabled", "false"), ("natEnabled", "false"), ("urAccepted", "-1"),
                         ("startBrowser", "false"), ("autoUpgradeIntervalH", "0"),
                         ("crashReportingEnabled", "false")]:
            el = opts.find(key)
            if el is None:
                el = ET.SubElement(opts, key)
            el.text = val
        for el in opts.findall("listenAddress"):
            opts.remove(el)
        ET.SubElement(opts, "listenAddress").text = f"tcp://{self.ip}:22000"
        gui = root.find("gui")
        gui.find("address").text = "127.0.0.1:8384"
        me = root.find("device")
        me.find("address").text = f"tcp://{self.ip}:22000"
        dev = ET.SubElement(root, "device", {"id": peer.id, "name": peer.ns, "compression": "never",
                                             "introducer": "false", "skipIntroductionRemovals": "false",
                                             "introducedBy": ""})
        ET.SubElement(dev, "address").text = f"tcp://{peer.ip}:22000"
        ET.SubElement(dev, "paused").text = "false"
        folder = ET.Element("folder", {"id": "bench", "label": "bench", "path": self.folder,
                                       "type": "sendreceive", "rescanIntervalS": "3600",
                                       "fsWatcherEnabled": "true", "fsWatcherDelayS": str(self.delay),
                                       "ignorePerms": "false", "autoNormalize": "true"})
        ET.SubElement(folder, "device", {"id": self.id, "introducedBy": ""})
        ET.SubElement(folder, "device", {"id": peer.id, "introducedBy": ""})
        root.insert(0, folder)
        tree.write(self.cfg())

    def start(self):
        env = dict(os.environ, STNOUPGRADE="1", STNORESTART="1")
        self.proc = subprocess.Popen(
            ns_cmd(self.ns, ["syncthing", "serve", "--home", self.home, "--no-browser",
                             "--no-restart", "--logflags=0"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def pair_syncthing(a, b):
    a.configure(b)
    b.configure(a)
    a.start()
    b.start()


def ready(a, b, timeout=120):
    """A marker written on A shows up on B: connected and sharing."""
    marker = f"ready-{time.time_ns()}"
    with open(os.path.join(a.folder, marker), "w") as f:
        f.write("x")
    if not wait_until(lambda: os.path.exists(os.path.join(b.folder, marker)), timeout, 0.05):
        raise RuntimeError(f"{a.name}: the two nodes never synced a marker")


def w_big(a, b, staging, size, ns_a, dev):
    src = os.path.join(staging, f"big-{a.name}.bin")
    write_random(src, size)
    reset_peak(a.pid)
    reset_peak(b.pid)
    dest = os.path.join(b.folder, "big.bin")
    settle()
    t0 = time.monotonic()
    os.rename(src, os.path.join(a.folder, "big.bin"))
    if not wait_until(lambda: os.path.exists(dest) and os.path.getsize(dest) == size, 600, 0.01):
        raise RuntimeError(f"{a.name}: 1 GiB never arrived")
    secs = time.monotonic() - t0
    if not same_file(os.path.join(a.folder, "big.bin"), dest):
        raise RuntimeError(f"{a.name}: the big file differs on B")
    peak = max(rss_kib(a.pid, "VmHWM"), rss_kib(b.pid, "VmHWM")) / 1024
    return {"big_s": secs, "big_mb_s": size / 1e6 / secs, "peak_rss_mb": peak}


def w_small(a, b, staging, n_dirs=100, per_dir=100):
    top = os.path.join(staging, f"small-{a.name}")
    for d in range(n_dirs):
        os.makedirs(os.path.join(top, f"d{d}"))
        for i in range(per_dir):
            with open(os.path.join(top, f"d{d}", f"f{i}"), "wb") as f:
                f.write(os.urandom(4096))
    want = n_dirs * per_dir
    dest = os.path.join(b.folder, "small")

    def count():
        # Temp files come and go under our feet: count only final names.
        n = 0
        try:
            for d in os.scandir(dest):
                if d.is_dir():
                    for e in os.scandir(d.path):
                        try:
                            if e.name.startswith("f") and e.stat().st_size == 4096:
                                n += 1
                        except OSError:
                            pass
        except OSError:
            return n
        return n

    settle()
    t0 = time.monotonic()
    os.rename(top, os.path.join(a.folder, "small"))
    if not wait_until(lambda: count() == want, 600, 0.05):
        raise RuntimeError(f"{a.name}: small files never all arrived ({count()}/{want})")
    secs = time.monotonic() - t0
    time.sleep(5)
    rest = max(rss_kib(a.pid, "VmRSS"), rss_kib(b.pid, "VmRSS")) / 1024
    return {"small_s": secs, "rest_rss_mb": rest}


def w_edit(a, b, n):
    path_a = os.path.join(a.folder, "edit.txt")
    path_b = os.path.join(b.folder, "edit.txt")
    lines = [f"line {i} of a small text file\n" for i in range(40)]
    with open(path_a, "w") as f:
        f.writelines(lines)
    body = "".join(lines)
    if not wait_until(lambda: os.path.exists(path_b) and open(path_b).read() == body, 120, 0.01):
        raise RuntimeError(f"{a.name}: edit.txt never arrived")
    times = []
    settle()
    for i in range(n):
        lines[20] = f"line 20 edited {i} {time.time_ns()}\n"
        body = "".join(lines)
        time.sleep(0.3)
        t0 = time.monotonic()
        with open(path_a, "w") as f:
            f.write(body)

        def arrived():
            try:
                with open(path_b) as f:
                    return f.read() == body
            except OSError:
                return False
        if not wait_until(arrived, 120, 0.002):
            raise RuntimeError(f"{a.name}: edit {i} never arrived")
        times.append((time.monotonic() - t0) * 1000)
    return times


def w_insert(a, b, staging, ns_a, dev, size):
    src = os.path.join(staging, f"mid-{a.name}.bin")
    write_random(src, size)
    pa, pb = os.path.join(a.folder, "mid.bin"), os.path.join(b.folder, "mid.bin")
    os.rename(src, pa)
    if not wait_until(lambda: os.path.exists(pb) and os.path.getsize(pb) == size, 600, 0.02):
        raise RuntimeError(f"{a.name}: the 256 MiB file never arrived")
    time.sleep(3)
    settle()
    before = link_bytes(ns_a, dev)
    t0 = time.monotonic()
    with open(pa, "r+b") as f:
        f.seek(size // 2)
        rest = f.read()
        f.seek(size // 2)
        f.write(b"!" + rest)
    if not wait_until(lambda: os.path.exists(pb) and os.path.getsize(pb) == size + 1, 600, 0.005):
        raise RuntimeError(f"{a.name}: the insert never arrived")
    secs = time.monotonic() - t0
    time.sleep(1)
    wire = link_bytes(ns_a, dev) - before
    if not same_file(pa, pb):
        raise RuntimeError(f"{a.name}: the edited file differs on B")
    return {"insert_s": secs, "insert_wire_mib": wire / MiB}


def w_scale(a, b, staging, n_files):
    """n small files: first complete sync, RSS, then 1,000 remote updates
    applied on a freshly restarted receiver (a cold load of a big index)."""
    per_dir = 100
    top = os.path.join(staging, f"scale-{a.name}")
    for i in range(n_files):
        d = os.path.join(top, f"d{i // per_dir}")
        if i % per_dir == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i % per_dir}"), "wb") as f:
            f.write(os.urandom(1024))
    dest = os.path.join(b.folder, "scale")

    def count():
        n = 0
        try:
            for d in os.scandir(dest):
                if d.is_dir():
                    n += sum(1 for e in os.scandir(d.path) if e.name.startswith("f"))
        except OSError:
            pass
        return n

    settle()
    t0 = time.monotonic()
    os.rename(top, os.path.join(a.folder, "scale"))
    if not wait_until(lambda: count() == n_files, 3600, 0.5):
        raise RuntimeError(f"{a.name}: scale run never completed ({count()}/{n_files})")
    first = time.monotonic() - t0
    time.sleep(5)
    rss_a, rss_b = rss_kib(a.pid, "VmRSS") / 1024, rss_kib(b.pid, "VmRSS") / 1024
    b.stop()
    b.start()
    ready(a, b)
    changed = []
    t0 = time.monotonic()
    for i in range(0, n_files, n_files // 1000):
        p = os.path.join(a.folder, "scale", f"d{i // per_dir}", f"f{i % per_dir}")
        body = os.urandom(1024)
        with open(p, "wb") as f:
            f.write(body)
        changed.append((os.path.join(dest, f"d{i // per_dir}", f"f{i % per_dir}"), body))

    def applied():
        for path, body in changed:
            try:
                with open(path, "rb") as f:
                    if f.read() != body:
                        return False
            except OSError:
                return False
        return True
    if not wait_until(applied, 1800, 0.2):
        raise RuntimeError(f"{a.name}: the 1,000 updates never all arrived")
    updates = time.monotonic() - t0
    return {"scale_first_s": first, "scale_rss_a_mb": rss_a, "scale_rss_b_mb": rss_b,
            "scale_updates_s": updates}


def run_tool(mk_pair, a, b, staging, args, edits):
    res = {}
    try:
        mk_pair(a, b)
        ready(a, b)
        only = set(args.only.split(","))
        if "big" in only:
            res.update(w_big(a, b, staging, args.big_mib * MiB, args.ns_a, args.dev))
        if "small" in only:
            res.update(w_small(a, b, staging))
        if "edit" in only:
            res["edit_ms"] = w_edit(a, b, edits)
        if "insert" in only:
            res.update(w_insert(a, b, staging, args.ns_a, args.dev, args.mid_mib * MiB))
        if "scale" in only:
            res.update(w_scale(a, b, staging, args.scale_files))
    finally:
        a.stop()
        b.stop()
    return res


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shoal", required=True)
    p.add_argument("--b3speed", required=True)
    p.add_argument("--ns-a", required=True)
    p.add_argument("--ns-b", required=True)
    p.add_argument("--ip-a", required=True)
    p.add_argument("--ip-b", required=True)
    p.add_argument("--dev", required=True, help="A's veth, for bytes on the wire")
    p.add_argument("--work", required=True)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--mid-mib", type=int, default=256)
    p.add_argument("--edits", type=int, default=20)
    p.add_argument("--default-delay-edits", type=int, default=5)
    p.add_argument("--skip-syncthing", action="store_true")
    p.add_argument("--scale-files", type=int, default=100_000)
    p.add_argument("--only", default="big,small,edit,insert",
                   help="workloads, comma-separated: big,small,edit,insert,scale "
                        "(scale, 100,000 files, is not in the default set)")
    p.add_argument("--transport", choices=["tcp", "quic"], default="tcp",
                   help="the one address shoal listens on (Syncthing keeps its defaults)")
    args = p.parse_args()
    global TRANSPORT
    TRANSPORT = args.transport
    work, staging = args.work, os.path.join(args.work, "staging")
    os.makedirs(staging, exist_ok=True)

    # Ceilings: the raw link and BLAKE3.
    srv = subprocess.Popen(ns_cmd(args.ns_b, ["iperf3", "-s", "-1", "-B", args.ip_b]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    out = subprocess.run(ns_cmd(args.ns_a, ["iperf3", "-c", args.ip_b, "-t", "3", "-J"]),
                         capture_output=True, text=True)
    srv.wait(timeout=10)
    link = json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 8e6 if out.returncode == 0 else None
    probe = os.path.join(staging, "probe.bin")
    write_random(probe, 512 * MiB)
    b3 = json.loads(subprocess.run([args.b3speed, probe], capture_output=True, text=True, check=True).stdout)
    os.remove(probe)

    results = {}
    print("running shoal...", file=sys.stderr)
    results["shoal"] = run_tool(pair_shoal, Shoal(args.shoal, work, args.ns_a, args.ip_a),
                                Shoal(args.shoal, work, args.ns_b, args.ip_b), staging, args, args.edits)
    if not args.skip_syncthing:
        print("running syncthing (watcher delay 1 s)...", file=sys.stderr)
        results["syncthing"] = run_tool(pair_syncthing, Syncthing(work + "/st1", args.ns_a, args.ip_a, 1),
                                        Syncthing(work + "/st1", args.ns_b, args.ip_b, 1), staging, args,
                                        args.edits)
        print("running syncthing (default watcher delay, edits only)...", file=sys.stderr)
        a = Syncthing(work + "/st10", args.ns_a, args.ip_a, 10)
        b = Syncthing(work + "/st10", args.ns_b, args.ip_b, 10)
        try:
            pair_syncthing(a, b)
            ready(a, b)
            results["syncthing_default_edit_ms"] = w_edit(a, b, args.default_delay_edits)
        finally:
            a.stop()
            b.stop()

    s = collections.defaultdict(lambda: None, results["shoal"])
    t = results.get("syncthing", {})
    td = results.get("syncthing_default_edit_ms")

    def ratio(x, y, invert=False):
        if x is None or y is None or x == 0 or y == 0:
            return "-"
        return f"{(y / x if not invert else x / y):.1f}x"

    def p50(v):
        return statistics.median(v) if v else None

    def top(v):
        return max(v) if v else None

    rows = [
        ("1. 1 GiB file A->B: seconds", s["big_s"], t.get("big_s"), ".2f", ratio(s["big_s"], t.get("big_s"))),
        ("1. 1 GiB file A->B: MB/s", s["big_mb_s"], t.get("big_mb_s"), ".0f",
         ratio(s["big_mb_s"], t.get("big_mb_s"), True)),
        ("2. 10,000 x 4 KiB files: seconds", s["small_s"], t.get("small_s"), ".2f",
         ratio(s["small_s"], t.get("small_s"))),
        ("3. one-line edit: p50 ms (Syncthing delay 1 s)", p50(s["edit_ms"]), p50(t.get("edit_ms")), ".1f",
         ratio(p50(s["edit_ms"]), p50(t.get("edit_ms")))),
        ("3. one-line edit: max ms (Syncthing delay 1 s)", top(s["edit_ms"]), top(t.get("edit_ms")), ".1f",
         ratio(top(s["edit_ms"]), top(t.get("edit_ms")))),
        ("3. one-line edit: p50 ms (Syncthing default 10 s)", p50(s["edit_ms"]), p50(td), ".1f",
         ratio(p50(s["edit_ms"]), p50(td))),
        ("4. 1-byte insert in 256 MiB: MiB on the wire", s["insert_wire_mib"], t.get("insert_wire_mib"), ".2f",
         ratio(s["insert_wire_mib"], t.get("insert_wire_mib"))),
        ("4. 1-byte insert in 256 MiB: seconds", s["insert_s"], t.get("insert_s"), ".2f",
         ratio(s["insert_s"], t.get("insert_s"))),
        ("5. peak RSS during 1 (larger node), MB", s["peak_rss_mb"], t.get("peak_rss_mb"), ".0f",
         ratio(s["peak_rss_mb"], t.get("peak_rss_mb"))),
        ("5. RSS at rest after 2 (larger node), MB", s["rest_rss_mb"], t.get("rest_rss_mb"), ".1f",
         ratio(s["rest_rss_mb"], t.get("rest_rss_mb"))),
    ]
    if s["scale_first_s"] is not None or t.get("scale_first_s") is not None:
        rows += [
            (f"scale: {args.scale_files:,} files, first sync s", s["scale_first_s"], t.get("scale_first_s"),
             ".1f", ratio(s["scale_first_s"], t.get("scale_first_s"))),
            ("scale: RSS of A after it, MB", s["scale_rss_a_mb"], t.get("scale_rss_a_mb"), ".0f",
             ratio(s["scale_rss_a_mb"], t.get("scale_rss_a_mb"))),
            ("scale: RSS of B after it, MB", s["scale_rss_b_mb"], t.get("scale_rss_b_mb"), ".0f",
             ratio(s["scale_rss_b_mb"], t.get("scale_rss_b_mb"))),
            ("scale: 1,000 updates on restarted B, s", s["scale_updates_s"], t.get("scale_updates_s"), ".1f",
             ratio(s["scale_updates_s"], t.get("scale_updates_s"))),
        ]
    print()
    print(f"ceilings: raw veth link (iperf3, 1 stream) {fmt(link, '.0f')} MB/s; "
          f"BLAKE3 {b3['one_core_mb_s']} MB/s on one core, {b3['all_cores_mb_s']} MB/s on all")
    print()
    print(f"| {'workload':<50} | {'shoal':>10} | {'Syncthing':>10} | {'shoal better by':>15} |")
    print(f"|{'-' * 52}|{'-' * 12}|{'-' * 12}|{'-' * 17}|")
    for name, x, y, spec, r in rows:
        print(f"| {name:<50} | {fmt(x, spec):>10} | {fmt(y, spec):>10} | {r:>15} |")
    print()
    print(f"edits: shoal {len(s['edit_ms'] or [])}, Syncthing at 1 s {len(t.get('edit_ms', []))}, "
          f"at the default delay {len(td or [])}")
    print(json.dumps(results), file=open(os.path.join(work, "results.json"), "w"))


if __name__ == "__main__":
    main()

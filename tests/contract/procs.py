"""Process and socket facts read from /proc through a testinfra host.

Only sh, grep, cut, tr and ls are needed, so the same code works on this
machine, in a slim container (no ps, no ss), on a VM over SSH and in a pod.
"""
from __future__ import annotations

from dataclasses import dataclass

SCAN = r"""
for p in /proc/[0-9]*; do
  [ -r "$p/cmdline" ] && [ "${p#/proc/}" != "$$" ] || continue  # not this scan itself
  cmd=$(tr '\000\n' '  ' < "$p/cmdline" 2>/dev/null)
  case "$cmd" in *gunicorn*) ;; *) continue ;; esac
  ppid=$(grep '^PPid:' "$p/status" | cut -f2)
  uid=$(grep '^Uid:' "$p/status" | cut -f2)
  socks=$(ls -l "$p/fd" 2>/dev/null | grep -o 'socket:\[[0-9]*\]' | tr -dc '0-9\n' | tr '\n' ,)
  echo "${p#/proc/}|$ppid|$uid|$socks|$cmd"  # cmd last: it may hold "|"
done
"""


@dataclass
class Proc:
    pid: int
    ppid: int
    uid: int
    cmdline: str
    sockets: set[str]


def gunicorn_processes(host) -> list[Proc]:
    out = host.run(SCAN)
    assert out.rc == 0, out.stderr
    procs = []
    for line in out.stdout.splitlines():
        if line.count("|") < 4 or not line.split("|", 1)[0].isdigit():
            continue  # a process that went away mid-scan
        pid, ppid, uid, socks, cmd = line.split("|", 4)
        argv = cmd.split()
        # `gunicorn` itself, or the interpreter running its script (shebang).
        if any(arg.rsplit("/", 1)[-1] == "gunicorn" for arg in argv[:2]):
            procs.append(Proc(int(pid), int(ppid), int(uid), cmd.strip(), {s for s in socks.split(",") if s}))
    return procs


def listening_inodes(host, port: int) -> set[str]:
    """Inodes of TCP sockets in LISTEN state on `port` (IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        out = host.run(f"cat {table}")
        for row in out.stdout.splitlines()[1:]:
            cols = row.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def environ(host, pid: int) -> dict[str, str]:
    out = host.run(f"tr '\\000' '\\n' < /proc/{pid}/environ")
    assert out.rc == 0, f"cannot read /proc/{pid}/environ: {out.stderr}"
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)

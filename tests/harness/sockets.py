"""Server-side TCP connections, from /proc: which process holds a client's far end, how many are open."""
import os


def _rows():
    """The columns of each row of the kernel's TCP tables (IPv4 and IPv6), with the ports as ints."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for row in fh.readlines()[1:]:
                cols = row.split()
                local, remote = int(cols[1].rsplit(":", 1)[1], 16), int(cols[2].rsplit(":", 1)[1], 16)
                yield local, remote, cols


def _inode_of(server_port: int, client_port: int) -> str | None:
    # Only an ESTABLISHED row has a socket a process holds: an earlier
    # connection from the same client port can still be listed in TIME_WAIT
    # (inode 0) when the kernel hands that port out again.
    for local, remote, cols in _rows():
        if local == server_port and remote == client_port and cols[3] == "01" and cols[9] != "0":
            return cols[9]
    return None


def established(server_port: int) -> int:
    """TCP connections established to `server_port` on this machine, counted on the server side."""
    return sum(1 for local, _, cols in _rows() if local == server_port and cols[3] == "01")  # 01: ESTABLISHED


def server_pid(server_port: int, client_port: int, pids: list[int]) -> int | None:
    inode = _inode_of(server_port, client_port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None

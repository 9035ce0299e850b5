"""Syslog sink for the test bed: one datagram socket per host, bind-mounted onto /dev/log
inside that host's private /dev (node_init.sh). Every message is appended to one file as
`<iso-time> [<host>] pid=<sender pid> <raw syslog message>`.

The machine runs no syslog daemon and we never create /dev/log in the root namespace (it
would capture other programs' logs), so this is the only place the hosts' syslog goes.
usage: python3 devlog.py OUTFILE HOST=SOCKET [HOST=SOCKET ...]
"""
import os
import select
import socket
import struct
import sys
import time


def main(argv):
    out_path, specs = argv[0], argv[1:]
    socks = {}
    for spec in specs:
        host, path = spec.split("=", 1)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(path)
        os.chmod(path, 0o666)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        socks[s] = host
    with open(out_path, "a", buffering=1) as out:
        out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [devlog] ready\n")
        while True:
            ready, _, _ = select.select(list(socks), [], [])
            for s in ready:
                data, anc, _f, _a = s.recvmsg(65536, socket.CMSG_SPACE(12))
                pid = None
                for level, typ, d in anc:
                    if level == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS:
                        pid = struct.unpack("iII", d[:12])[0]
                msg = data.decode("utf-8", "replace").rstrip("\n\x00").replace("\n", " ")
                out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{socks[s]}] pid={pid} {msg}\n")


if __name__ == "__main__":
    main(sys.argv[1:])

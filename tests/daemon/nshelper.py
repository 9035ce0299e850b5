"""Helper processes for the namespace tests (run under nsenter).

    nshelper.py listen PORT            TCP (dual-stack) + UDP listener that holds connections
    nshelper.py hold tcp|udp|tcp6mapped HOST PORT
                                       connect, print "LOCAL <ip> <port>", hold until killed
"""
import socket
import sys
import signal
import threading


def listen(port):
    t = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    t.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("::", port))
    t.listen(128)
    u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    u.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    u.bind(("::", port))
    held = []

    def acc():
        while True:
            c, _ = t.accept()
            held.append(c)
    threading.Thread(target=acc, daemon=True).start()
    print("READY", flush=True)
    signal.pause()


def hold(kind, host, port):
    if kind == "udp":
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.connect((host, port))
        s.send(b"hello")
    elif kind == "tcp6mapped":
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.connect(("::ffff:" + host, port))
    else:
        s = socket.create_connection((host, port))
    ip, lport = s.getsockname()[:2]
    print("LOCAL", ip, lport, flush=True)
    signal.pause()


if __name__ == "__main__":
    if sys.argv[1] == "listen":
        listen(int(sys.argv[2]))
    else:
        hold(sys.argv[2], sys.argv[3], int(sys.argv[4]))

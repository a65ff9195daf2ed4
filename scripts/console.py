#!/usr/bin/env python3
"""Runs shell commands in the test guest over its serial console socket.

usage: console.py SOCKET wait [TIMEOUT]      wait until the guest's shell answers
       console.py SOCKET run COMMAND [TIMEOUT] run COMMAND, print its output, exit with its status

The guest's busybox shell echoes input and ends lines with CRLF; each command is sent as one
line that prints split markers around it (tests/guest/README.md), so the echo never matches.
"""
import socket
import sys
import time


def session(path, command, timeout):
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    sock.connect(path)
    quoted = command.replace("'", "'\\''")
    sock.sendall(f"echo \"@@B\"\"N@@\"; eval '{quoted}'; echo \"@@E\"\"N:$?@@\"\n".encode())
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(command)
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("console closed")
        buf += chunk
        begin = buf.find(b"@@BN@@")
        if begin < 0:
            continue
        end = buf.find(b"@@EN:", begin)
        if end < 0:
            continue
        close = buf.find(b"@@", end + 5)
        if close < 0:
            continue
        sock.close()
        body = buf[begin + 6:end].decode(errors="replace").strip("\r\n")
        return body, int(buf[end + 5:close])


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, verb = sys.argv[1], sys.argv[2]
    if verb == "wait":
        timeout = float(sys.argv[3]) if len(sys.argv) > 3 else 60
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                session(path, "true", 2)
                return 0
            except (OSError, TimeoutError, ValueError):
                time.sleep(0.2)
        sys.exit(f"console: no shell on {path} after {timeout:.0f} s")
    if verb == "run":
        timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 30
        out, rc = session(path, sys.argv[3], timeout)
        if out:
            print(out)
        return rc
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())

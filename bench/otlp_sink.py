#!/usr/bin/env python3
"""A minimal OTLP/HTTP receiver for the tracing-cost benchmarks: reads each export, answers 200,
decodes nothing (so the benchmark measures the service, not the receiver). It shares the
machine with the server under test, so it is lean: raw sockets, one thread per connection,
every request read in place into one reused buffer (Python's http.server would parse every request's
headers through the email package and copy every body). Prints its port."""
import socket
import sys
import threading

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def serve(conn):
    """Reads requests into one buffer in place: no bytes object per read, no concatenation."""
    buffer = bytearray(4 << 20)
    view = memoryview(buffer)
    have = 0
    with conn:
        while True:
            end = buffer.find(b"\r\n\r\n", 0, have)
            while end < 0:
                if have > 65536:
                    conn.sendall(BAD)
                    return
                got = conn.recv_into(view[have:])
                if not got:
                    return
                have += got
                end = buffer.find(b"\r\n\r\n", 0, have)
            head = bytes(view[:end]).lower()
            length = 0
            at = head.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = head.find(b"\r\n", at + 2)
                length = int(head[at + 17:stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if total > len(buffer):
                conn.sendall(BAD)
                return
            while have < total:
                got = conn.recv_into(view[have:])
                if not got:
                    return
                have += got
            conn.sendall(OK)
            left = have - total
            if left:
                buffer[:left] = buffer[total:have]
            have = left


def main():
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0))
    listener.listen(16)
    print(listener.getsockname()[1], flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A minimal OTLP/HTTP receiver for the tracing-cost benchmarks: reads each export, answers 200,
decodes nothing (so the benchmark measures the service, not the receiver). It shares the
machine with the server under test, so it is lean: raw sockets, one thread per connection,
each body read into one reused buffer (Python's http.server would parse every request's
headers through the email package and copy every body). Prints its port."""
import socket
import sys
import threading

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
BAD = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def serve(conn):
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    pending = b""
    with conn:
        while True:
            while b"\r\n\r\n" not in pending:
                data = conn.recv(65536)
                if not data:
                    return
                pending += data
                if len(pending) > 65536:
                    conn.sendall(BAD)
                    return
            head, _, pending = pending.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length > len(buffer):
                conn.sendall(BAD)
                return
            taken = min(len(pending), length)
            pending = pending[taken:]
            length -= taken
            while length > 0:
                got = conn.recv_into(view[:length])
                if got == 0:
                    return
                length -= got
            conn.sendall(OK)


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

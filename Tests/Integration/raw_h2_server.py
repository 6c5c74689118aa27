"""A raw HTTP/2 server on loopback (the h2 library, one thread per connection) that records what a
client sent, frame by frame, so tests can check our client's wire behaviour from the server's side."""
import socket
import struct
import threading

import h2.config
import h2.connection
import h2.events
import h2.exceptions

REFUSED_STREAM, INTERNAL_ERROR, CANCEL = 7, 2, 8


class RawH2Server:
    """`answer(index)` decides each request, counted from 0 across connections: "ok" (an empty
    gRPC message, status 0), "refuse" (RST_STREAM REFUSED_STREAM on its headers: never seen),
    "reset" (RST_STREAM INTERNAL_ERROR once the request arrived: seen, then lost) or "hang"."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.requests = []   # the headers of each request, in arrival order
        self.resets = []     # (stream id, error code) of each RST_STREAM the client sent
        self.lock = threading.Lock()
        self.stopped = False
        threading.Thread(target=self.serve, daemon=True).start()

    @property
    def target(self):
        return f"127.0.0.1:{self.port}"

    def serve(self):
        self.listener.settimeout(0.2)
        while not self.stopped:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self.connection, args=(sock,), daemon=True).start()

    def connection(self, sock):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        decided = {}
        sock.settimeout(0.5)
        try:
            while not self.stopped:
                try:
                    chunk = sock.recv(1 << 16)
                except socket.timeout:
                    continue
                if not chunk:
                    return
                for event in conn.receive_data(chunk):
                    if isinstance(event, h2.events.RequestReceived):
                        with self.lock:
                            decided[event.stream_id] = self.answer(len(self.requests))
                            self.requests.append(dict(event.headers))
                        if decided[event.stream_id] == "refuse":
                            conn.reset_stream(event.stream_id, error_code=REFUSED_STREAM)
                    elif isinstance(event, h2.events.StreamEnded):
                        what = decided.get(event.stream_id)
                        if what == "reset":
                            conn.reset_stream(event.stream_id, error_code=INTERNAL_ERROR)
                        elif what == "ok":
                            conn.send_headers(event.stream_id, [(":status", "200"), ("content-type", "application/grpc")])
                            conn.send_data(event.stream_id, struct.pack(">BI", 0, 0))
                            conn.send_headers(event.stream_id, [("grpc-status", "0")], end_stream=True)
                    elif isinstance(event, h2.events.StreamReset) and event.remote_reset:
                        with self.lock:
                            self.resets.append((event.stream_id, event.error_code))
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            sock.close()

    def stop(self):
        self.stopped = True
        self.listener.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.stop()

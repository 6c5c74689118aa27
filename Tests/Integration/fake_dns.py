"""A tiny authoritative DNS server (UDP): answers A queries for names from lists the test can
change, so a client's re-resolution can be observed (a headless Service scaling). One name on
loopback for the balancing tests; several on a bridge address for the multi-host cluster test."""
import socket
import struct
import threading


class FakeDNS:
    def __init__(self, name=None, addresses=(), records=None, host="127.0.0.1", port=0):
        """`name` and `addresses`: one name (its list is `self.addresses`); `records`: name → list."""
        self.records = {k.rstrip(".").lower(): list(v) for k, v in (records or {}).items()}
        self.name = name.rstrip(".").lower() if name else None
        if self.name:
            self.records[self.name] = list(addresses)
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    @property
    def addresses(self):
        return self.records[self.name]

    @addresses.setter
    def addresses(self, value):
        self.records[self.name] = list(value)

    def serve(self):
        self.sock.settimeout(0.2)
        while self.running:
            try:
                data, peer = self.sock.recvfrom(512)
            except socket.timeout:
                continue
            except OSError:
                return
            reply = self.answer(data)
            if reply:
                self.sock.sendto(reply, peer)

    def answer(self, data):
        if len(data) < 12:
            return None
        query_id = data[:2]
        labels, offset = [], 12
        while offset < len(data) and data[offset] != 0:
            length = data[offset]
            labels.append(data[offset + 1:offset + 1 + length].decode().lower())
            offset += 1 + length
        question_end = offset + 5
        qtype = struct.unpack(">H", data[offset + 1:offset + 3])[0]
        self.queries += 1
        answers = []
        known = ".".join(labels) in self.records
        if known and qtype == 1:
            answers = [socket.inet_aton(a) for a in self.records[".".join(labels)]]
        # NXDOMAIN for a name it does not hold, so a resolver does not wait for another server.
        flags = 0x8180 if known else 0x8183
        header = query_id + struct.pack(">HHHHH", flags, 1, len(answers), 0, 0)
        body = data[12:question_end]
        for address in answers:
            body += struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + address
        return header + body

    def close(self):
        self.running = False
        self.sock.close()

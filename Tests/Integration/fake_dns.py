"""A tiny authoritative DNS server on loopback (UDP): answers A queries for one name from a list
the test can change, so a client's re-resolution can be observed (a headless Service scaling)."""
import socket
import struct
import threading


class FakeDNS:
    def __init__(self, name, addresses):
        self.name = name.rstrip(".").lower()
        self.addresses = list(addresses)
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

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
        if ".".join(labels) == self.name and qtype == 1:
            answers = [socket.inet_aton(a) for a in self.addresses]
        header = query_id + struct.pack(">HHHHH", 0x8180, 1, len(answers), 0, 0)
        body = data[12:question_end]
        for address in answers:
            body += struct.pack(">HHHIH", 0xC00C, 1, 1, 1, 4) + address
        return header + body

    def close(self):
        self.running = False
        self.sock.close()

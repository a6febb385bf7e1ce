"""Print the HAProxy tcp-check lines that ask a replica's gRPC health service about the inference service.

HAProxy 2.6 has no gRPC health check, and an http-check body cannot hold the NUL bytes of a gRPC
message's length prefix, so the check speaks HTTP/2 itself: the client preface, an empty SETTINGS
frame, one HEADERS frame (HPACK literals, no Huffman, no dynamic table) for
POST /grpc.health.v1.Health/Check, one DATA frame holding HealthCheckRequest{service}; then it
waits for the response message's status (SERVING = 1) in the reply's DATA frame.

    python deploy/haproxy/grpc_health_check.py   # the lines deploy/haproxy/haproxy.cfg and
                                                  # deploy/k8s/components/model-routing/haproxy.cfg hold
"""

from __future__ import annotations

SERVICE = "voxserve.inference.v1.Inference"
AUTHORITY = "inference"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _literal(index: int, value: str) -> bytes:
    """A header field without indexing whose name is entry ``index`` (< 15) of HPACK's static table."""
    raw = value.encode()
    assert index < 15 and len(raw) < 127
    return bytes([index, len(raw)]) + raw


def _literal_new_name(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return bytes([0, len(raw_name)]) + raw_name + bytes([len(raw_value)]) + raw_value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def health_request(service: str = SERVICE, scheme: str = "https", authority: str = AUTHORITY) -> bytes:
    """The bytes of one gRPC Health/Check call on a new HTTP/2 connection (stream 1)."""
    headers = (
        b"\x83"  # :method POST (static index 3)
        + (b"\x87" if scheme == "https" else b"\x86")  # :scheme https (7) / http (6)
        + _literal(4, "/grpc.health.v1.Health/Check")  # :path
        + _literal(1, authority)  # :authority
        + b"\x0f\x10" + bytes([len("application/grpc")]) + b"application/grpc"  # content-type (index 31)
        + _literal_new_name("te", "trailers")
    )  # fmt: skip
    message = b"\x0a" + bytes([len(service)]) + service.encode()  # HealthCheckRequest.service (field 1)
    grpc_message = b"\x00" + len(message).to_bytes(4, "big") + message  # not compressed, length
    return (
        PREFACE
        + _frame(0x4, 0, 0, b"")  # SETTINGS (empty)
        + _frame(0x1, 0x4, 1, headers)  # HEADERS, END_HEADERS
        + _frame(0x0, 0x1, 1, grpc_message)  # DATA, END_STREAM
    )


def check_lines(service: str = SERVICE, scheme: str = "https", authority: str = AUTHORITY) -> list[str]:
    """The tcp-check rules: send the call, wait for the response's HealthCheckResponse (a
    7-byte gRPC message: 00 00000002 08 <status>), then require status 1 (SERVING) at once."""
    return [
        "tcp-check connect default",
        f"tcp-check send-binary {health_request(service, scheme, authority).hex()}",
        'tcp-check expect rbinary 0000000002080[0-3] comment "gRPC health: no answer"',
        'tcp-check expect min-recv 0 binary 00000000020801 comment "gRPC health: NOT_SERVING"',
    ]


if __name__ == "__main__":
    print("\n".join(check_lines()))

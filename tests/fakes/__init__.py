"""Loopback fakes of CivitAI and Hugging Face, and what they share."""

#: an endless body stops here, so a client without a cap fails instead of hanging
ENDLESS_SAFETY = 64 * 1024 * 1024


def serve_endless(handler, data: bytes, sent: dict, key) -> None:
    """Answer 200 with ``data`` then zeros and no length: the body ends only when the client hangs up
    (or at ``ENDLESS_SAFETY``). ``sent[key]`` counts the bytes that went out."""
    handler.send_response(200)
    handler.send_header("Content-Type", "application/octet-stream")
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.close_connection = True
    sent[key] = 0
    block = data + bytes(65536)
    try:
        while sent[key] < ENDLESS_SAFETY:
            handler.wfile.write(block)
            sent[key] += len(block)
            block = bytes(65536)
    except OSError:  # the client stopped reading and closed: what we wanted
        pass

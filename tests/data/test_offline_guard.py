"""The suite's no-network guarantee is enforced (conftest refuses off-machine connections), not just intended."""
import socket

import pytest


def test_connections_off_this_machine_are_refused():
    with pytest.raises(OSError, match="must not use the network"):
        socket.create_connection(("93.184.216.34", 80), timeout=1)


def test_loopback_is_still_allowed():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    with socket.create_connection(server.getsockname(), timeout=1):
        pass
    server.close()

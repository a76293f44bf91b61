"""Fixtures the server test modules share: uvicorn over the harness's real engine (one server per module) and its
openai client."""
import pytest
from harness import LiveServer, make_engine


@pytest.fixture(scope="module")
def live():
    server = LiveServer(make_engine())
    yield server
    server.stop()


@pytest.fixture
def client(live):
    return live.client()

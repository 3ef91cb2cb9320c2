"""cpu (affinity), memory (hard limit, reported as oom_killed with a message) and network."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from metaflow_sandbox import Resources

ALLOC = "x = bytearray(300 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096]); print('allocated')"


def test_cpu_affinity(make) -> None:  # type: ignore[no-untyped-def]
    sb = make(resources=Resources(cpu=1))
    code, out, _ = sb.run(["sh", "-c", "nproc; python -c 'import os; print(len(os.sched_getaffinity(0)))'"])
    assert (code, out.split()) == (0, ["1", "1"])


def test_no_cpu_means_all_cpus(sandbox) -> None:  # type: ignore[no-untyped-def]
    assert sandbox.run(["nproc"])[1].strip() == str(len(os.sched_getaffinity(0)))


def test_memory_limit_kills_and_says_so(make) -> None:  # type: ignore[no-untyped-def]
    sb = make(resources=Resources(memory_mb=100))
    err: list[str] = []
    result = sb.exec(["python", "-c", ALLOC], on_stderr=err.append)
    assert result.oom_killed and result.exit_code == 137
    text = "".join(err)
    assert "memory limit of 100 MB" in text and "@resources(memory=" in text


def test_generous_memory_limit_passes(make) -> None:  # type: ignore[no-untyped-def]
    sb = make(resources=Resources(memory_mb=1000))
    out: list[str] = []
    result = sb.exec(["python", "-c", ALLOC], on_stdout=out.append)
    assert (result.exit_code, result.oom_killed, "".join(out)) == (0, False, "allocated\n")


def test_rlimit_fallback_also_reports(make, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("METAFLOW_SANDBOX_LOCAL_MEMORY_LIMITER", "rlimit")
    sb = make(resources=Resources(memory_mb=100))
    err: list[str] = []
    result = sb.exec(["python", "-c", ALLOC], on_stderr=err.append)
    assert result.oom_killed and result.exit_code != 0
    assert "memory limit of 100 MB" in "".join(err)


@pytest.fixture
def tcp_server():  # type: ignore[no-untyped-def]
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                conn.sendall(b"pong")
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


CONNECT = "import socket, sys; s = socket.create_connection(('127.0.0.1', %d), timeout=3); print(s.recv(4).decode())"


def test_network_on_by_default(sandbox, tcp_server) -> None:  # type: ignore[no-untyped-def]
    assert sandbox.run(["python", "-c", CONNECT % tcp_server])[:2] == (0, "pong\n")


def test_network_off(make, tcp_server) -> None:  # type: ignore[no-untyped-def]
    sb = make(network=False)
    code, out, err = sb.run(["python", "-c", CONNECT % tcp_server])
    assert code != 0 and "pong" not in out and "ConnectionRefused" in err


def test_more_memory_than_the_machine_has_is_refused(backend) -> None:  # type: ignore[no-untyped-def]
    from metaflow_sandbox import SandboxSpec, UnsupportedOptionError

    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    with pytest.raises(UnsupportedOptionError, match="at most %d MB" % total_mb):
        backend.create(SandboxSpec(resources=Resources(memory_mb=total_mb * 4)))
    with pytest.raises(UnsupportedOptionError, match="CPUs"):
        backend.create(SandboxSpec(resources=Resources(cpu=(os.cpu_count() or 1) + 1)))

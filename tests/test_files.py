"""Large files written direct to the disk: every byte arrives, whatever the file system allows."""

import errno
import os

import pytest

from gpt2train import files
from gpt2train.files import DirectFile, WriteError, atomic_write

BUFFER = 3 * DirectFile.ALIGN  # small buffers: many of them per file, as with a checkpoint


@pytest.fixture(autouse=True)
def small_buffers(monkeypatch):
    monkeypatch.setattr(DirectFile, "BUFFER_BYTES", BUFFER)


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 4097, BUFFER - 1, BUFFER, BUFFER + 1, 5 * BUFFER + 7])
@pytest.mark.parametrize("chunk", [1000, BUFFER + 5000])
def test_a_direct_write_holds_every_byte_written(tmp_path, size, chunk):
    data = os.urandom(size)
    atomic_write(tmp_path / "f", lambda f: [f.write(data[i : i + chunk]) for i in range(0, size, chunk)], direct=True)
    assert (tmp_path / "f").read_bytes() == data


def test_a_direct_write_goes_around_the_page_cache_where_the_file_system_allows(tmp_path, monkeypatch):
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this system")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip("this file system has no direct I/O")
    import fcntl

    seen = []
    write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: seen.append(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT) or
                        write(fd, data))
    atomic_write(tmp_path / "f", lambda f: f.write(b"x" * (2 * BUFFER + 10)), direct=True)
    assert seen[:2] == [os.O_DIRECT, os.O_DIRECT] and not seen[-1]  # the buffers direct, the last bytes not


def test_a_file_system_that_refuses_a_direct_write_gets_the_bytes_through_the_page_cache(tmp_path, monkeypatch):
    import fcntl

    write = os.write

    def refusing(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return write(fd, data)

    monkeypatch.setattr(os, "write", refusing)
    data = os.urandom(4 * BUFFER + 3)
    atomic_write(tmp_path / "f", lambda f: f.write(data), direct=True)
    assert (tmp_path / "f").read_bytes() == data


def test_a_failed_direct_write_is_one_error_with_its_reason_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"the previous file")
    write, calls = os.write, []

    def full(fd, data):
        calls.append(len(data))
        if len(calls) == 3:  # a buffer written on the writer's thread
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(WriteError, match="No space left on device"):
        atomic_write(tmp_path / "f", lambda f: f.write(os.urandom(6 * BUFFER)), direct=True)
    assert (tmp_path / "f").read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir()] == ["f"]  # no temporary file left behind


def test_direct_is_off_where_the_system_has_no_direct_io(tmp_path, monkeypatch):
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    assert files._set_direct(os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT), True) is False

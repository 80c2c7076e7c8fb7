"""The checksums files carry: of a .pt archive's bytes, and of contents (safetensors)."""

import io
import zipfile

import torch

import pytest

from gpt2train.checksum import PREFIX, ArchiveSealer, archive_sealed, content_digest, save_sealed


def sealed_file(tmp_path, obj):
    path = tmp_path / "f.pt"
    with open(path, "wb") as f:
        save_sealed(obj, f)
    return path


def test_a_sealed_archive_still_loads_and_carries_its_checksum_as_the_zip_comment(tmp_path):
    path = sealed_file(tmp_path, {"w": torch.arange(5), "note": "x"})
    assert archive_sealed(path) is True
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(5))
    with zipfile.ZipFile(path) as z:
        assert z.comment.startswith(PREFIX.encode()) and z.testzip() is None


def test_every_changed_byte_is_found(tmp_path):
    path = sealed_file(tmp_path, {"w": torch.randn(300)})
    good = path.read_bytes()
    for i in range(len(good)):  # each byte of a small file, one at a time
        path.write_bytes(good[:i] + bytes([good[i] ^ 0x04]) + good[i + 1 :])
        assert archive_sealed(path) is not True, f"byte {i} changed unnoticed"


def test_a_file_of_many_pieces_is_checked_piece_by_piece_with_every_byte_counted(tmp_path, monkeypatch):
    from gpt2train import checksum

    monkeypatch.setattr(checksum, "PIECE_BYTES", 1000)  # a few KB: many pieces, the last one short
    path = sealed_file(tmp_path, {"w": torch.randn(2000)})
    good = path.read_bytes()
    assert len(good) > 5 * 1000 and archive_sealed(path) is True
    for i in (0, 999, 1000, 4321, len(good) - 200):  # piece edges, inside, and the last piece
        path.write_bytes(good[:i] + bytes([good[i] ^ 0x10]) + good[i + 1 :])
        assert archive_sealed(path) is False, f"byte {i} changed unnoticed"
    path.write_bytes(good)
    monkeypatch.setattr(checksum, "PIECE_BYTES", 4096)  # pieces are part of the checksum's definition
    assert archive_sealed(path) is False


@pytest.mark.parametrize("chunk", [1, 2, 3, 999, 1000, 1001])
def test_the_checksum_made_while_writing_is_the_one_read_back_however_the_bytes_arrive(tmp_path, monkeypatch, chunk):
    from gpt2train import checksum

    monkeypatch.setattr(checksum, "PIECE_BYTES", 1000)  # writes that end at, before and after piece edges
    buffer = io.BytesIO()
    torch.save({"w": torch.randn(1500)}, buffer)
    archive = buffer.getvalue()
    path = tmp_path / "f.pt"
    with open(path, "wb") as f:
        sealer = ArchiveSealer(f)
        for start in range(0, len(archive), chunk):
            sealer.write(archive[start : start + chunk])
        sealer.seal()
    assert archive_sealed(path) is True
    assert path.read_bytes()[: len(archive) - 2] == archive[:-2]  # all but the comment length, as written


def test_only_a_zip_archive_without_a_comment_can_be_sealed(tmp_path):
    with open(tmp_path / "f.pt", "wb") as f:
        sealer = ArchiveSealer(f)
        sealer.write(b"not an archive at all, but long enough")
        with pytest.raises(ValueError, match="not a zip archive"):
            sealer.seal()


def test_an_archive_without_a_checksum_is_told_apart(tmp_path):
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    (tmp_path / "plain.pt").write_bytes(buffer.getvalue())
    assert archive_sealed(tmp_path / "plain.pt") is None


def test_the_content_digest_sees_every_value_and_no_order():
    a = {"x": torch.arange(6, dtype=torch.float16), "meta": {"step": 3, "name": "run"}}
    b = {"meta": {"name": "run", "step": 3}, "x": torch.arange(6, dtype=torch.float16)}
    assert content_digest(a) == content_digest(b)  # dict order is not content
    changed = {**a, "x": a["x"].clone()}
    changed["x"][5] = 7
    assert content_digest(changed) != content_digest(a)
    assert content_digest({**a, "meta": {"step": 4, "name": "run"}}) != content_digest(a)
    assert content_digest({**a, "x": a["x"].float()}) != content_digest(a)  # same values, another dtype

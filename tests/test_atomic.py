import pytest

from ldm_app.atomic import atomic_write


def test_success_replaces_the_file_and_failure_keeps_the_old_one(tmp_path):
    path = tmp_path / "grid.png"
    path.write_bytes(b"old")
    with pytest.raises(OSError):
        with atomic_write(path) as tmp:
            assert tmp.parent == path.parent and tmp.suffix == ".png"  # PIL picks the format by the suffix
            tmp.write_bytes(b"half")
            raise OSError("No space left on device")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]

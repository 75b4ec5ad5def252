"""Crash-safe writes: the temporary never shows under the final name, an old folder survives until swapped."""

from __future__ import annotations

from alignment.atomic import replace_dir, replace_symlink, write_bytes, write_text


def test_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "summary.json"
    write_text(path, "old")
    write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_replace_dir_swaps_in_the_new_folder_and_drops_the_old(tmp_path):
    final, staging = tmp_path / "model", tmp_path / ".model.partial"
    final.mkdir()
    (final / "weights").write_text("v1")
    staging.mkdir()
    (staging / "weights").write_text("v2")
    replace_dir(staging, final)
    assert (final / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    staging.mkdir()  # first publication: nothing to move aside
    (staging / "weights").write_text("v3")
    replace_dir(staging, tmp_path / "other")
    assert (tmp_path / "other" / "weights").read_text() == "v3"


def test_write_bytes_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    assert write_bytes(target, b"\x00new\xff") == target
    assert target.read_bytes() == b"\x00new\xff"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_replace_symlink_repoints_a_relative_link_and_leaves_no_temporary(tmp_path):
    for name in ("step-1", "step-2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "marker").write_text(name)
    link = tmp_path / "latest"
    replace_symlink(link, "step-1")
    assert (link / "marker").read_text() == "step-1"
    replace_symlink(link, "step-2")
    assert (link / "marker").read_text() == "step-2"
    assert link.readlink().as_posix() == "step-2"  # relative: the folder can be moved whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1", "step-2"]

"""Every kind of junk a real image folder holds, generated here: each becomes error rows with a
message that says why (or a logged, counted skip), next to a good image that is annotated as
usual, and the run finishes."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import annotator.run.device as runner
from annotator.clikit import EXIT_ROW_ERRORS
from annotator.run.device import run
from annotator.inputs.sources import printable_key
from run_helpers import FAST, by_key, make_cfg, noise_images, run_cli


def jpeg_bytes(w=64, h=48) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with a tiny IDAT: decoding it would allocate
    width*height*3 bytes, so the size must be refused from the header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def save_noise(path: Path, size=(24, 16)) -> None:
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, "PNG")


# Each maker writes one bad entry into the folder and returns (key, expected status, text the
# error must contain). The folder also holds one good image.
def zero_byte(d):
    (d / "empty.jpg").write_bytes(b"")
    return "empty.jpg", "error", "cannot identify image file"


def truncated_jpeg(d):
    data = jpeg_bytes()
    (d / "cut.jpg").write_bytes(data[: len(data) // 2])
    return "cut.jpg", "error", "truncated"


def text_named_jpg(d):
    (d / "notes.jpg").write_text("this is not an image\n")
    return "notes.jpg", "error", "cannot identify image file"


def unsupported_format(d):
    (d / "vector.png").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    return "vector.png", "error", "cannot identify image file"


def decompression_bomb(d):
    (d / "bomb.png").write_bytes(png_header_only(100_000, 100_000))  # 30 GB if decoded
    return "bomb.png", "error", "over the limit"


def one_pixel(d):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(d / "dot.png")
    return "dot.png", "ok", None


def png_named_jpg(d):  # the format is sniffed from the bytes, not the extension
    save_noise(d / "really-a-png.jpg")
    return "really-a-png.jpg", "ok", None


def broken_symlink(d):
    (d / "gone.jpg").symlink_to(d / "never-existed.jpg")
    return "gone.jpg", "error", "No such file"


def symlink_loop(d):
    (d / "loop.jpg").symlink_to(d / "loop.jpg")
    return "loop.jpg", "error", "Too many levels of symbolic links"


def non_utf8_name(d):
    name = os.fsdecode(b"caf\xe9-latin1.png")  # a Latin-1 name from an old camera or zip
    save_noise(d / name)
    return printable_key(name), "ok", None


def non_utf8_name_broken(d):  # the error message quotes the undecodable name: the row must still store
    name = os.fsdecode(b"bad-\xff\xfe.jpg")
    (d / name).write_bytes(b"")
    return "bad-\\xff\\xfe.jpg", "error", "cannot identify image file"


def unicode_name(d):
    save_noise(d / "日本語 café.png")
    return "日本語 café.png", "ok", None


CASES = [zero_byte, truncated_jpeg, text_named_jpg, unsupported_format, decompression_bomb, one_pixel,
         png_named_jpg, broken_symlink, symlink_loop, non_utf8_name, non_utf8_name_broken, unicode_name]


def annotate_folder(tiny_lm, tmp_path, make, **kw):
    d = tmp_path / "images"
    noise_images(d, 1)  # img00.png: the good neighbour
    key, status, message = make(d)
    summary = run(make_cfg(d, tmp_path / "out", "caption,od", **kw), lm=tiny_lm)
    return by_key(tmp_path / "out"), key, status, message, summary


@pytest.mark.parametrize("make", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_becomes_rows_and_the_run_goes_on(tiny_lm, tmp_path, make):
    got, key, status, message, summary = annotate_folder(tiny_lm, tmp_path, make)
    assert set(got) == {(k, t) for k in ("img00.png", key) for t in ("caption", "od")}
    assert got[("img00.png", "caption")]["status"] == "ok"
    for task in ("caption", "od"):
        row = got[(key, task)]
        assert row["status"] == status, row
        if status == "error":
            assert row["error"].startswith("decode failed:") and message in row["error"], row["error"]
    assert summary.rows_error == (2 if status == "error" else 0)


def test_error_messages_with_undecodable_names_can_be_stored():
    """Messages built from str(path) carry lone surrogates; Arrow would refuse the whole part."""
    from annotator.inputs.images import describe_error
    from annotator.outdir.table import Annotation, rows_to_table

    message = describe_error(ValueError("cannot read " + os.fsdecode(b"/x/caf\xe9.jpg")))
    assert message == "ValueError: cannot read /x/caf\\xe9.jpg"
    rows_to_table([Annotation.failed("k", "caption", message)])


def test_one_pixel_image_keeps_its_size(tiny_lm, tmp_path):
    got, key, *_ = annotate_folder(tiny_lm, tmp_path, one_pixel)
    assert (got[(key, "od")]["width"], got[(key, "od")]["height"]) == (1, 1)


def test_bomb_limit_is_configurable(tiny_lm, tmp_path):
    d = tmp_path / "images"
    noise_images(d, 2)  # 30x20 and 32x23 pixels
    run(make_cfg(d, tmp_path / "out", max_image_pixels=700), lm=tiny_lm)
    got = by_key(tmp_path / "out")
    assert got[("img00.png", "caption")]["status"] == "ok"  # 600 pixels
    assert "over the limit of 700" in got[("img01.png", "caption")]["error"]  # 736 pixels


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root reads files whatever their mode; test_unreadable_file_injected covers the path")
def test_unreadable_file(tiny_lm, tmp_path):
    def unreadable(d):
        save_noise(d / "secret.png")
        (d / "secret.png").chmod(0)
        return "secret.png", "error", "Permission denied"

    got, key, status, message, _ = annotate_folder(tiny_lm, tmp_path, unreadable)
    assert got[(key, "caption")]["status"] == "error" and message in got[(key, "caption")]["error"]


def test_unreadable_file_injected(tiny_lm, tmp_path, monkeypatch):
    """The same failure as chmod 000 for a non-root user, raised where PIL opens the file."""
    import annotator.inputs.images as images

    real_open = images.Image.open

    def open_(path, *a, **kw):
        if Path(path).name == "secret.png":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(images.Image, "open", open_)

    def secret(d):
        save_noise(d / "secret.png")
        return "secret.png", "error", "Permission denied"

    got, key, _, message, _ = annotate_folder(tiny_lm, tmp_path, secret)
    assert got[(key, "caption")]["status"] == "error" and message in got[(key, "caption")]["error"]


def test_file_deleted_between_discovery_and_decoding(tiny_lm, tmp_path, monkeypatch):
    d = tmp_path / "images"
    noise_images(d, 3)
    real_discover = runner.discover

    def discover_then_delete(*a, **kw):
        found = real_discover(*a, **kw)
        (d / "img01.png").unlink()
        return found

    monkeypatch.setattr(runner, "discover", discover_then_delete)
    summary = run(make_cfg(d, tmp_path / "out"), lm=tiny_lm)
    got = by_key(tmp_path / "out")
    assert "No such file" in got[("img01.png", "caption")]["error"] and summary.rows_error == 1
    assert got[("img00.png", "caption")]["status"] == got[("img02.png", "caption")]["status"] == "ok"


def test_same_name_in_different_subfolders(tiny_lm, tmp_path):
    d = tmp_path / "images"
    for sub in ("a", "b", "a/deeper"):
        (d / sub).mkdir(parents=True, exist_ok=True)
        save_noise(d / sub / "x.png")
    run(make_cfg(d, tmp_path / "out"), lm=tiny_lm)
    got = by_key(tmp_path / "out")
    assert sorted(k for k, _ in got) == ["a/deeper/x.png", "a/x.png", "b/x.png"]
    assert all(r["status"] == "ok" for r in got.values())


def test_unicode_names_in_two_normal_forms_are_two_images(tiny_lm, tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    save_noise(d / "caf\u00e9.png")  # NFC
    save_noise(d / "cafe\u0301.png")  # NFD: another file on Linux
    run(make_cfg(d, tmp_path / "out"), lm=tiny_lm)
    assert sorted(k for k, _ in by_key(tmp_path / "out")) == sorted(["caf\u00e9.png", "cafe\u0301.png"])


def test_fifo_named_jpg_is_skipped_not_waited_on(tiny_lm, tmp_path):
    d = tmp_path / "images"
    noise_images(d, 1)
    os.mkfifo(d / "pipe.jpg")  # opening it would block until someone writes
    summary = run(make_cfg(d, tmp_path / "out"), lm=tiny_lm)
    assert list(by_key(tmp_path / "out")) == [("img00.png", "caption")]
    assert any("not a regular file" in reason for reason in summary.skipped)


def test_symlink_outside_root_is_skipped_unless_followed(tiny_lm, tmp_path):
    d, outside = tmp_path / "images", tmp_path / "elsewhere"
    noise_images(d, 1)
    noise_images(outside, 1, start=5)
    (d / "link.png").symlink_to(outside / "img05.png")
    (d / "inside-link.png").symlink_to(d / "img00.png")  # stays inside the root: kept
    summary = run(make_cfg(d, tmp_path / "out"), lm=tiny_lm)
    assert sorted(k for k, _ in by_key(tmp_path / "out")) == ["img00.png", "inside-link.png"]
    assert any("outside the input root" in reason for reason in summary.skipped)
    summary = run(make_cfg(d, tmp_path / "out", follow_symlinks=True), lm=tiny_lm)
    assert ("link.png", "caption") in by_key(tmp_path / "out") and not summary.skipped


def test_input_given_twice_gives_one_row_per_task(tiny_lm, tmp_path):
    d = tmp_path / "images"
    noise_images(d, 2)
    run(make_cfg([d, d, d / "img00.png"], tmp_path / "out"), lm=tiny_lm)
    assert sorted(k for k, _ in by_key(tmp_path / "out")) == ["img00.png", "img01.png"]


def test_all_of_them_at_once_through_the_cli(tmp_path):
    """Decoding in DataLoader worker processes, every bad input in one folder: the run finishes
    with exit code 1 (some rows failed) and the summary counts them."""
    d = tmp_path / "images"
    noise_images(d, 2)
    expected = {}
    for make in CASES:
        key, status, _ = make(d)
        expected[key] = status
    os.mkfifo(d / "pipe.jpg")
    out = tmp_path / "out"
    proc = run_cli("run", str(d), "--out", str(out), "--tasks", "caption", *FAST, "--workers", "2",
                   "--batch-size", "3")
    assert proc.returncode == EXIT_ROW_ERRORS, proc.stderr
    got = by_key(out)
    assert {k: r["status"] for (k, _), r in got.items()} == {**expected, "img00.png": "ok", "img01.png": "ok"}
    n_err = sum(s == "error" for s in expected.values())
    assert f"rows error: {n_err}" in proc.stdout and "skipped 1: not a regular file" in proc.stdout


def test_checkpoint_code_never_runs_unless_trusted(tiny_checkpoint, tmp_path):
    """A checkpoint folder that asks for its own Python code (auto_map) is untrusted input too."""
    import json
    import shutil

    from annotator.config import ModelSpec
    from annotator.model import ModelLoadError
    from annotator.model.load import load_model

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    sentinel = tmp_path / "code-ran"
    (ckpt / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n"
                                  "from transformers import PretrainedConfig as EvilConfig, PreTrainedModel as EvilModel\n")
    config = json.loads((ckpt / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (ckpt / "config.json").write_text(json.dumps(config))
    try:
        load_model(ModelSpec(str(ckpt)), "cpu")  # the native class may load it; its code must not run
    except ModelLoadError:
        pass
    assert not sentinel.exists()

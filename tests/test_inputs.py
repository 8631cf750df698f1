"""Inputs where big datasets live: fsspec URLs (memory://, file://), globs and brace patterns,
text/CSV/Parquet lists, and webdataset/img2dataset tar shards. Offline: memory:// is an fsspec
filesystem inside this process, and the shards are written here in img2dataset's layout."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from annotator.inputs import remote
from annotator.cli import cli
from annotator.readback.info import summarize
from annotator.run.device import run
from annotator.inputs.shards import expand_braces
from annotator.inputs.sources import SourceError, _pattern_root, discover, read_list

from run_helpers import by_key, comparable, make_cfg, noise_images


@pytest.fixture
def mem(tmp_path):
    """A private folder on the process-wide memory:// filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/{tmp_path.name}"
    yield fs, f"memory://{root.lstrip('/')}"
    if fs.exists(root):
        fs.rm(root, recursive=True)


def to_memory(fs, url: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        fs.pipe("/" + url.split("://", 1)[1] + "/" + rel, data)


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20 + 3 * i, 12 + 2 * i), (40 * i % 255, 90, 200)).save(buf, fmt)
    return buf.getvalue()


def img2dataset_shard(folder: Path, shard: int, n: int) -> list[str]:
    """One shard as img2dataset writes it: NNNNN.tar with <key>.jpg/.txt/.json per sample, and
    NNNNN.parquet + NNNNN_stats.json beside it. Returns the image members' names."""
    folder.mkdir(parents=True, exist_ok=True)
    names, rows = [], []
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
        for i in range(n):
            key = f"{shard:05d}{i:04d}"
            meta = {"key": key, "url": f"https://example.invalid/{key}.jpg", "status": "success"}
            for ext, data in ((".jpg", image_bytes(shard * 10 + i, "JPEG")), (".txt", b"a caption"),
                              (".json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(key + ext)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            names.append(key + ".jpg")
            rows.append(meta)
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": n, "successes": n}))
    return names


# ------------------------------------------------------------------ keys, without the model

@pytest.mark.parametrize("spec, names", [
    ("shard-{00000..00002}.tar", ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]),
    ("s{8..11}", ["s8", "s9", "s10", "s11"]),
    ("{a,b}/{1..2}.tar", ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]),
    ("plain{}.tar", ["plain{}.tar"]),
])
def test_brace_patterns(spec, names):
    assert expand_braces(spec) == names


@pytest.mark.parametrize("spec, root", [
    ("imgs/*.png", "imgs"), ("*.png", ""), ("/data/s-{0..3}.tar", "/data"), ("/*.png", "/"),
    ("s3://bucket/shards/{00..09}.tar", "s3://bucket/shards"), ("s3://b*/x.png", "s3://"),
])
def test_pattern_root(spec, root):
    assert _pattern_root(spec) == root


def test_folder_file_url_glob_and_braces_give_the_same_keys(tmp_path, mem):
    fs, url = mem
    local = tmp_path / "imgs"
    paths = noise_images(local, 3)
    to_memory(fs, url, {p.name: p.read_bytes() for p in paths})
    want = ["img00.png", "img01.png", "img02.png"]
    for spec in (str(local), f"file://{local}", url, f"{url}/", f"{local}/*.png", f"{url}/*.png",
                 f"{local}/img{{00..02}}.png", f"{url}/img{{00..02}}.png"):
        assert [r.key for r in discover([spec]).refs] == want, spec


def test_missing_inputs_say_so(tmp_path):
    with pytest.raises(SourceError, match="matches no file"):
        discover([str(tmp_path / "*.png")])
    with pytest.raises(SourceError, match="cannot list"):
        discover(["nosuchprotocol-xyz://bucket/imgs"])


def test_lists_text_csv_parquet(tmp_path, mem):
    fs, url = mem
    noise_images(tmp_path / "imgs", 2)
    to_memory(fs, url, {"r.png": image_bytes(1)})
    entries = ["imgs/img00.png", f"{tmp_path}/imgs/img01.png", f"{url}/r.png"]
    (tmp_path / "list.txt").write_text("# my images\n\n" + "\n".join(entries + entries[:1]) + "\n")
    pq.write_table(pa.table({"url": entries, "caption": ["a", "b", "c"]}), tmp_path / "list.parquet")
    (tmp_path / "list.csv").write_text("name,where\n" + "".join(f"x,{e}\n" for e in entries))
    want = sorted(entries)
    assert read_list(str(tmp_path / "list.txt")) == entries + entries[:1]
    for spec, column in (("list.txt", None), ("list.parquet", None), ("list.csv", "where")):
        found = discover([], input_lists=[str(tmp_path / spec)], path_column=column)
        assert [r.key for r in found.refs] == want, spec  # the entry is the key; duplicates once
    with pytest.raises(SourceError, match="pass --path-column"):
        discover([], input_lists=[str(tmp_path / "list.csv")])
    with pytest.raises(SourceError, match="no column 'nope'"):
        discover([], input_lists=[str(tmp_path / "list.parquet")], path_column="nope")


def test_img2dataset_shards_keys_and_gaps(tmp_path):
    out = tmp_path / "shards"
    names = img2dataset_shard(out, 0, 3) + img2dataset_shard(out, 1, 2)
    found = discover([str(out / "{00000..00002}.tar")])  # 00002 failed in img2dataset: a gap
    assert [r.key for r in found.refs] == [f"0000{s}.tar/{n}" for s, n in zip("00011", names)]
    assert found.skipped == {"not found (named by a brace pattern)": 1}
    assert [r.key for r in discover([str(out / "*.tar")]).refs] == [r.key for r in found.refs]


# ------------------------------------------------------------------ runs

def test_memory_url_run_equals_local_run(tiny_lm, tmp_path, mem):
    fs, url = mem
    paths = noise_images(tmp_path / "imgs", 3)
    to_memory(fs, url, {f"sub/{p.name}": p.read_bytes() for p in paths})
    run(make_cfg(tmp_path / "imgs", tmp_path / "local"), lm=tiny_lm)
    run(make_cfg(f"{url}/sub", tmp_path / "remote"), lm=tiny_lm)
    assert comparable(tmp_path / "local") == comparable(tmp_path / "remote")
    info = summarize(tmp_path / "remote")
    assert info.completeness is not None and info.completeness.missing == 0


def test_shards_run_resume_and_list_of_shards(tiny_lm, tmp_path):
    out = tmp_path / "shards"
    img2dataset_shard(out, 0, 3)
    img2dataset_shard(out, 1, 2)
    spec = str(out / "{00000..00001}.tar")
    first = run(make_cfg(spec, tmp_path / "a"), lm=tiny_lm)
    got = by_key(tmp_path / "a")
    assert first.rows_ok == 5 and len(got) == 5
    row = got[("00001.tar/000010001.jpg", "caption")]
    assert (row["width"], row["height"], row["status"]) == (20 + 3 * 11, 12 + 2 * 11, "ok")
    again = run(make_cfg(spec, tmp_path / "a"), lm=tiny_lm)  # resume: nothing left to do
    assert (again.images, again.already_done) == (0, 5)
    (tmp_path / "shards.txt").write_text("shards/00000.tar\nshards/00001.tar\n")
    run(make_cfg((), tmp_path / "b", input_lists=(str(tmp_path / "shards.txt"),)), lm=tiny_lm)
    assert {k for k, _ in by_key(tmp_path / "b")} == {f"shards/{k}" for k, _ in got}


def test_flaky_remote_reads_are_retried_then_become_error_rows(tiny_lm, tmp_path, mem, monkeypatch):
    fs, url = mem
    to_memory(fs, url, {"flaky.png": image_bytes(1), "dead.png": image_bytes(2), "fine.png": image_bytes(3)})
    calls: dict[str, int] = {}
    real = remote.filesystem

    class Flaky:  # wraps the memory filesystem: flaky.png fails twice, dead.png always
        def __init__(self, inner):
            self.inner = inner

        def cat_file(self, path, **kw):
            name = path.rsplit("/", 1)[-1]
            calls[name] = calls.get(name, 0) + 1
            if name == "dead.png" or (name == "flaky.png" and calls[name] <= 2):
                raise ConnectionError("connection reset by peer")
            return self.inner.cat_file(path, **kw)

    monkeypatch.setattr(remote, "filesystem", lambda u: (Flaky(real(u)[0]), real(u)[1]))
    monkeypatch.setattr(remote, "BACKOFF", remote.Backoff(tries=3, first_delay_s=0.001))
    urls = [f"{url}/{n}" for n in ("flaky.png", "dead.png", "fine.png")]
    (tmp_path / "list.txt").write_text("\n".join(urls))
    summary = run(make_cfg((), tmp_path / "out", input_lists=(str(tmp_path / "list.txt"),)), lm=tiny_lm)
    got = by_key(tmp_path / "out")
    assert calls == {"flaky.png": 3, "dead.png": 3, "fine.png": 1}
    assert got[(urls[0], "caption")]["status"] == got[(urls[2], "caption")]["status"] == "ok"
    dead = got[(urls[1], "caption")]
    assert dead["status"] == "error" and "gave up after 3 tries" in dead["error"] and "ConnectionError" in dead["error"]
    assert summary.rows_error == 1


def test_cli_input_list_and_no_inputs(tmp_path):
    noise_images(tmp_path / "imgs", 2)
    pq.write_table(pa.table({"file": ["imgs/img00.png", "imgs/img01.png"], "n": [1, 2]}), tmp_path / "l.parquet")
    fast = ["--model", "random:tiny", "--num-beams", "1", "--max-new-tokens", "6", "--workers", "0",
            "--no-progress", "--devices", "cpu", "--tasks", "caption"]
    res = CliRunner().invoke(cli, ["run", "--input-list", str(tmp_path / "l.parquet"), "--path-column", "file",
                                   "--out", str(tmp_path / "out"), *fast])
    assert res.exit_code == 0, res.output
    assert sorted(k for k, _ in by_key(tmp_path / "out")) == ["imgs/img00.png", "imgs/img01.png"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["input_lists"] == [str(tmp_path / "l.parquet")] and manifest["path_column"] == "file"
    res = CliRunner().invoke(cli, ["run", "--out", str(tmp_path / "out2"), *fast])
    assert res.exit_code == 2 and "give INPUTS or --input-list" in res.output

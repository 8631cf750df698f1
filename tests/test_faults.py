"""Model-side faults, injected: CUDA out-of-memory halves the batch and loses nothing; an
exception that only one image triggers gives that image an error row and nobody else."""

import pytest
import torch

from annotator.run.device import run
from run_helpers import by_key, make_cfg, noise_images


def _reference(tiny_lm, tmp_path, images, tasks):
    ref_out = tmp_path / "ref"
    run(make_cfg(images, ref_out, tasks, batch_size=1), lm=tiny_lm)
    return by_key(ref_out)


def test_oom_halves_the_chunk_and_loses_nothing(tiny_lm, tmp_path, monkeypatch):
    images = tmp_path / "images"
    noise_images(images, 5)
    expected = _reference(tiny_lm, tmp_path, images, "caption,od")
    real_generate, sizes = tiny_lm.model.generate, []

    def generate(*args, **kw):
        sizes.append(kw["input_ids"].shape[0])
        if kw["input_ids"].shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_generate(*args, **kw)

    monkeypatch.setattr(tiny_lm.model, "generate", generate)
    monkeypatch.setattr("annotator.decode.engine.unsupported_reason", lambda config: "off for this test")  # the generate path (the scheduler's: test_scheduler)
    out = tmp_path / "out"
    summary = run(make_cfg(images, out, "caption,od", batch_size=5), lm=tiny_lm)
    got = by_key(out)
    assert summary.rows_error == 0 and got.keys() == expected.keys()
    assert {k: r["raw"] for k, r in got.items()} == {k: r["raw"] for k, r in expected.items()}
    # 5 images x 2 tasks share one call: 10 prompts, halved to 5, then 2, which fits
    assert sizes[:2] == [10, 5] and max(sizes[2:]) <= 2
    assert sizes.count(10) == 1 and sizes.count(5) == 1  # the engine remembers the smaller size


def test_vision_oom_halves_the_image_batch(tiny_lm, tmp_path, monkeypatch):
    images = tmp_path / "images"
    noise_images(images, 4)
    expected = _reference(tiny_lm, tmp_path, images, "caption")
    real, sizes = tiny_lm.model.get_image_features, []

    def features(pixel_values, **kw):
        sizes.append(pixel_values.shape[0])
        if pixel_values.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.")
        return real(pixel_values, **kw)

    monkeypatch.setattr(tiny_lm.model, "get_image_features", features)
    out = tmp_path / "out"
    summary = run(make_cfg(images, out, "caption", batch_size=4), lm=tiny_lm)
    assert summary.rows_error == 0
    assert {k: r["raw"] for k, r in by_key(out).items()} == {k: r["raw"] for k, r in expected.items()}
    assert sizes == [4, 2, 1, 1, 1, 1]


def _features_of(lm, path):
    from PIL import Image

    pixels = lm.processor.image_processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        return lm.model.get_image_features(pixels, return_dict=True).pooler_output[0]


@pytest.mark.parametrize("stage", ["generate", "vision"])
def test_a_fault_in_one_image_errors_only_that_image(tiny_lm, tmp_path, monkeypatch, stage):
    images = tmp_path / "images"
    paths = noise_images(images, 4)
    expected = _reference(tiny_lm, tmp_path, images, "caption,od")
    bad = _features_of(tiny_lm, paths[2])  # the model "crashes" whenever it sees this image

    if stage == "generate":
        from annotator.decode.engine import Engine

        real = Engine.encode  # the first step of every generate call, given the image features

        def faulty(self, input_ids, mask, image_features):  # image_features: [P, N, D]
            if any(torch.allclose(row, bad, atol=1e-4) for row in image_features):
                raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")
            return real(self, input_ids, mask, image_features)

        monkeypatch.setattr(Engine, "encode", faulty)
    else:
        real = tiny_lm.model.get_image_features

        def faulty(pixel_values, **kw):
            out = real(pixel_values, **kw)
            if any(torch.allclose(row, bad, atol=1e-4) for row in out.pooler_output):
                raise RuntimeError("illegal memory access")
            return out

        monkeypatch.setattr(tiny_lm.model, "get_image_features", faulty)
    out = tmp_path / "out"
    summary = run(make_cfg(images, out, "caption,od", batch_size=4), lm=tiny_lm)
    got = by_key(out)
    assert got.keys() == expected.keys() and summary.rows_error == 2
    for (image, task), row in got.items():
        if image == paths[2].name:
            assert row["status"] == "error"
            assert "CUBLAS_STATUS_EXECUTION_FAILED" in row["error"] or "illegal memory access" in row["error"]
            assert row["width"] == 30 + 2 * 2 and row["height"] == 20 + 3 * 2  # size is still known
        else:
            assert row["status"] == "ok" and row["raw"] == expected[(image, task)]["raw"]

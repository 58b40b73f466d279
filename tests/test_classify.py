"""Image classification end to end: the input pipeline (order, overlap, shutdown), the
`classify` command and `Model.classify`, against transformers on real image files."""

import json
import threading
import time

import numpy as np
import pytest
from cli_runner import one_error_line, run_cli
from PIL import Image

from jaxaccel.errors import InputError
from jaxaccel.inputs.batches import HostBatches, device_steps

skimage_data = pytest.importorskip("skimage.data", reason="test extra (scikit-image) missing")

SIDE = 64


def _pipeline_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("jaxaccel-")]


# Input pipeline ------------------------------------------------------------------------------


def test_batches_keep_input_order_with_uneven_decode_times():
    def load(i):
        time.sleep(0.002 * (7 - i % 7))  # later items finish first
        return np.full((2,), i, np.float32)

    batches = list(HostBatches(list(range(23)), load, 5, workers=4))
    assert [b.indices for b in batches] == [list(range(s, min(s + 5, 23))) for s in range(0, 23, 5)]
    assert np.concatenate([b.rows[:, 0] for b in batches]).tolist() == list(range(23))
    assert not _pipeline_threads()


def test_next_batch_is_put_before_the_current_result_is_fetched():
    events = []
    batches = HostBatches(list(range(6)), lambda i: np.zeros(1), 2, workers=2)
    put = lambda rows: events.append(("put", len(events))) or rows  # noqa: E731
    run = lambda placed: placed  # noqa: E731
    fetch = lambda out: events.append(("fetch", len(events))) or out  # noqa: E731
    list(device_steps(batches, put, run, fetch))
    assert [e[0] for e in events] == ["put", "put", "fetch", "put", "fetch", "fetch"]
    events.clear()
    list(device_steps(HostBatches(list(range(6)), lambda i: np.zeros(1), 2, workers=0),
                      put, run, fetch, prefetch=False))
    assert [e[0] for e in events] == ["put", "fetch"] * 3


def test_worker_error_reaches_the_consumer_and_threads_stop():
    def load(i):
        if i == 9:
            raise RuntimeError("decoder exploded")
        return np.zeros(1)

    with pytest.raises(RuntimeError, match="decoder exploded"):
        list(HostBatches(list(range(40)), load, 4, workers=3))
    assert not _pipeline_threads()


def test_consumer_leaving_early_stops_the_producer():
    batches = HostBatches(list(range(1000)), lambda i: np.zeros(1000), 4, workers=2, depth=2)
    for n, _ in enumerate(batches):
        if n == 2:
            break
    batches.close()
    assert not _pipeline_threads()


def test_bad_items_skipped_or_raised():
    def load(i):
        if i in (1, 4):
            raise InputError(f"item{i}: not a readable image")
        return np.zeros(1)

    with pytest.raises(InputError, match="item1"):
        list(HostBatches(list(range(6)), load, 3, workers=2))
    got = list(HostBatches(list(range(6)), load, 3, workers=2, skip_bad=True))
    assert [b.indices for b in got] == [[0, 2], [3, 5]]
    assert [f for b in got for f in b.failed] == [(1, "item1: not a readable image"),
                                                 (4, "item4: not a readable image")]


# End to end on image files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for name, fmt in (("astronaut", "JPEG"), ("chelsea", "PNG"), ("coffee", "WEBP"),
                      ("rocket", "JPEG"), ("camera", "PNG")):
        image = Image.fromarray(getattr(skimage_data, name)())
        image.thumbnail((160, 160))
        image.save(folder / f"{name}.{fmt.lower().replace('jpeg', 'jpg')}", fmt)
    return folder


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """(hf dir, checkpoint, transformers model) of a small random ResNet-18-style net."""
    pytest.importorskip("torch", reason="reference extra (torch) not installed")
    pytest.importorskip("transformers", reason="reference extra not installed")
    from jaxaccel.conversion.hf import convert
    from jaxaccel_reference.random_resnet import hf_model, write_hf

    model = hf_model(depths=(1, 1, 1, 1), hidden_sizes=(8, 16, 16, 32), layer_type="basic",
                     embedding_size=8, num_labels=7)
    root = tmp_path_factory.mktemp("resnet")
    write_hf(model, root / "hf", image_size=SIDE)
    convert(root / "hf", root / "ckpt")
    return root / "hf", root / "ckpt", model


def reference_logits(resnet, paths) -> np.ndarray:
    import torch
    import transformers

    hf, _, model = resnet
    processor = transformers.ConvNextImageProcessorPil.from_pretrained(hf)
    images = [Image.open(p).convert("RGB") for p in paths]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixels).logits.numpy()


def test_classify_files_matches_transformers_with_and_without_prefetch(resnet, photos):
    from jaxaccel.runtime.classify import Classifier
    from jaxaccel.startup.loader import load_model

    paths = sorted(photos.iterdir())
    want = reference_logits(resnet, paths)
    classifier = Classifier(load_model(resnet[1]), batch_size=2)
    for prefetch in (True, False):
        got = classifier.classify(paths, prefetch=prefetch).logits
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


def test_ctrl_c_during_classify_stops_the_decode_threads(resnet, photos, monkeypatch):
    from jaxaccel.runtime.classify import Classifier
    from jaxaccel.startup.loader import load_model

    classifier = Classifier(load_model(resnet[1]), batch_size=1)
    fetched = []

    def interrupted(logits):
        fetched.append(logits)
        if len(fetched) == 2:
            raise KeyboardInterrupt
        return np.asarray(logits)

    monkeypatch.setattr(classifier, "fetch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        classifier.classify(sorted(photos.iterdir()) * 4)
    assert not _pipeline_threads()


def test_model_classify_takes_paths_pil_images_and_arrays(resnet, photos):
    import jaxaccel

    paths = sorted(photos.iterdir())
    model = jaxaccel.load(resnet[1])
    by_path = model.classify(paths).logits
    arrays = np.stack([np.asarray(Image.open(p).convert("RGB").resize((96, 96))) for p in paths])
    by_array = model.classify(arrays).logits
    by_pil = model.classify([Image.fromarray(a) for a in arrays]).logits
    np.testing.assert_array_equal(by_array, by_pil)
    assert by_path.shape == by_array.shape == (len(paths), 7)
    top = model.classify(str(paths[0])).top_k(3)
    assert len(top) == 1 and [p["id"] for p in top[0]["top_k"]] == list(
        np.argsort(-by_path[0])[:3])
    with pytest.raises(jaxaccel.UsageError, match="classify"):
        model.embed("hello")


def test_cli_json_out_and_skip_bad(resnet, photos, tmp_path, capsys, monkeypatch):
    paths = sorted(photos.iterdir())
    want = reference_logits(resnet, paths)
    (tmp_path / "broken.jpg").write_text("not a picture")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([str(paths[0]), "broken.jpg", *map(str, paths[1:])]) + "\n")
    code, out, err = run_cli(capsys, monkeypatch, "classify", resnet[1], "--input", listing,
                             "--json", "--top-k", "2", "--skip-bad", "--batch-size", "2",
                             "--out", tmp_path / "logits.npy")
    assert code == 0, err
    result = json.loads(out)
    assert result["dtype"] == "float32" and len(result["predictions"]) == len(paths)
    assert result["predictions"][0]["image"] == str(paths[0])
    assert [p["label"] for p in result["predictions"][0]["top_k"]] == [
        f"class_{i}" for i in np.argsort(-want[0])[:2]]
    assert "broken.jpg" in result["skipped"][0]["image"] and "skipped" in err
    logits = np.load(tmp_path / "logits.npy")
    assert logits.shape == (len(paths) + 1, 7) and np.isnan(logits[1]).all()
    np.testing.assert_allclose(np.delete(logits, 1, 0), want, rtol=1e-4,
                               atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("case", ["bad_file", "empty_dir", "no_inputs", "text_model"])
def test_cli_bad_inputs_are_one_line_errors(resnet, minilm_ckpt, photos, tmp_path, capsys,
                                            monkeypatch, case):
    (tmp_path / "notes.jpg").write_text("hello")
    (tmp_path / "empty").mkdir()
    args = {"bad_file": [resnet[1], "--image", tmp_path / "notes.jpg"],
            "empty_dir": [resnet[1], "--input-dir", tmp_path / "empty"],
            "no_inputs": [resnet[1]],
            "text_model": [minilm_ckpt, "--input-dir", photos]}.get(case, [])
    code, _, err = run_cli(capsys, monkeypatch, "classify", *args)
    line = one_error_line(err)
    assert code in (1, 2)
    expected = {"bad_file": "notes.jpg", "empty_dir": "no image files", "no_inputs": "--image",
                "text_model": "classify"}[case]
    assert expected in line, line


def test_cli_truncated_jpeg_is_one_line_error_and_odd_images_classify(resnet, tmp_path, capsys,
                                                                     monkeypatch):
    """Through the command: a truncated JPEG is a one-line error naming it; a 1x1 image, a
    16-bit PNG and a CMYK JPEG are classified, as their RGB conversions are by transformers."""
    import io

    buf = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 3])
    code, _, err = run_cli(capsys, monkeypatch, "classify", resnet[1], "--image",
                           tmp_path / "cut.jpg")
    assert code in (1, 2) and "cut.jpg" in one_error_line(err)
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(odd / "dot.png")
    Image.fromarray(skimage_data.camera().astype(np.uint16) * 257).save(odd / "deep.png")
    Image.fromarray(skimage_data.chelsea()).convert("CMYK").save(odd / "cmyk.jpg")
    code, out, err = run_cli(capsys, monkeypatch, "classify", resnet[1], "--input-dir", odd,
                             "--json", "--out", tmp_path / "odd.npy")
    assert code == 0, err
    assert len(json.loads(out)["predictions"]) == 3
    paths = sorted(odd.iterdir())
    rgb = tmp_path / "rgb"
    rgb.mkdir()
    for path in paths:  # the conversions Pillow documents: I;16 -> 8 bits, CMYK -> RGB
        image = Image.open(path)
        if image.mode.startswith("I"):
            image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8))
        image.convert("RGB").save(rgb / f"{path.stem}.png")
    want = reference_logits(resnet, [rgb / f"{p.stem}.png" for p in paths])
    np.testing.assert_allclose(np.load(tmp_path / "odd.npy"), want, rtol=1e-4,
                               atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("flags, expected", [
    (["--layout", "torchvision"], "needs --family"),
    (["--family", "bert", "--layout", "torchvision"], "converts from hf"),
])
def test_convert_layout_flag_errors(resnet, tmp_path, capsys, monkeypatch, flags, expected):
    code, _, err = run_cli(capsys, monkeypatch, "convert", resnet[0], tmp_path / "out", *flags)
    assert code == 2 and expected in one_error_line(err)


def test_cli_converts_torchvision_layout_and_classifies(resnet, photos, tmp_path, capsys,
                                                        monkeypatch):
    from jaxaccel_reference.random_resnet import write_torchvision

    src = write_torchvision(resnet[2], tmp_path / "tv")
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "ckpt",
                           "--family", "resnet", "--layout", "torchvision", "-q")
    assert code == 0, err
    code, out, err = run_cli(capsys, monkeypatch, "classify", tmp_path / "ckpt",
                             "--input-dir", photos, "--top-k", "1")
    assert code == 0, err
    assert len(out.splitlines()) == len(list(photos.iterdir())) and "LABEL_" in out


def test_bench_classify_runs_every_contender(resnet, tmp_path, capsys, monkeypatch):
    """A small `bench classify`: compute (jaxaccel and PyTorch, both dtypes) and the pipeline
    (decode only, compute only, end to end with and without prefetch), in fresh processes."""
    out = tmp_path / "bench.json"
    code, _, err = run_cli(capsys, monkeypatch, "bench", "classify", resnet[1], "--batch", "2",
                           "--iters", "1", "--repeats", "1", "--num-images", "4",
                           "--json", out)
    assert code == 0, err
    result = json.loads(out.read_text())
    assert set(result["compute"]) == {"jaxaccel float32", "jaxaccel bfloat16",
                                      "pytorch eager float32", "pytorch eager bfloat16"}
    assert set(result["pipeline"]) == {"decode only", "decode only, 1 thread", "compute only",
                                       "end to end, prefetch", "end to end, no prefetch",
                                       "end to end, no prefetch, pool decode"}
    assert all(s["median"] > 0 for s in [*result["compute"].values(),
                                          *result["pipeline"].values(),
                                          *result["pipeline_cpu_s_per_image"].values()])


# Cold start: compile while restoring, persistent compile cache --------------------------------


@pytest.mark.cpu_only  # a data=2,model=4 mesh of simulated CPU devices
@pytest.mark.parametrize("overlap", [True, False])
def test_start_classifier_compiles_while_restoring(resnet, photos, overlap):
    """The forward compiled from the plan before the weights arrive serves every batch
    without tracing, and classifies as a Classifier on the plainly restored weights does."""
    from jaxaccel.startup import coldstart
    from jaxaccel.runtime.classify import Classifier
    from jaxaccel.startup.loader import load_model
    from jaxaccel.parallel.sharding import Layout

    paths = sorted(photos.iterdir())
    layout = Layout.create("data=2,model=4", "dp_tp")
    started = coldstart.start_classifier(resnet[1], layout, images=len(paths), batch_size=4,
                                         overlap=overlap)
    assert set(started.timings) >= {"plan", "restore", "compile", "ready"}
    got = started.classifier.classify(paths).logits
    assert started.classifier.forward.jitted._cache_size() == 0, "a batch traced instead of AOT"
    want = Classifier(load_model(resnet[1], layout), batch_size=4).classify(paths).logits
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, reference_logits(resnet, paths), rtol=1e-4,
                               atol=1e-3 * np.abs(want).max())


def test_second_classify_process_hits_the_compile_cache(resnet, photos, tmp_path):
    """Two fresh `jaxaccel classify --compile-cache DIR` processes: the first compiles and
    fills DIR, the second loads its executable from there; same logits."""
    import subprocess
    import sys

    count_hits = ("import json, sys, jax; hits = []; jax.monitoring.register_event_listener("
                  "lambda e, **k: hits.append(e) if e.endswith('cache_hits') else None); "
                  "from jaxaccel.cli.main import app, run_with_clean_errors; "
                  "sys.argv = ['jaxaccel', *sys.argv[1:]]; code = run_with_clean_errors(app); "
                  "print(json.dumps({'hits': len(hits)}), file=sys.stderr); sys.exit(code)")
    cache = tmp_path / "xla-cache"
    hits = []
    for run in range(2):
        out = tmp_path / f"logits{run}.npy"
        proc = subprocess.run([sys.executable, "-c", count_hits, "classify", str(resnet[1]),
                               "--input-dir", str(photos), "--batch-size", "8", "--quiet",
                               "--compile-cache", str(cache), "--out", str(out)],
                              capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr
        hits.append(json.loads(proc.stderr.strip().splitlines()[-1])["hits"])
        if run == 0:
            assert any(cache.iterdir())
    assert hits[0] == 0 and hits[1] >= 1, hits
    np.testing.assert_array_equal(np.load(tmp_path / "logits0.npy"),
                                  np.load(tmp_path / "logits1.npy"))

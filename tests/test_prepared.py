"""`hybvit prepare SPEC --out DIR` and `--data prepared:DIR`: the same arrays as the in-memory path, mapped read-only
from the files (not copied), the same trained weights, and every damaged or mismatched folder one line, exit 2."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from hybvit.cli import main
from hybvit.datasets import load_data
from hybvit.prepared import ARRAYS, content_digest, source_spec
from hybvit.resolve import is_own_data

TINY = ["--set", "model.dim=32", "--set", "model.depth=1", "--set", "model.heads=2", "--steps", "3",
        "--set", "fd_samples=0", "--set", "train.threads=1", "--quiet"]


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(err: str) -> bool:
    return err.startswith("hybvit: error: ") and err.strip().count("\n") == 0


def same_data(a, b) -> None:
    for name in ARRAYS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name
    assert (a.num_classes, a.name, a.classes) == (b.num_classes, b.name, b.classes)


def mapping_of(t: torch.Tensor) -> tuple[str, str] | None:
    """(permissions, file) of the memory mapping of this process that holds the tensor's first byte."""
    addr = t.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= addr < hi:
            return parts[1], (parts[5].strip() if len(parts) > 5 else "")
    return None


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "digits"
    assert main(["prepare", "digits", "--out", str(out)]) == 0
    return out


@pytest.fixture
def damaged(prepared, tmp_path):
    """A fresh copy of the prepared digits, for a test to damage."""
    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def test_prepare_digits_maps_the_same_arrays(prepared):
    assert sorted(p.name for p in prepared.iterdir()) == sorted([f"{n}.npy" for n in ARRAYS] + ["prepared.json"])
    assert not [p for p in prepared.parent.iterdir() if p.name.startswith(".")]      # no temporary left
    memory, mapped = load_data("digits"), load_data(f"prepared:{prepared}")
    same_data(memory, mapped)
    meta = json.loads((prepared / "prepared.json").read_text())
    assert meta["format"] == 1 and meta["name"] == "digits" and meta["shape"] == [1, 8, 8]
    assert (meta["train"], meta["test"], meta["num_classes"]) == (len(memory.x_train), len(memory.x_test), 10)
    assert meta["digest"] == content_digest({k: getattr(memory, k).numpy() for k in ARRAYS})
    for name in ARRAYS:
        # standard .npy files in the ImageData layout, readable by numpy itself
        assert np.array_equal(np.load(prepared / f"{name}.npy"), getattr(memory, name).numpy())
    if Path("/proc/self/maps").exists():     # backed by the file, read-only and shared: no copy in this process
        for name in ("x_train", "x_test"):
            perms, file = mapping_of(getattr(mapped, name))
            assert file == str((prepared / f"{name}.npy").resolve()) and perms.startswith("r-") and perms[3] == "s"
    assert load_data(f"prepared:{prepared}", 8).image_size == 8
    other = load_data(f"prepared:{prepared}", 16)                   # another size: resized in memory, as the source
    assert not other.mapped and mapped.mapped
    same_data(other, load_data("digits", 16))


def test_prepare_npz_keeps_the_source(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "own.npz"
    np.savez(src, x_train=rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8), y_train=np.arange(20) % 3,
             x_test=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8), y_test=np.arange(6) % 3)
    rc, out, _ = run_cli(capsys, "prepare", f"npz:{src}", "--out", tmp_path / "p")
    assert rc == 0 and f"prepared:{tmp_path / 'p'}" in out
    same_data(load_data(f"npz:{src}"), load_data(f"prepared:{tmp_path / 'p'}"))
    # a run on it picks the preset its source would (own-data for a user's npz)
    assert source_spec(f"prepared:{tmp_path / 'p'}") == f"npz:{src}" and is_own_data(f"prepared:{tmp_path / 'p'}")
    assert not is_own_data(f"prepared:{tmp_path / 'missing'}") and source_spec("digits") == "digits"
    rc, _, _ = run_cli(capsys, "prepare", f"npz:{src}", "--out", tmp_path / "p24", "--image-size", 24)
    assert rc == 0 and load_data(f"prepared:{tmp_path / 'p24'}").x_train.shape == (20, 3, 24, 24)


@pytest.mark.parametrize("source", ["digits", "npz"])
def test_training_on_prepared_gives_the_same_weights(prepared, tmp_path, capsys, source):
    folder = prepared
    if source == "npz":                      # a user's data: the own-data preset on both paths
        rng = np.random.default_rng(1)
        source = f"npz:{tmp_path / 'own.npz'}"
        np.savez(tmp_path / "own.npz", x_train=rng.integers(0, 256, (48, 16, 16), dtype=np.uint8),
                 y_train=np.arange(48) % 4, x_test=rng.integers(0, 256, (12, 16, 16), dtype=np.uint8),
                 y_test=np.arange(12) % 4)
        folder = tmp_path / "own-prepared"
        assert main(["prepare", source, "--out", str(folder)]) == 0
    weights, accuracy, presets = {}, {}, {}
    for name, spec in (("memory", source), ("mapped", f"prepared:{folder}")):
        rc, _, err = run_cli(capsys, "train", "--data", spec, "--out", tmp_path / name, *TINY)
        assert rc == 0, err
        weights[name] = torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)["model"]
        presets[name] = json.loads((tmp_path / name / "config.json").read_text())["preset"]
        rc, _, err = run_cli(capsys, "evaluate", "--run", tmp_path / "memory", "--data", spec, "--metrics",
                             "accuracy", "--out", tmp_path / f"{name}.json", "--no-html")
        assert rc == 0, err
        accuracy[name] = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["accuracy"]["test_accuracy"]
    assert presets["memory"] == presets["mapped"] == ("digits-hybvit" if source == "digits" else "own-data")
    assert weights["memory"].keys() == weights["mapped"].keys()
    assert all(torch.equal(weights["memory"][k], weights["mapped"][k]) for k in weights["memory"])
    assert accuracy["memory"] == accuracy["mapped"]


@pytest.mark.parametrize("cut", ["into the header", "half", "one byte"])
def test_truncated_array_is_one_line(damaged, tmp_path, capsys, cut):
    f = damaged / "x_train.npy"
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate({"into the header": 100, "half": size // 2, "one byte": size - 1}[cut])
    rc, _, err = run_cli(capsys, "train", "--data", f"prepared:{damaged}", "--out", tmp_path / "run", *TINY)
    assert rc == 2 and one_line(err) and "x_train.npy" in err and "hybvit prepare again" in err, err
    assert not (tmp_path / "run").exists()


def test_a_header_claiming_gigabytes_is_refused_before_it_is_read(damaged, tmp_path, capsys, monkeypatch):
    """A .npy whose header length field claims 4 GiB: one line, and numpy is never asked to read that header."""
    f = damaged / "x_train.npy"
    raw = f.read_bytes()                                              # magic, version 1.0, 2-byte length, ...
    f.write_bytes(raw[:6] + bytes([2, 0]) + (0xFFFFFFF0).to_bytes(4, "little") + raw[10:])   # now 2.0, 4 GiB
    monkeypatch.setattr(np.lib.format, "read_array_header_2_0", lambda *a, **k: pytest.fail("header read"))
    rc, _, err = run_cli(capsys, "train", "--data", f"prepared:{damaged}", "--out", tmp_path / "run", *TINY)
    assert rc == 2 and one_line(err) and "x_train.npy" in err and "damaged" in err, err


@pytest.mark.parametrize("field,value", [("shape", [1, 16, 16]), ("shape", [3, 8, 8]), ("train", 5),
                                         ("format", 2), ("format", True), ("classes", ["a"]),
                                         ("num_classes", "ten"), ("shape", [1, 8, 4]), ("shape", [2, 8, 8])])
def test_mismatched_json_is_one_line(damaged, tmp_path, capsys, field, value):
    meta = json.loads((damaged / "prepared.json").read_text())
    meta[field] = value
    (damaged / "prepared.json").write_text(json.dumps(meta))
    rc, _, err = run_cli(capsys, "train", "--data", f"prepared:{damaged}", "--out", tmp_path / "run", *TINY)
    assert rc == 2 and one_line(err) and "hybvit prepare again" in err, err


def test_missing_or_incomplete_folder_is_one_line(damaged, tmp_path, capsys):
    (damaged / "y_test.npy").unlink()
    for folder, words in ((tmp_path / "nowhere", "does not exist"), (damaged, "y_test.npy"),
                          (tmp_path, "prepared.json")):
        rc, _, err = run_cli(capsys, "train", "--data", f"prepared:{folder}", "--out", tmp_path / "run", *TINY)
        assert rc == 2 and one_line(err) and words in err, err
    rc, _, err = run_cli(capsys, "train", "--data", "prepared:", "--out", tmp_path / "run", *TINY)
    assert rc == 2 and one_line(err) and "needs a folder" in err


def test_prepare_refuses_an_existing_out_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    (tmp_path / "file").write_text("x")
    for out in ("full", "file"):
        rc, _, err = run_cli(capsys, "prepare", "digits", "--out", tmp_path / out)
        assert rc == 2 and one_line(err) and "exists" in err, err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    rc, _, err = run_cli(capsys, "prepare", "nonsense", "--out", tmp_path / "p")
    assert rc == 2 and one_line(err) and not (tmp_path / "p").exists()
    rc, _, err = run_cli(capsys, "prepare", "digits", "--out", tmp_path / "p", "--image-size", -3)
    assert rc == 2 and one_line(err) and not (tmp_path / "p").exists()

    calls = []

    def fail_on_second(f, a, **kw):                    # interrupted after the first array is written
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(f, a, **kw)
    write = np.lib.format.write_array
    monkeypatch.setattr(np.lib.format, "write_array", fail_on_second)
    assert main(["prepare", "digits", "--out", str(tmp_path / "p")]) == 130
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["file", "full"]          # neither the folder nor its temporary
    (tmp_path / "empty").mkdir()                                      # an empty folder is filled
    assert main(["prepare", "digits", "--out", str(tmp_path / "empty")]) == 0
    same_data(load_data("digits"), load_data(f"prepared:{tmp_path / 'empty'}"))


def test_folder_data_is_prepared_once_and_mapped_afterwards(tmp_path, monkeypatch, capsys):
    """folder:PATH decodes its images once into the prepared cache and maps them on the next load; a changed file
    gives a new key (decoded again) whose cache replaces the old one, and the cached arrays equal the decoded ones.
    `hybvit prepare` of a folder writes only its --out."""
    from PIL import Image
    import hybvit.folders as folders
    monkeypatch.setenv("HYBVIT_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "imgs" / split / c / f"{i}.png")
    decoded = []
    real = folders.load_image_files
    monkeypatch.setattr(folders, "load_image_files", lambda *a, **k: (decoded.append(1), real(*a, **k))[1])
    first = load_data(f"folder:{tmp_path / 'imgs'}")
    assert len(decoded) == 2 and "prepared arrays" in capsys.readouterr().out
    again = load_data(f"folder:{tmp_path / 'imgs'}")
    assert len(decoded) == 2                                          # nothing decoded the second time
    monkeypatch.chdir(tmp_path)
    assert load_data("folder:imgs").name == first.name and len(decoded) == 2   # a relative spec: the same cache
    same_data(first, again)
    assert mapping_of(again.x_train) is None or mapping_of(again.x_train)[1].endswith("x_train.npy")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "imgs" / "train" / "a" / "0.png")
    changed = load_data(f"folder:{tmp_path / 'imgs'}")
    assert len(decoded) == 4 and not torch.equal(changed.x_train, first.x_train)
    def cache():                                                      # (besides the hidden lock file)
        return [p for p in (tmp_path / "cache" / "prepared").iterdir() if not p.name.startswith(".")]
    kept = cache()                                                    # the new version replaced the old one
    assert len(kept) == 1 and kept[0].name.startswith("folder-") and (kept[0] / "prepared.json").is_file()
    same_data(changed, load_data(f"prepared:{kept[0]}"))
    assert main(["prepare", f"folder:{tmp_path / 'imgs'}", "--out", str(tmp_path / "p")]) == 0
    assert len(decoded) == 6 and cache() == kept                     # prepare: no cache of its own


def _image_folder(root: Path, sizes=(8, 8), per_class=3) -> Path:
    from PIL import Image
    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("test", 2)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                side = sizes[i % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
                    root / split / c / f"{i}.png")
    return root


@pytest.mark.parametrize("image_size", [0, 6])
def test_prepare_streams_a_folder_into_the_arrays_decoding_gives(tmp_path, capsys, image_size):
    """`hybvit prepare folder:` decodes image by image into the mapped files; the arrays, labels, classes and
    digest equal those of decoding the folder into memory (resized too)."""
    from hybvit.folders import list_folder
    src = _image_folder(tmp_path / "imgs", sizes=(8, 8) if not image_size else (8, 10))
    args = ["prepare", f"folder:{src}", "--out", tmp_path / "p"] + (["--image-size", image_size] if image_size else [])
    rc, out, err = run_cli(capsys, *args)
    assert rc == 0 and "6 train / 4 test images" in out, err
    memory = list_folder(src, image_size).to_data()
    same_data(load_data(f"prepared:{tmp_path / 'p'}"), memory)
    meta = json.loads((tmp_path / "p" / "prepared.json").read_text())
    assert meta["digest"] == content_digest({k: getattr(memory, k).numpy() for k in ARRAYS})
    assert meta["classes"] == ["cat", "dog"] and meta["shape"] == [3, image_size or 8, image_size or 8]


def test_prepare_of_a_folder_with_a_bad_image_is_one_line_and_leaves_nothing(tmp_path, capsys):
    src = _image_folder(tmp_path / "imgs")
    (src / "train" / "dog" / "1.png").write_bytes(b"not a png")
    rc, _, err = run_cli(capsys, "prepare", f"folder:{src}", "--out", tmp_path / "p")
    assert rc == 2 and one_line(err) and "1.png" in err, err
    assert sorted(os.listdir(tmp_path)) == ["imgs"]                  # neither the folder nor its temporary


def test_a_cache_that_cannot_be_written_decodes_into_memory(tmp_path, monkeypatch, capsys):
    """folder:PATH with $HYBVIT_CACHE on something that is not a folder: the data load all the same (in memory)."""
    from hybvit.folders import list_folder
    src = _image_folder(tmp_path / "imgs")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HYBVIT_CACHE", str(tmp_path / "file"))
    data = load_data(f"folder:{src}")
    assert not data.mapped and "prepared arrays" not in capsys.readouterr().out
    same_data(data, list_folder(src).to_data())


def test_processes_loading_one_folder_at_once_decode_it_once(tmp_path, monkeypatch):
    """Two processes load the same folder together (each decode slowed to overlap them): one decodes into the
    cache while the other waits on the lock and maps it; both get the same arrays. A leftover cache folder
    without prepared.json is replaced, not trusted."""
    import subprocess
    import sys
    src = _image_folder(tmp_path / "imgs")
    code = ("import sys, time, numpy as np, hybvit.folders as f\n"
            "real = f.load_image_files\n"
            "def slow(*a, **k):\n"
            f"    open({str(tmp_path / 'decodes.txt')!r}, 'a').write('x')\n"
            "    time.sleep(1.5)\n"
            "    return real(*a, **k)\n"
            "f.load_image_files = slow\n"
            "from hybvit.datasets import load_data\n"
            f"d = load_data('folder:{src}')\n"
            "np.save(sys.argv[1], d.x_train.numpy())\n")
    env = dict(os.environ, HYBVIT_CACHE=str(tmp_path / "cache"))
    (tmp_path / "cache" / "prepared").mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"x{i}.npy")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum("prepared arrays" in out for out, _ in outs) == 1, outs          # written once
    assert (tmp_path / "decodes.txt").read_text() == "xx"                       # decoded once: train, test
    assert np.array_equal(np.load(tmp_path / "x0.npy"), np.load(tmp_path / "x1.npy"))
    cache = [p for p in (tmp_path / "cache" / "prepared").iterdir() if not p.name.startswith(".")]
    assert len(cache) == 1
    for f in cache[0].iterdir():                                               # half removed: made again
        f.unlink()
    monkeypatch.setenv("HYBVIT_CACHE", str(tmp_path / "cache"))
    data = load_data(f"folder:{src}")
    assert data.mapped and np.array_equal(data.x_train.numpy(), np.load(tmp_path / "x0.npy"))

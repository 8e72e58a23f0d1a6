"""checkpoints/: HF directory validation, safetensors headers, streamed (sharded) tensor loading."""

import json
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file

import checkpoints.loader as loader_mod
from checkpoints import (
    CheckpointError,
    HFModelDir,
    TensorEntry,
    load_stacked,
    load_tensor,
    read_safetensors_header,
)
from sharding import logical_sharding, make_mesh

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "vocab_size": 16}


def _rand(shape, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32).astype(dtype)


def make_single(root: Path, tensors: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(CONFIG))
    save_file(tensors, str(root / "model.safetensors"))
    return root


def make_sharded(root: Path, parts: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(CONFIG))
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file(part, str(root / fname))
        weight_map.update(dict.fromkeys(part, fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


@pytest.fixture
def mesh():
    return make_mesh(2)


@pytest.fixture
def tensors():
    return {
        "embed": _rand((16, 8), seed=1),
        "w_bf16": _rand((6, 8), ml_dtypes.bfloat16, seed=2),   # torch [out, in]
        "w_f16": _rand((8, 4), np.float16, seed=3),
        "w_i8": np.arange(-16, 16, dtype=np.int8).reshape(4, 8),
        "w_f8": _rand((4, 6), ml_dtypes.float8_e4m3fn, seed=4),
        "norm": _rand((8,), seed=5),
    }


# ---------------------------------------------------------------- HFModelDir

def test_single_file_dir(tmp_path, tensors):
    root = make_single(tmp_path / "m", tensors)
    (root / "tokenizer.json").write_text("{}")
    (root / "tokenizer_config.json").write_text("{}")
    d = HFModelDir(root)
    assert d.config == CONFIG
    assert d.tensor_names() == sorted(tensors)
    assert d.index_path is None
    assert d.safetensors_files == (root / "model.safetensors",)
    assert set(d.tokenizer_files) == {"tokenizer.json", "tokenizer_config.json"}
    shape, dtype, file = d.tensor_info("w_bf16")
    assert (shape, dtype, file) == ((6, 8), "BF16", str(root / "model.safetensors"))
    assert d.tensor_info("w_f8").dtype == "F8_E4M3"
    assert d.tensor_info("w_i8").dtype == "I8"
    assert "embed" in d and "nope" not in d
    d.check_shape("embed", (16, 8))
    assert "6 tensors in 1 file" in repr(d)


def test_sharded_dir_with_index(tmp_path, tensors):
    names = sorted(tensors)
    parts = [{n: tensors[n] for n in names[:3]}, {n: tensors[n] for n in names[3:]}]
    root = make_sharded(tmp_path / "m", parts)
    d = HFModelDir(str(root))
    assert d.index_path == root / "model.safetensors.index.json"
    assert d.tensor_names() == names
    assert len(d.safetensors_files) == 2
    assert d.tensor_info(names[0]).file.endswith("model-00001-of-00002.safetensors")
    assert d.tensor_info(names[-1]).file.endswith("model-00002-of-00002.safetensors")


def test_several_files_without_index(tmp_path, tensors):
    root = make_single(tmp_path / "m", {"embed": tensors["embed"]})
    save_file({"norm": tensors["norm"]}, str(root / "extra.safetensors"))
    d = HFModelDir(root)
    assert d.tensor_names() == ["embed", "norm"]
    assert d.tensor_info("norm").file == str(root / "extra.safetensors")
    save_file({"embed": tensors["embed"]}, str(root / "dup.safetensors"))
    with pytest.raises(CheckpointError, match="'embed' is in both") as e:
        HFModelDir(root)
    assert "dup.safetensors" in str(e.value) and "model.safetensors" in str(e.value)


# ---------------------------------------------------------------- loading

def test_load_replicated_and_sharded(tmp_path, tensors, mesh):
    d = HFModelDir(make_single(tmp_path / "m", tensors))
    rep = load_tensor(d, "embed", sharding=NamedSharding(mesh, PartitionSpec()), dtype=jax.numpy.float32)
    assert rep.sharding.is_fully_replicated and rep.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(rep), tensors["embed"])

    rows = load_tensor(d, "embed", sharding=logical_sharding(mesh, ("vocab", "embed")), dtype="float32",
                       expected_shape=(16, 8))
    assert [s.data.shape for s in rows.addressable_shards] == [(8, 8), (8, 8)]
    np.testing.assert_array_equal(np.asarray(rows.addressable_shards[1].data), tensors["embed"][8:])
    np.testing.assert_array_equal(np.asarray(rows), tensors["embed"])

    cols = load_tensor(d, "embed", sharding=logical_sharding(mesh, ("embed", "mlp")), dtype="bfloat16")
    assert cols.dtype == jax.numpy.bfloat16
    assert [s.data.shape for s in cols.addressable_shards] == [(16, 4), (16, 4)]
    np.testing.assert_array_equal(np.asarray(cols), tensors["embed"].astype(ml_dtypes.bfloat16))


def test_load_from_index_dir_and_path(tmp_path, tensors, mesh):
    root = make_sharded(tmp_path / "m", [{"embed": tensors["embed"]}, {"w_bf16": tensors["w_bf16"]}])
    out = load_tensor(root, "w_bf16", sharding=logical_sharding(mesh, ("mlp", "embed")), dtype="float32")
    np.testing.assert_array_equal(np.asarray(out), tensors["w_bf16"].astype(np.float32))


def test_transposed_bf16_sharded_on_transposed_axis(tmp_path, tensors, mesh):
    d = HFModelDir(make_single(tmp_path / "m", tensors))
    w = tensors["w_bf16"]  # [out=6, in=8] -> [in=8, out=6], out sharded over tensor
    out = load_tensor(d, "w_bf16", sharding=logical_sharding(mesh, ("embed", "mlp")), dtype="float32",
                      expected_shape=(8, 6), transpose=True)
    assert out.shape == (8, 6)
    assert [s.data.shape for s in out.addressable_shards] == [(8, 3), (8, 3)]
    np.testing.assert_array_equal(np.asarray(out.addressable_shards[0].data), w.T[:, :3].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(out), w.T.astype(np.float32))
    # and along the other transposed axis, keeping bf16
    out2 = load_tensor(d, "w_bf16", sharding=logical_sharding(mesh, ("mlp", "embed")), dtype="bfloat16",
                       transpose=True)
    np.testing.assert_array_equal(np.asarray(out2), w.T)


@pytest.mark.parametrize("name,target", [
    ("w_f16", "float32"), ("w_f16", "bfloat16"), ("w_i8", "float32"), ("w_i8", "int8"),
    ("w_f8", "bfloat16"), ("w_f8", "float32"), ("norm", "float16"),
])
def test_source_dtypes(tmp_path, tensors, mesh, name, target):
    d = HFModelDir(make_single(tmp_path / "m", tensors))
    axes = ("mlp",) if tensors[name].ndim == 1 else ("embed", "mlp")
    out = load_tensor(d, name, sharding=logical_sharding(mesh, axes), dtype=target)
    assert out.dtype == np.dtype(jax.numpy.dtype(target))
    np.testing.assert_array_equal(np.asarray(out), tensors[name].astype(jax.numpy.dtype(target)))


def test_streams_only_the_shard(tmp_path, tensors, mesh, monkeypatch):
    """Each read covers one device's shard, never the whole tensor, transposed or not (a
    transposed tensor is read in its stored layout: the source slice of the device's shard)."""
    d = HFModelDir(make_single(tmp_path / "m", tensors))
    reads = []
    real = loader_mod._fill

    def spy(maps, entry, index, out):
        real(maps, entry, index, out)
        reads.append(out.shape)

    monkeypatch.setattr(loader_mod, "_fill", spy)
    load_tensor(d, "embed", sharding=logical_sharding(mesh, ("vocab", "embed")), dtype="float32")
    load_tensor(d, "w_bf16", sharding=logical_sharding(mesh, ("embed", "mlp")), dtype="float32",
                transpose=True)
    assert reads == [(8, 8), (8, 8), (3, 8), (3, 8)]


def test_transposed_on_one_device(tmp_path, tensors):
    """A replicated non-named sharding (one device) transposes too."""
    d = HFModelDir(make_single(tmp_path / "m", tensors))
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out = load_tensor(d, "w_bf16", sharding=dev, dtype="bfloat16", transpose=True)
    assert out.sharding == dev
    np.testing.assert_array_equal(np.asarray(out), tensors["w_bf16"].T)


def test_load_stacked(tmp_path, mesh):
    layers = {f"layers.{i}.w": _rand((6, 4), ml_dtypes.bfloat16, seed=10 + i) for i in range(4)}
    root = make_sharded(tmp_path / "m", [dict(list(layers.items())[:2]), dict(list(layers.items())[2:])])
    names = list(layers)
    expected = np.stack([layers[n].T for n in names]).astype(np.float32)  # [4, 4, 6]
    sharded_inner = load_stacked(root, names, sharding=logical_sharding(mesh, ("layers", "embed", "mlp")),
                                 dtype="float32", expected_shape=(4, 6), transpose=True)
    assert sharded_inner.shape == (4, 4, 6)
    assert [s.data.shape for s in sharded_inner.addressable_shards] == [(4, 4, 3), (4, 4, 3)]
    np.testing.assert_array_equal(np.asarray(sharded_inner), expected)
    by_layer = load_stacked(root, names, sharding=NamedSharding(mesh, PartitionSpec("tensor")),
                            dtype="float32", transpose=True)
    assert [s.data.shape for s in by_layer.addressable_shards] == [(2, 4, 6), (2, 4, 6)]
    np.testing.assert_array_equal(np.asarray(by_layer), expected)
    with pytest.raises(ValueError, match="at least one"):
        load_stacked(root, [], sharding=NamedSharding(mesh, PartitionSpec()), dtype="float32")


# ---------------------------------------------------------------- errors

def _raises(fn, *fragments):
    with pytest.raises(CheckpointError) as e:
        fn()
    msg = str(e.value)
    for frag in fragments:
        assert str(frag) in msg, f"{frag!r} not in {msg!r}"
    return msg


def test_dir_errors(tmp_path, tensors):
    _raises(lambda: HFModelDir(tmp_path / "missing"), tmp_path / "missing", "does not exist")
    (tmp_path / "afile").write_text("x")
    _raises(lambda: HFModelDir(tmp_path / "afile"), tmp_path / "afile", "not a directory")
    (tmp_path / "noconf").mkdir()
    _raises(lambda: HFModelDir(tmp_path / "noconf"), tmp_path / "noconf" / "config.json",
            "missing config.json")
    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    _raises(lambda: HFModelDir(bad), bad / "config.json", "invalid JSON")
    (bad / "config.json").write_text("[1, 2]")
    _raises(lambda: HFModelDir(bad), bad / "config.json", "JSON object")
    (bad / "config.json").write_text("{}")
    _raises(lambda: HFModelDir(bad), bad, "no *.safetensors")


def test_index_errors(tmp_path, tensors):
    root = make_sharded(tmp_path / "m", [{"embed": tensors["embed"]}, {"norm": tensors["norm"]}])
    index = root / "model.safetensors.index.json"
    (root / "model-00002-of-00002.safetensors").unlink()
    _raises(lambda: HFModelDir(root), index, "'norm'", root / "model-00002-of-00002.safetensors",
            "does not exist")
    index.write_text(json.dumps({"weight_map": {"embed": "model-00001-of-00002.safetensors",
                                                "ghost": "model-00001-of-00002.safetensors"}}))
    _raises(lambda: HFModelDir(root), index, "'ghost'", "model-00001-of-00002.safetensors",
            "does not contain")
    index.write_text("{oops")
    _raises(lambda: HFModelDir(root), index, "invalid JSON")
    index.write_text(json.dumps({"metadata": {}}))
    _raises(lambda: HFModelDir(root), index, "weight_map")


def test_header_errors(tmp_path, tensors):
    root = make_single(tmp_path / "m", {"embed": tensors["embed"]})
    f = root / "model.safetensors"
    good = f.read_bytes()
    f.write_bytes(good[:5])
    _raises(lambda: HFModelDir(root), f, "truncated")
    f.write_bytes(good[:40])  # header cut off
    _raises(lambda: HFModelDir(root), f, "truncated safetensors header")
    f.write_bytes(struct.pack("<Q", 2) + b"{[" + b"\0" * 16)
    _raises(lambda: HFModelDir(root), f, "not valid JSON")
    f.write_bytes(good[:-4])  # data cut short: names the tensor whose bytes are missing
    _raises(lambda: HFModelDir(root), f, "'embed'", "truncated file")
    header = json.dumps({"embed": {"dtype": "F32", "shape": [16, 8], "data_offsets": [0, 100]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    _raises(lambda: HFModelDir(root), f, "'embed'", "needs 512")
    header = json.dumps({"embed": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    _raises(lambda: HFModelDir(root), f, "'embed'", "shape")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_safetensors_header(tmp_path / "nowhere.safetensors")


def test_load_errors(tmp_path, tensors, mesh):
    root = make_single(tmp_path / "m", tensors)
    f = root / "model.safetensors"
    d = HFModelDir(root)
    rep = NamedSharding(mesh, PartitionSpec())
    _raises(lambda: load_tensor(d, "embd", sharding=rep, dtype="float32"), "'embd'", root, "did you mean")
    _raises(lambda: load_tensor(d, "embed", sharding=rep, dtype="float32", expected_shape=(8, 16)),
            "'embed'", f, "(16, 8)", "expected (8, 16)")
    _raises(lambda: load_tensor(d, "w_bf16", sharding=rep, dtype="float32", expected_shape=(6, 8),
                                transpose=True),
            "'w_bf16'", f, "(8, 6)", "stored as (6, 8)", "expected (6, 8)")
    _raises(lambda: d.check_shape("norm", (4,)), "'norm'", f, "(8,)", "expected (4,)")
    _raises(lambda: load_stacked(d, ["embed", "w_i8"], sharding=rep, dtype="float32"),
            "'w_i8'", "'embed'", f, "share one shape")
    # The file shrinks after the directory was validated: the loader names file and tensor.
    f.write_bytes(f.read_bytes()[:-10])
    last = max(d.tensor_names(), key=lambda n: d.tensor_entry(n).data_end)
    _raises(lambda: load_tensor(d, last, sharding=rep, dtype="float32"), f"{last!r}", f, "truncated")


def test_unsupported_dtype(tmp_path, mesh):
    root = tmp_path / "m"
    root.mkdir()
    (root / "config.json").write_text("{}")
    header = json.dumps({"q": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}).encode()
    f = root / "model.safetensors"
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    d = HFModelDir(root)  # listing works; only loading it fails
    assert d.tensor_info("q").dtype == "F4"
    _raises(lambda: load_tensor(d, "q", sharding=NamedSharding(mesh, PartitionSpec()), dtype="float32"),
            "'q'", f, "unsupported safetensors dtype 'F4'")


def test_byte_range_is_one_run_or_none():
    e = TensorEntry(name="t", dtype="BF16", shape=(4, 3, 5), file="f", data_start=100, data_end=220)
    full = (slice(None),) * 3
    assert loader_mod._byte_range(e, full) == (100, 220)
    assert loader_mod._byte_range(e, (slice(1, 3), slice(None), slice(None))) == (130, 190)
    assert loader_mod._byte_range(e, (slice(2, 3), slice(1, 2), slice(None))) == (170, 180)
    assert loader_mod._byte_range(e, (slice(None), slice(None), slice(0, 2))) is None   # columns
    assert loader_mod._byte_range(e, (slice(0, 4, 2), slice(None), slice(None))) is None   # a step
    assert loader_mod._byte_range(e, (slice(1, 3), slice(0, 1), slice(None))) is None   # rows of a part
    assert loader_mod._byte_range(e, (slice(2, 2), slice(None), slice(None))) is None   # empty


def test_direct_reads_and_mapped_reads_agree(tmp_path, tensors, mesh, monkeypatch):
    """Row shards are read straight from the file (in the stored dtype, also when the result is
    cast: the cast runs on the device), column shards through the memory map; both give the
    tensor's values."""
    d = HFModelDir(make_single(tmp_path / "m", tensors))
    runs = []
    real = loader_mod._byte_range
    monkeypatch.setattr(loader_mod, "_byte_range", lambda e, i: runs.append(real(e, i)) or runs[-1])
    w = tensors["w_bf16"]
    rows = load_tensor(d, "w_bf16", sharding=logical_sharding(mesh, ("mlp", "embed")), dtype="bfloat16")
    assert all(r is not None for r in runs) and len(runs) == 2
    np.testing.assert_array_equal(np.asarray(rows).view(np.uint16), w.view(np.uint16))
    runs.clear()
    cols = load_tensor(d, "w_bf16", sharding=logical_sharding(mesh, ("embed", "mlp")), dtype="bfloat16")
    assert runs == [None, None]
    np.testing.assert_array_equal(np.asarray(cols).view(np.uint16), w.view(np.uint16))
    runs.clear()
    as_f32 = load_tensor(d, "w_bf16", sharding=logical_sharding(mesh, ("mlp", "embed")), dtype="float32")
    assert len(runs) == 2 and all(r is not None for r in runs)
    np.testing.assert_array_equal(np.asarray(as_f32), w.astype(np.float32))


def test_read_dtype_and_mixed_or_wide_stored_dtypes(tmp_path, mesh):
    """Shards are read in the stored dtype unless the layers disagree or a device array cannot
    hold it (64-bit without x64): then in the target dtype, cast on the host."""
    bf16, f16, f64 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float64)
    assert loader_mod._read_dtype([bf16, bf16], f16) == bf16
    assert loader_mod._read_dtype([bf16, f16], np.dtype(np.float32)) == np.float32
    assert loader_mod._read_dtype([f64], np.dtype(np.float32)) == np.float32
    layers = {"a": _rand((6, 4), ml_dtypes.bfloat16, seed=3), "b": _rand((6, 4), np.float16, seed=4),
              "c": _rand((6, 4), np.float64, seed=5)}
    root = make_single(tmp_path / "m", layers)
    mixed = load_stacked(root, ["a", "b"], sharding=logical_sharding(mesh, ("layers", "embed", "mlp")),
                         dtype="float32", transpose=True)
    want = np.stack([layers["a"].T, layers["b"].T]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(mixed), want)
    wide = load_tensor(root, "c", sharding=logical_sharding(mesh, ("mlp", "embed")), dtype="float32")
    np.testing.assert_array_equal(np.asarray(wide), layers["c"].astype(np.float32))


def test_pread_into_reads_chunks_in_parallel_and_stops_at_eof(tmp_path, monkeypatch):
    monkeypatch.setattr(loader_mod, "_READ_CHUNK", 64)
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.tobytes())
    buf = np.zeros(900, np.uint8)
    assert loader_mod._pread_into(str(path), 100, buf) == 900   # 15 chunks, 8 threads
    np.testing.assert_array_equal(buf, data[100:])
    short = np.zeros(950, np.uint8)
    assert loader_mod._pread_into(str(path), 100, short) == 900   # the file ends first
    np.testing.assert_array_equal(short[:900], data[100:])

"""Orbax checkpoints: `jserve convert` output serves the same tokens as the HF directory, on the
same and on a different tensor-parallel size, and bad directories fail by name."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from engine_helpers import run_tokens
from fixture_paths import GOLDEN

from checkpoints import CheckpointError, HFModelDir
from checkpoints.orbax_dir import METADATA_FILE, OrbaxModelDir, is_orbax_dir
from jserve.cli import main as cli_main
from jserve.config import ModelConfig
from jserve.convert import convert
from jserve.model.orbax_params import restore_params
from jserve.model.params import load_params
from jserve.sampling_params import SamplingParams
from sharding import make_mesh

ROOT = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def orbax_dirs(tmp_path_factory):
    """{arch: orbax dir} converted through the CLI (llama) and the function (qwen2)."""
    root = tmp_path_factory.mktemp("orbax")
    assert cli_main(["convert", "--model", str(GOLDEN / "llama"), "--output", str(root / "llama"),
                     "--dtype", "float32"]) == 0
    convert(str(GOLDEN / "qwen2"), str(root / "qwen2"), dtype="float32", tensor_parallel_size=2)
    return {"llama": root / "llama", "qwen2": root / "qwen2"}


def _prompts():
    rng = np.random.default_rng(11)
    return [rng.integers(5, 500, n).tolist() for n in (4, 21, 33)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2] if len(jax.devices()) >= 2 else [1])
def test_restore_equals_safetensors_arrays(orbax_dirs, arch, tp):
    """Written from tp=1 (llama) or tp=2 (qwen2), restored onto tp=1 and tp=2: same values, and
    the sharding the serving mesh asks for (so the engine is the HF engine: tp=2 tokens are
    test_tensor_parallel's)."""
    hf = HFModelDir(GOLDEN / arch)
    cfg = ModelConfig.from_hf_config(hf.config, dtype="float32")
    mesh = make_mesh(tp)
    ref = load_params(hf, cfg, mesh)
    got = restore_params(OrbaxModelDir(orbax_dirs[arch]), cfg, mesh)
    assert set(got) == set(ref)
    for name in ref:
        assert got[name].sharding == ref[name].sharding, name
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), err_msg=name)


def test_convert_writes_config_tokenizer_and_metadata(orbax_dirs):
    d = orbax_dirs["llama"]
    assert is_orbax_dir(d) and not is_orbax_dir(GOLDEN / "llama")
    src = GOLDEN / "llama"
    assert json.loads((d / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (d / "tokenizer.json").read_bytes() == (GOLDEN / "llama" / "tokenizer.json").read_bytes()
    meta = OrbaxModelDir(d)
    assert meta.dtype == "float32" and meta.quantization is None
    assert meta.arrays["wqkv"][0] == (2, 64, 2, 4, 16)


def test_engine_from_orbax_matches_hf(make_engine, orbax_dirs):
    prompts = _prompts()
    ref = run_tokens(make_engine("llama"), prompts, GREEDY)
    engine = make_engine(model=str(orbax_dirs["llama"]))
    assert engine.tokenizer is not None
    assert run_tokens(engine, prompts, GREEDY) == ref


_TP4_CHECK = """
import sys
import numpy as np
from checkpoints import HFModelDir
from checkpoints.orbax_dir import OrbaxModelDir
from jserve.config import ModelConfig
from jserve.model.kv_replicas import replicate_kv_heads, serving_model_config
from jserve.model.orbax_params import restore_params
from jserve.model.params import load_params
from sharding import make_mesh
hf = HFModelDir(sys.argv[1])
cfg = ModelConfig.from_hf_config(hf.config, dtype="float32")
served, mesh = serving_model_config(cfg, 4), make_mesh(4)
ref = replicate_kv_heads(load_params(hf, cfg, mesh), cfg, served, mesh)
got = replicate_kv_heads(restore_params(OrbaxModelDir(sys.argv[2]), cfg, mesh), cfg, served, mesh)
assert served.num_kv_heads == 4 and len(got["wqkv"].sharding.device_set) == 4
for name in ref:
    assert got[name].sharding == ref[name].sharding, name
    np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(ref[name]), err_msg=name)
print("ok", sorted(ref))
"""


def test_restore_onto_tp4_with_replicated_kv_heads(orbax_dirs):
    """Written at tp=1, restored onto tp=4 over 2 KV heads (4 forced host devices, a
    subprocess) and replicated: the arrays the HF path serves (test_tp_replicated_kv shows those
    give tp=1's tokens)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _TP4_CHECK, str(GOLDEN / "llama"), str(orbax_dirs["llama"])],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.startswith("ok")


def test_restore_casts_to_the_requested_dtype(orbax_dirs):
    d = OrbaxModelDir(orbax_dirs["llama"])
    cfg = ModelConfig.from_hf_config(d.config, dtype="bfloat16")
    params = restore_params(d, cfg, make_mesh(1))
    assert {str(p.dtype) for p in params.values()} == {"bfloat16"}


def test_bad_directories_fail_by_name(orbax_dirs, tmp_path):
    good = orbax_dirs["llama"]
    with pytest.raises(CheckpointError, match="already exists"):
        convert(str(GOLDEN / "llama"), str(good))
    with pytest.raises(CheckpointError, match="already an orbax model directory"):
        convert(str(good), str(tmp_path / "x"))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CheckpointError, match="not an orbax model directory; refusing"):
        convert(str(GOLDEN / "llama"), str(plain), overwrite=True)

    def broken(edit) -> Path:
        d = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(good, d)
        meta = json.loads((d / METADATA_FILE).read_text())
        edit(d, meta)
        (d / METADATA_FILE).write_text(json.dumps(meta))
        return d

    d = broken(lambda d, m: m.update(layout="something-else"))
    cfg = ModelConfig.from_hf_config(OrbaxModelDir(d).config, dtype="float32")
    with pytest.raises(CheckpointError, match="layout 'something-else'"):
        restore_params(OrbaxModelDir(d), cfg, make_mesh(1))
    d = broken(lambda d, m: m.update(version=99))
    with pytest.raises(CheckpointError, match="version 99"):
        OrbaxModelDir(d)
    d = broken(lambda d, m: (d / "config.json").unlink())
    with pytest.raises(CheckpointError, match="missing config.json"):
        OrbaxModelDir(d)
    d = broken(lambda d, m: m["arrays"]["wd"].update(shape=[2, 3, 4]))
    with pytest.raises(CheckpointError, match="array 'wd' has shape"):
        restore_params(OrbaxModelDir(d), cfg, make_mesh(1))
    d = broken(lambda d, m: m.update(quantization="int4-awq"))
    with pytest.raises(CheckpointError, match="quantization 'int4-awq'"):
        restore_params(OrbaxModelDir(d), cfg, make_mesh(1))
    d = broken(lambda d, m: shutil.rmtree(d / "params"))
    with pytest.raises(CheckpointError, match="missing the orbax params"):
        OrbaxModelDir(d)

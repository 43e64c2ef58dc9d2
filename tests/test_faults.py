"""Every reader of user input, fuzzed with hypothesis: whatever the bytes, the reader returns a
valid object or raises the project's own error (ConfigError, DataError, RunFolderError, each a
ValueError whose message names the file, key or sample), never another exception, which the
command line would show as a traceback instead of one line.

Readers: YAML config files (text and raw bytes), key=value overrides, .npz files (any arrays
under any keys, or any bytes), image folders (any bytes under image names, real images of any
size and mode), dataset manifests (any JSON), a run's metrics.json and metrics.jsonl (any text),
model files (any bytes). docs/reliability.md lists them with the failures this found.
"""

from __future__ import annotations

import io
import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from sddecc_dist.config import Config, ConfigError, load_config, to_dict
from sddecc_dist.data import DataError
from sddecc_dist.data.shards import MANIFEST_NAME, read_manifest, write_shards
from sddecc_dist.data.sources import RawDataset, load_source
from sddecc_dist.run_folder import RunFolder, RunFolderError, read_model_file

EXAMPLES = 150
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# ---------------------------------------------------------------------------- values and keys

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)


def _config_keys() -> list[str]:
    """Every dotted key of the real config, so that fuzzed configs reach the value checks."""
    keys = []

    def walk(values: dict, prefix: str) -> None:
        for key, value in values.items():
            keys.append(prefix + key)
            if isinstance(value, dict):
                walk(value, prefix + key + ".")
    walk(to_dict(Config()), "")
    return keys


CONFIG_KEYS = _config_keys()
config_keys = st.one_of(st.sampled_from(CONFIG_KEYS), st.text(string.ascii_letters + "._", min_size=0, max_size=12))


def _nest(key: str, value):
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


# ---------------------------------------------------------------------------- configs

@fuzz
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1"))))
def test_any_config_text_loads_or_is_a_config_error(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    _loads_or_config_error([path], [])


@fuzz
@given(st.binary(max_size=300))
def test_any_config_bytes_load_or_are_a_config_error(tmp_path, data):
    path = tmp_path / "config.yaml"
    path.write_bytes(data)
    _loads_or_config_error([path], [])


@fuzz
@given(st.lists(st.tuples(config_keys, json_values), max_size=6))
def test_config_mappings_of_real_keys_and_any_values_load_or_are_a_config_error(tmp_path, items):
    import yaml
    values: dict = {}
    for key, value in items:
        values.update(_nest(key, value))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    _loads_or_config_error([path], [])


@fuzz
@given(st.lists(st.one_of(st.text(max_size=40),
                          st.tuples(config_keys, st.text(max_size=20)).map(lambda kv: f"{kv[0]}={kv[1]}")),
                max_size=5))
def test_any_overrides_load_or_are_a_config_error(overrides):
    _loads_or_config_error([], overrides)


def _loads_or_config_error(paths, overrides) -> None:
    try:
        config = load_config(paths, overrides)
    except ConfigError as error:
        assert str(error)
    else:
        assert isinstance(config, Config)


# ---------------------------------------------------------------------------- .npz files

dtypes = st.sampled_from([np.uint8, np.int64, np.float32, np.float64, np.bool_, np.complex64, np.dtype("<U2"),
                          np.dtype("datetime64[s]")])
arrays = dtypes.flatmap(lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0,
                                                                         max_side=5)))


@fuzz
@given(st.dictionaries(st.sampled_from(["x", "y", "z"]), arrays, max_size=3))
def test_any_npz_arrays_prepare_or_are_a_data_error(tmp_path, contents):
    path = tmp_path / "set.npz"
    np.savez(path, **contents)
    _prepares_or_data_error(path, tmp_path / "out")


@pytest.mark.parametrize("name, read, error", [("set.npz", load_source, DataError),
                                                ("model.pt", read_model_file, RunFolderError)])
@fuzz
@given(data=st.binary(max_size=400))
def test_any_bytes_as_an_npz_or_a_model_file_are_the_readers_own_error(tmp_path, name, read, error, data):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(error, match=str(path)):
        read(path)


def _prepares_or_data_error(source: Path, out: Path) -> None:
    """load_source, then write_shards (prepare's checks of shape, labels and values)."""
    try:
        raw = load_source(source)
        manifest = write_shards(raw, out, samples_per_shard=3)
    except DataError as error:
        assert str(error)
    else:
        assert isinstance(raw, RawDataset) and manifest["count"] == len(raw.images) > 0
        assert read_manifest(out)["count"] == manifest["count"]


# ---------------------------------------------------------------------------- image folders

def _png(size: tuple[int, int], mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=1 if mode == "1" else 7).save(buffer, format="PNG")
    return buffer.getvalue()


image_files = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.tuples(st.integers(1, 6), st.integers(1, 6)), st.sampled_from(["L", "RGB", "RGBA", "1", "P", "I;16"]))
    .map(lambda spec: _png(*spec)),
)


@fuzz
@given(st.lists(st.tuples(st.sampled_from(["", "a/", "b/"]), st.sampled_from([".png", ".jpg", ".JPEG", ".txt"]),
                          image_files), max_size=5))
def test_any_image_folder_prepares_or_is_a_data_error(tmp_path, files):
    folder = tmp_path / "images"
    if folder.exists():  # hypothesis reuses tmp_path across examples
        import shutil
        shutil.rmtree(folder)
    folder.mkdir()
    for number, (sub, suffix, data) in enumerate(files):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / f"{number}{suffix}").write_bytes(data)
    _prepares_or_data_error(folder, tmp_path / f"out-{len(files)}")


# ---------------------------------------------------------------------------- artifacts

def _valid_manifest() -> dict:
    raw = RawDataset("tiny", np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 1, 0, 1]), (0.0, 255.0), 2, ["0", "1"])
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        return write_shards(raw, folder, samples_per_shard=2)


VALID_MANIFEST = _valid_manifest()
MANIFEST_FIELDS = sorted(VALID_MANIFEST) + [f"shards.{i}" for i in range(2)] + [
    f"shards.{i}.{field}" for i in range(2) for field in ("file", "count", "first_index", "sha256")]


def _edited(field: str, value) -> dict:
    """A real manifest with one field (of its own, of a shard entry, or a whole entry) replaced,
    or removed where `value` is None."""
    manifest = json.loads(json.dumps(VALID_MANIFEST))
    *parents, name = field.split(".")
    target = manifest
    for parent in parents:
        target = target[int(parent)] if isinstance(target, list) else target[parent]
    name = int(name) if isinstance(target, list) else name
    if value is None:
        del target[name]
    else:
        target[name] = value
    return manifest


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=json_values)
@example(value="0:")  # strings numpy's dtype parser fails on with ValueError and SyntaxError (found here)
@example(value="01")
@pytest.mark.parametrize("field", MANIFEST_FIELDS)
def test_any_value_of_any_manifest_field_reads_or_is_a_data_error(tmp_path, field, value):
    _reads_or_data_error(tmp_path, json.dumps(_edited(field, value)))


@fuzz
@given(st.one_of(json_values.map(json.dumps), st.binary(max_size=100).map(lambda b: b.decode("latin-1"))))
def test_any_manifest_text_reads_or_is_a_data_error(tmp_path, text):
    _reads_or_data_error(tmp_path, text)


def _reads_or_data_error(folder: Path, text: str) -> None:
    (folder / MANIFEST_NAME).write_text(text)
    try:
        manifest = read_manifest(folder)
    except DataError as error:
        assert str(folder) in str(error)
    else:
        assert isinstance(manifest, dict)


@fuzz
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps)),
       st.one_of(st.text(max_size=200), st.lists(json_values, max_size=4).map(
           lambda lines: "".join(json.dumps(line) + "\n" for line in lines))))
def test_any_metrics_files_read_or_are_a_run_folder_error(tmp_path, metrics, log):
    run = RunFolder(tmp_path)
    run.metrics_path.write_text(metrics)
    run.metrics_log_path.write_text(log)
    for read in (run.read_metrics, run.read_metrics_log):
        try:
            read()
        except RunFolderError as error:
            assert str(tmp_path) in str(error)


"""Hostile checkpoints, generated here, each run through `densetriton convert` in a child process:
one error line, exit status 2, nothing written (no output, no temporary), within 10 s and 1 GB,
and no byte of another local file read.

What each case caught before its fix: the deep tuples crashed the interpreter (SIGSEGV); the
bombs and stride-0 views took gigabytes (or converted, exit 0); the shared module hung; the HDF5
external storage, virtual dataset and external link converted with the secret file's bytes in
the classifier (exit 0); the deep JSON escaped as a RecursionError (exit 1); the TorchScript
archive and the over-declared legacy storage were exit 1, not refusals.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from densetriton.weights_tools.bounds import check_zip_members, scan_pickle, tensor_fits
from densetriton.weights_tools.pickled_module import load_pickled, module_state_dict
from hostile import assert_refused, run_cli
from safetensors.torch import save_file

from densetriton.limits import (
    MAX_CLASSES,
    MAX_TENSOR_BYTES,
    MAX_TOTAL_TENSOR_BYTES,
    FileRefused,
)
from densetriton.spec import get_spec

h5py = pytest.importorskip("h5py")

SECRET = np.random.default_rng(7).normal(size=64).astype(np.float32)  # the local file no output may hold


# -- building torch.save files by hand ------------------------------------------------------------


class _StorageRef:
    def __init__(self, key: str, numel: int, storage_type=torch.FloatStorage):
        self.key, self.numel, self.storage_type = key, numel, storage_type


class _TensorRef:
    """Pickles as torch.save pickles a tensor: _rebuild_tensor_v2 of a persistent storage id."""

    def __init__(self, storage: _StorageRef, size, stride, offset=0):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def _torch_pickle(obj, legacy: bool = False) -> bytes:
    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _StorageRef):
                return ("storage", o.storage_type, o.key, "cpu", o.numel) + ((None,) if legacy else ())
            return None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _torch_zip(path, data_pkl: bytes, storages: dict[str, bytes] = {}, deflated: set = frozenset()):  # noqa: B006
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            kind = zipfile.ZIP_DEFLATED if key in deflated else zipfile.ZIP_STORED
            z.writestr(f"archive/data/{key}", data, compress_type=kind)
        z.writestr("archive/version", "3\n")
    return path


def _legacy_file(path, object_pickle: bytes, keys: list[str], data: bytes = b""):
    header = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + pickle.dumps(1001, protocol=2)
    header += pickle.dumps(
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2
    )
    path.write_bytes(header + object_pickle + pickle.dumps(keys, protocol=2) + data)
    return path


def _deep_tuple_as_dict_key(depth: int) -> bytes:
    """PROTO 2; EMPTY_DICT; a tuple nested `depth` deep (EMPTY_TUPLE, then TUPLE1 over and over); NONE; SETITEM."""
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"Ns."


def _deep_tuple_in_a_set(depth: int) -> bytes:
    """PROTO 4; EMPTY_SET; MARK; the deep tuple; ADDITEMS."""
    return b"\x80\x04\x8f(" + b")" + b"\x85" * depth + b"\x90."


def _small_state_dict(classes: int = 3) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.DenseNet(
        growth_rate=4, block_config=(1, 1), num_init_features=8, bn_size=2, num_classes=classes
    )
    return model.state_dict()


# -- building Keras 3 weights files by hand ---------------------------------------------------------


def _keras3_weights(path, kernel_dataset=None):
    """A Keras 3 weights file (layers named by class and position) of a tiny DenseNet: growth 4,
    blocks (1, 1), 8 stem channels, bn_size 2, 3 classes. kernel_dataset(group, shape) writes the
    classifier's kernel (default: random values)."""
    rng = np.random.default_rng(0)
    convs = [(7, 3, 8), (1, 8, 8), (3, 8, 4), (1, 12, 6), (1, 6, 8), (3, 8, 4)]  # (kernel, in, out) in layer order
    bns = [8, 8, 8, 12, 6, 8, 10]
    with h5py.File(path, "w") as f:
        layers = f.create_group("layers")
        for i, (k, cin, cout) in enumerate(convs):
            layers.create_group(f"conv2d{'_' + str(i) if i else ''}/vars")["0"] = rng.normal(
                size=(k, k, cin, cout)
            ).astype("f4")
        for i, c in enumerate(bns):
            group = layers.create_group(f"batch_normalization{'_' + str(i) if i else ''}/vars")
            for j, values in enumerate(
                (rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c))
            ):
                group[str(j)] = values.astype("f4")
        dense = layers.create_group("dense/vars")
        if kernel_dataset is None:
            dense["0"] = rng.normal(size=(10, 3)).astype("f4")
        else:
            kernel_dataset(dense, (10, 3))
        dense["1"] = rng.normal(size=3).astype("f4")
    return path


def _secret_file(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET.tobytes())
    return secret


def _external_storage(tmp_path):
    secret = _secret_file(tmp_path)
    return _keras3_weights(
        tmp_path / "ext.weights.h5",
        lambda g, shape: g.create_dataset(
            "0", shape=shape, dtype="f4", external=[(str(secret), 0, 4 * math.prod(shape))]
        ),
    )


def _virtual_dataset(tmp_path):
    source = tmp_path / "secret.h5"
    with h5py.File(source, "w") as f:
        f["x"] = SECRET[:30].reshape(10, 3)

    def virtual(group, shape):
        layout = h5py.VirtualLayout(shape=shape, dtype="f4")
        layout[:] = h5py.VirtualSource(str(source), "x", shape=shape)
        group.create_virtual_dataset("0", layout)

    return _keras3_weights(tmp_path / "virtual.weights.h5", virtual)


def _external_link(tmp_path):
    other = tmp_path / "secret.h5"
    with h5py.File(other, "w") as f:
        f["kernel"] = SECRET[:30].reshape(10, 3)

    def link(group, shape):
        group["0"] = h5py.ExternalLink(str(other), "/kernel")

    return _keras3_weights(tmp_path / "link.weights.h5", link)


def _fill_value_only(tmp_path):
    # 200 million floats (800 MB) declared, not one stored: h5py would hand back the fill value.
    return _keras3_weights(
        tmp_path / "fill.weights.h5", lambda g, shape: g.create_dataset("0", shape=(10, 20_000_000), dtype="f4")
    )


def _compressed_fill(tmp_path):
    return _keras3_weights(
        tmp_path / "gzip.weights.h5",
        lambda g, shape: g.create_dataset(
            "0", shape=(10, 20_000_000), dtype="f4", chunks=(10, 1_000_000), compression="gzip"
        ),
    )


def _keras_archive(tmp_path, name, write_config):
    weights = _keras3_weights(tmp_path / "inner.weights.h5")
    path = tmp_path / name
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        write_config(z)
        z.write(weights, "model.weights.h5")
    return path


def _config_bomb(tmp_path):
    def write(z):  # 600 MB of JSON whitespace around {}, deflated to about 1 MB
        with z.open("config.json", "w", force_zip64=True) as member:
            member.write(b"{")
            block = b" " * (16 << 20)
            for _ in range(600 // 16):
                member.write(block)
            member.write(b"}")

    return _keras_archive(tmp_path, "bomb.keras", write)


def _deep_config(tmp_path):
    return _keras_archive(tmp_path, "deep.keras", lambda z: z.writestr("config.json", "[" * 100_000 + "]" * 100_000))


# -- the cases ---------------------------------------------------------------------------------------


def _deep_tuple_zip(tmp_path):
    return _torch_zip(tmp_path / "deep.pt", _deep_tuple_as_dict_key(200_000))


def _deep_tuple_legacy(tmp_path):
    return _legacy_file(tmp_path / "deep-legacy.pt", _deep_tuple_in_a_set(200_000), [])


def _member_bomb(tmp_path):
    # A state dict whose one storage, 640 MB of zeros, is deflated to under 1 MB.
    numel = 160 << 20  # 640 MB: forty 16 MB blocks
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("archive/data.pkl", _torch_pickle({"w": _TensorRef(_StorageRef("0", numel), (numel,), (1,))}))
        z.writestr("archive/byteorder", "little")
        with z.open("archive/data/0", "w", force_zip64=True) as member:
            block = bytes(16 << 20)
            for _ in range(numel * 4 // len(block)):
                member.write(block)
        z.writestr("archive/version", "3\n")
    return path


def _legacy_over_declared(tmp_path):
    # 10 billion floats declared by a 1 KB file: torch's loader allocated them before reading.
    obj = _torch_pickle({"w": _TensorRef(_StorageRef("0", 10**10), (10**10,), (1,))}, legacy=True)
    return _legacy_file(tmp_path / "over.pt", obj, ["0"], struct.pack("<q", 10**10) + bytes(16))


def _stride0_classifier(tmp_path):
    sd = _small_state_dict()
    sd["classifier.weight"] = torch.randn(1).expand(20_000_000, 10)  # 800 MB of view over 4 bytes
    sd["classifier.bias"] = torch.randn(1).expand(20_000_000)
    torch.save(sd, tmp_path / "stride0.pt")
    return tmp_path / "stride0.pt"


def _stride0_op_threshs(tmp_path):
    sd = _small_state_dict()
    sd["op_threshs"] = torch.rand(1).expand(300_000_000)
    torch.save(sd, tmp_path / "op_threshs.pt")
    return tmp_path / "op_threshs.pt"


def _shared_module(tmp_path):
    # One module holding 10,000 tensors (one tensor, memoised), shared by 99,000 parents: 1 MB on
    # disk, 990 million state-dict entries if walked by path.
    inner = torch.nn.Module()
    weight = torch.randn(3)
    for i in range(10_000):
        inner.register_buffer(f"b{i}", weight)
    outer = torch.nn.Module()
    for i in range(99_000):
        outer._modules[f"m{i}"] = inner
    torch.save(outer, tmp_path / "shared.pt")
    return tmp_path / "shared.pt"


def _torchscript(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    return tmp_path / "scripted.pt"


def _deep_metadata(tmp_path):
    # A densetriton weights file converted again: its class names are JSON nested 100,000 deep.
    sd = {k: v.contiguous() for k, v in _small_state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(
        sd,
        tmp_path / "deep.safetensors",
        metadata={"format": "densetriton", "class_names": "[" * 100_000 + "]" * 100_000},
    )
    return tmp_path / "deep.safetensors"


CASES = {
    "deep-tuple-dict-key-zip": (_deep_tuple_zip, "nesting depth"),
    "deep-tuple-set-element-legacy": (_deep_tuple_legacy, "nesting depth"),
    "zip-member-bomb": (_member_bomb, "times its compressed size"),
    "legacy-storage-over-declared": (_legacy_over_declared, "the file holds for it"),
    "stride0-classifier": (_stride0_classifier, "in a storage of 4 bytes"),
    "stride0-op-threshs": (_stride0_op_threshs, "in a storage of 4 bytes"),
    "module-shared-99000-times": (_shared_module, "990,000,000"),
    "torchscript-archive": (_torchscript, "TorchScript"),
    "deep-json-metadata": (_deep_metadata, "nesting depth"),
    "h5-external-storage": (_external_storage, "external, in"),
    "h5-virtual-dataset": (_virtual_dataset, "virtual"),
    "h5-external-link": (_external_link, "ExternalLink"),
    "h5-fill-value-only": (_fill_value_only, "the bytes the file stores for it"),
    "h5-compressed-fill": (_compressed_fill, "times its compressed size"),
    "keras-config-bomb": (_config_bomb, "times its compressed size"),
    "keras-deep-config": (_deep_config, "nesting depth"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_checkpoint_is_refused_in_one_line_and_writes_nothing(case, tmp_path):
    make, mention = CASES[case]
    source = tmp_path / "in"
    source.mkdir()
    checkpoint = make(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = run_cli("convert", "--checkpoint", str(checkpoint), "--out", str(out_dir / "model.safetensors"))
    assert_refused(run, mentions=mention)
    assert str(checkpoint) in run.error_lines[0]  # it names the file
    assert list(out_dir.iterdir()) == []  # no output, no temporary
    secret = SECRET.tobytes()
    assert secret[:16].hex() not in run.stdout + run.stderr


# -- more cases: what each did before its fix is in its docstring ------------------------------------


def _many_small_members(tmp_path):
    """80 storages of 16 MiB of zeros, each deflated to ~70 KB: each member is small, so exempt from
    the ratio, and all of them inflated to 1.3 GB (1.9 GB peak, exit 1) before the members' total
    was held to the ratio."""
    numel, count = (16 << 20) // 4, 80
    refs = {f"w{i}": _TensorRef(_StorageRef(str(i), numel), (numel,), (1,)) for i in range(count)}
    return _torch_zip(
        tmp_path / "many-members.pt",
        _torch_pickle(refs),
        {str(i): bytes(16 << 20) for i in range(count)},
        deflated={str(i) for i in range(count)},
    )


def _views_of_one_storage(tmp_path):
    """A DenseNet (growth 128, 40 layers: 300 MB of tensors) whose every tensor views one 10 MB
    storage of ones, deflated to 10 KB: each tensor fits its storage. Before the tensors' total was
    held to their storages' bytes, safetensors refused the shared storage in a 400-line message
    (exit 1); copied instead, it is 300 MB written from a 60 KB file (and 8 GB at the bounds)."""
    from densetriton.spec import DenseNetSpec

    spec = DenseNetSpec(growth_rate=128, block_config=(40,), num_init_features=64, bn_size=4, num_classes=10)
    shapes = spec.state_dict_shapes()
    numel = max(math.prod(s) for s in shapes.values())
    refs = OrderedDict((k, _TensorRef(_StorageRef("0", numel), s, _contiguous_stride(s))) for k, s in shapes.items())
    return _torch_zip(
        tmp_path / "views.pt", _torch_pickle(refs), {"0": np.ones(numel, np.float32).tobytes()}, deflated={"0"}
    )


def _legacy_storage_never_read(tmp_path):
    """A legacy file whose storage list is empty: its storages were allocated and never read, so the
    tensors held uninitialised memory (freed heap: bytes of whatever the process read before), and
    converted when that memory was zeros."""
    refs = OrderedDict(
        (k, _TensorRef(_StorageRef(str(i), v.numel()), tuple(v.shape), tuple(v.stride())))
        for i, (k, v) in enumerate(_small_state_dict().items())
        if not k.endswith("num_batches_tracked")
    )
    return _legacy_file(tmp_path / "unread.pt", _torch_pickle(refs, legacy=True), [], bytes(100_000))


def _quadratic_key(tmp_path):
    """A key of 950,000 characters: many "denselayer1.layers." and a newline. The MONAI rename's
    "(.*)$" (whose "." stopped at the newline) backtracked over the key once per match: hung (over 90 s)."""
    key = "features." + "denselayer1.layers." * 50_000 + "\nx"
    return _torch_zip(
        tmp_path / "key.pt", _torch_pickle({key: _TensorRef(_StorageRef("0", 1), (1,), (1,))}), {"0": bytes(4)}
    )


def _non_persistent_list(tmp_path):
    """A pickled module whose _non_persistent_buffers_set is a list of 100,000 names and whose
    _buffers names them too (each None): each buffer was looked up in the list, 10^10 compares: hung."""
    names = [f"b{i}" for i in range(100_000)]
    state = {"_parameters": {}, "_buffers": dict.fromkeys(names), "_modules": {}, "_non_persistent_buffers_set": names}
    body = pickle.dumps(state, protocol=2)[2:-1]  # without PROTO and STOP
    return _torch_zip(tmp_path / "buffers.pt", b"\x80\x02cfoo\nModel\n)\x81" + body + b"b.")  # foo.Model(), BUILD


def _legacy_pickles_of_many_opcodes(tmp_path):
    """A legacy file's five pickles, each of 550,000 opcodes (NONE, POP): each was within the
    opcode bound alone (4,000,000 each then), so all 2.75 million were scanned and unpickled (exit
    1, no state dict). The file's pickles now share one budget, spent in the second pickle."""
    padding = b"N0" * 275_000
    pickles = [
        b"\x80\x02" + padding + pickle.dumps(v, protocol=2)[2:]
        for v in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {}, [])
    ]
    path = tmp_path / "opcodes.pt"
    path.write_bytes(b"".join(pickles))
    return path


def _many_small_compressed_datasets(tmp_path):
    """A Keras 3 weights file of 80 Conv2D kernels of 16 MiB of zeros, each gzipped to ~70 KB: each
    dataset is small, so exempt from the ratio, and all of them were read (1.8 GB peak, exit 1)
    before the compressed datasets' total was held to the ratio."""
    path = tmp_path / "many.weights.h5"
    with h5py.File(path, "w") as f:
        for i in range(80):
            f.create_dataset(
                f"layers/conv2d{'_' + str(i) if i else ''}/vars/0",
                data=np.zeros((1024, 4096), np.float32),
                chunks=(256, 4096),
                compression="gzip",
                compression_opts=1,
            )
    return path


def _many_class_names(tmp_path):
    """A densetriton weights file converted again whose class_names are 9 million "ab" (45 MB of
    JSON, its header under MAX_JSON_BYTES): parsed, 1.25 GB peak (exit 1), before JSON values were counted."""
    sd = {k: v.contiguous() for k, v in _small_state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(
        sd,
        tmp_path / "names.safetensors",
        metadata={"format": "densetriton", "class_names": json.dumps(["ab"] * 9_000_000, separators=(",", ":"))},
    )
    return tmp_path / "names.safetensors"


def _tensor_of_many_dims(tmp_path):
    """A state dict whose op_threshs has 100,000 dimensions of size 0 (it fits any storage): the
    conversion succeeded (exit 0) after a warning line of 600 KB naming its shape."""
    sd = _small_state_dict()
    refs = {
        k: _TensorRef(_StorageRef(str(i), max(v.numel(), 1)), tuple(v.shape), tuple(v.stride()))
        for i, (k, v) in enumerate(sd.items())
    }
    refs["op_threshs"] = _TensorRef(_StorageRef("z", 1), (0,) * 100_000, (1,) * 100_000)
    storages = {str(i): v.contiguous().numpy().tobytes() for i, v in enumerate(sd.values())}
    return _torch_zip(tmp_path / "dims.pt", _torch_pickle(refs), {**storages, "z": bytes(4)})


def _many_empty_tensors(tmp_path):
    """A safetensors file (34 MB) listing 600,000 empty tensors: 22 s of CPU and 1.46 GB peak (exit
    1) before the tensor count was bounded from the raw header."""
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(600_000)}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "empty.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    return path


# name: (make, what the one error line says, exit status)
MORE_CASES = {
    "safetensors-600000-empty-tensors": (_many_empty_tensors, "the tensor count is 600000", 2),
    "tensor-of-100000-dimensions": (_tensor_of_many_dims, "100000 dimensions", 2),
    "json-of-10-million-values": (_many_class_names, "the number of values in", 2),
    "h5-many-small-compressed-datasets": (_many_small_compressed_datasets, "times their compressed size", 2),
    "zip-many-small-members": (_many_small_members, "times their compressed size", 2),
    "views-of-one-storage": (_views_of_one_storage, "of their storages", 2),
    "legacy-storage-never-read": (_legacy_storage_never_read, "the storage list does not match", 1),
    "quadratic-key": (_quadratic_key, "the length of a key", 2),
    "non-persistent-buffers-list": (_non_persistent_list, "not a set", 1),
    "legacy-pickles-of-many-opcodes": (_legacy_pickles_of_many_opcodes, "with the file's earlier pickles", 2),
}


@pytest.mark.parametrize("case", list(MORE_CASES))
def test_more_hostile_checkpoints_fail_in_one_line_and_write_nothing(case, tmp_path):
    """As above; a refusal found after reading (the key, the shared storage) names the file by its
    name, as the converted file's source does; a malformed file is exit status 1."""
    make, mention, status = MORE_CASES[case]
    source = tmp_path / "in"
    source.mkdir()
    checkpoint = make(source)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = run_cli("convert", "--checkpoint", str(checkpoint), "--out", str(out_dir / "model.safetensors"))
    assert_refused(run, mentions=mention, status=status)
    assert checkpoint.name in run.error_lines[0]
    assert list(out_dir.iterdir()) == []


def test_tensors_sharing_a_storage_convert(tmp_path):
    """A checkpoint in which two entries are one tensor (torch.save keeps one storage for both; tied
    values, or a training script's aliasing) converts, each entry copied out of the shared storage.
    (Fails without the copy: safetensors refuses tensors sharing memory, in a multi-line error.)"""
    from densetriton.weights_tools.convert import convert_checkpoint

    from densetriton.weights import load_weights

    sd = {k: v for k, v in _small_state_dict().items() if not k.endswith("num_batches_tracked")}
    shared = torch.rand(sd["features.norm5.weight"].shape) + 0.5
    sd["features.norm5.weight"] = sd["features.norm5.running_var"] = shared
    torch.save(sd, tmp_path / "tied.pt")
    tensors = load_weights(convert_checkpoint(tmp_path / "tied.pt", tmp_path / "tied.safetensors")).tensors
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)


# -- in-process: no torch.load, no torch.jit.load; the limits stay generous ---------------------------


def test_pickled_module_reader_never_calls_torch_load_or_jit_load(tmp_path, monkeypatch):
    """Called directly, load_pickled refuses a TorchScript archive by name; and it reads
    checkpoints (zip and legacy) without torch.load or torch.jit.load, which are made to fail here."""
    scripted = _torchscript(tmp_path)
    sd = _small_state_dict()
    torch.save(sd, tmp_path / "zip.pt")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load or torch.jit.load was called")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)
    with pytest.raises(FileRefused, match="TorchScript"):
        load_pickled(scripted)
    for name in ("zip.pt", "legacy.pt"):
        loaded = load_pickled(tmp_path / name)
        assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_limits_leave_densenet264_with_a_100000_class_head_convertible():
    """The largest registry model with a 100,000-class float32 head (1.1 GB of head alone), checked
    on its declared sizes rather than converted (that would write 1.2 GB in CI): every tensor and
    the total within the byte bounds, the class count within MAX_CLASSES, torch.save's zip members
    (stored, not compressed) within the zip bounds, and its data.pkl within the pickle bounds."""
    spec = get_spec("densenet264").replace(num_classes=100_000)
    shapes = spec.state_dict_shapes()
    sizes = {name: math.prod(shape) * 4 for name, shape in shapes.items()}
    assert sizes["classifier.weight"] > 1 << 30  # the case is the large one
    assert max(sizes.values()) <= MAX_TENSOR_BYTES and sum(sizes.values()) <= MAX_TOTAL_TENSOR_BYTES
    assert spec.num_classes <= MAX_CLASSES

    class Directory:  # what check_zip_members reads of a zipfile.ZipFile
        def infolist(self):
            infos = []
            for i, size in enumerate(sizes.values()):
                info = zipfile.ZipInfo(f"archive/data/{i}")
                info.file_size = info.compress_size = size
                infos.append(info)
            return infos

    check_zip_members(Directory(), "densenet264.pt")
    refs = {
        name: _TensorRef(_StorageRef(str(i), math.prod(shape)), shape, _contiguous_stride(shape))
        for i, (name, shape) in enumerate(shapes.items())
    }
    scan_pickle(_torch_pickle(OrderedDict(refs)), "densenet264.pt")
    shape = shapes["classifier.weight"]
    assert tensor_fits(shape, _contiguous_stride(shape), 0, 4, sizes["classifier.weight"]) is None


def _contiguous_stride(shape):
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


def test_a_real_densenet264_module_tree_is_read_whole(tmp_path):
    """The deepest real module tree (densenet264, pickled whole as torchxrayvision publishes its
    models) passes the pickle's opcode and depth bounds and the module tree's tensor bound."""
    import torchvision

    model = torchvision.models.DenseNet(
        growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64, num_classes=2
    )
    torch.save(model, tmp_path / "whole.pt")
    got = module_state_dict(load_pickled(tmp_path / "whole.pt"))
    expected = model.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in ("features.conv0.weight", "classifier.weight"))


def test_depth_scan_sees_a_container_filled_after_it_was_memoised():
    """Lists memoised empty, then put into each other through the memo (the deepest first): their
    depth is the filled one, as the memo and the stack share one depth cell. (A scan whose memo
    kept the depth at the time of PUT sees depth 1 here.)"""
    n = 1500
    stream = b"\x80\x02" + b"".join(
        b"]r" + struct.pack("<I", i) + b"0" for i in range(n + 1)
    )  # EMPTY_LIST LONG_BINPUT POP
    stream += b"".join(
        b"j" + struct.pack("<I", i) + b"j" + struct.pack("<I", i + 1) + b"a0"  # GET i, GET i+1, APPEND, POP
        for i in reversed(range(n))
    )
    stream += b"j" + struct.pack("<I", 0) + b"."
    nested, depth = pickle.loads(stream), 0
    while nested:
        nested, depth = nested[0], depth + 1
    assert depth == n  # what the stream builds
    with pytest.raises(FileRefused, match="nesting depth"):
        scan_pickle(stream, "memo.pt")
    scan_pickle(pickle.dumps({"a": [(1, 2)] * 10, "b": {"c": [[[]]]}}, protocol=2), "plain.pt")


def test_json_is_bounded_as_a_refusal_of_the_file(tmp_path):
    """A .keras config of 70 MB (past MAX_JSON_BYTES, under the zip bounds: stored) is refused before it is parsed."""
    from densetriton.weights_tools.keras_h5 import KerasRefused, read_keras

    path = _keras_archive(
        tmp_path,
        "big.keras",
        lambda z: z.writestr("config.json", json.dumps({"x": " " * (70 << 20)}), compress_type=zipfile.ZIP_STORED),
    )
    with pytest.raises(KerasRefused, match="config.json's size"):
        read_keras(path)


def test_legacy_file_saved_on_a_gpu_reads_on_the_cpu(tmp_path):
    """torch < 1.6 on a GPU wrote torch.cuda.FloatStorage and "cuda:0" into its persistent ids;
    the reader takes the dtype and ignores the location. Two tensors share the storage, one from
    an offset. (Fails if torch_files maps only torch.* storage names.)"""
    values = torch.randn(6)
    storage = _StorageRef("140", 6, torch.cuda.FloatStorage)
    obj = _torch_pickle(
        {"w": _TensorRef(storage, (2, 3), (3, 1)), "v": _TensorRef(storage, (2,), (1,), offset=4)}, legacy=True
    )
    path = _legacy_file(tmp_path / "cuda.pt", obj, ["140"], struct.pack("<q", 6) + values.numpy().tobytes())
    got = load_pickled(path)
    assert (
        got["w"].device.type == "cpu" and torch.equal(got["w"], values.view(2, 3)) and torch.equal(got["v"], values[4:])
    )
    assert got["w"].untyped_storage().data_ptr() == got["v"].untyped_storage().data_ptr()


def test_legacy_file_whose_weights_end_like_a_zip_directory_reads_as_legacy(tmp_path):
    """A legacy file is told from a zip by its first bytes, as torch.load tells them: weights whose
    last bytes happen to form a zip end-of-directory record (zipfile.is_zipfile says yes) still
    read. (Fails if the format is chosen by zipfile.is_zipfile.)"""
    record = np.frombuffer(
        b"PK\x05\x06" + bytes(20), dtype=np.float32
    )  # 24 bytes: an empty zip's directory, and 2 more
    obj = _torch_pickle({"w": _TensorRef(_StorageRef("0", 6), (6,), (1,))}, legacy=True)
    path = _legacy_file(tmp_path / "looks-zipped.pt", obj, ["0"], struct.pack("<q", 6) + record.tobytes())
    assert zipfile.is_zipfile(path)
    assert torch.equal(load_pickled(path)["w"], torch.from_numpy(record.copy()))

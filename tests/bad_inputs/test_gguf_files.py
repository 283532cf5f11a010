"""GGUF files fxquant must refuse, and the ones it must read.

Part 1 ports llama.cpp's handcrafted corrupt files (``tests/test-gguf.cpp``, ``handcrafted_file_type``):
each is built here byte by byte as there, and `read_gguf` must raise a `FormatError` naming the file
and the field where llama.cpp's ``gguf_init_from_file`` returns NULL, and read the *_SUCCESS files.
Part 2 corrupts real files from `save_gguf` and checks that its digests catch what the structure
cannot (a flipped byte, swapped tensors, an edited key), naming the tensor or key.
One difference from llama.cpp: DATA_NOT_ENOUGH_DATA there is one byte short of the padded data
section; here the last tensor itself is one byte short (padding after the last tensor is not
required, as gguf-py does not require it).
"""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch

import fxquant
from fxquant.artifacts.gguf import gguf_metadata
from fxquant.artifacts.gguf_file import read_gguf, verify_gguf
from fxquant.errors import FormatError

from .conftest import inputs

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType
U8, I32, U32, F32V, BOOL, STR, ARR, U64 = 0, 5, 4, 6, 7, 8, 9, 10


def s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def kv(key: bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<i", vtype) + payload


def tensor_info(name: bytes, ne, ggml_type: int, offset: int, n_dims=None) -> bytes:
    n_dims = len(ne) if n_dims is None else n_dims
    return s(name) + struct.pack("<I", n_dims) + b"".join(struct.pack("<q", d) for d in ne) + \
        struct.pack("<iQ", ggml_type, offset)


def pad(b: bytes, alignment=32) -> bytes:
    return b + bytes(-len(b) % alignment)


def gguf_bytes(kvs=(), tensors=(), data=b"", version=3, n_tensors=None, n_kv=None, magic=b"GGUF", alignment=32):
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    return pad(head + b"".join(kvs) + b"".join(tensors), alignment) + data


def two_tensors(alignment=32, offsets=None, types=(T.F32, T.Q8_0), shapes=((8, 2), (64, 1))):
    """Two tensor records and their data (byte i of the data section is i % 256, as in test-gguf.cpp)."""
    infos, offset = [], 0
    sizes = []
    for i, (ty, ne) in enumerate(zip(types, shapes)):
        block, size = gguf.GGML_QUANT_SIZES[ty]
        nbytes = int(np.prod(ne)) // block * size
        sizes.append(nbytes)
        off = offsets[i] if offsets else offset
        infos.append(tensor_info(f"my_tensor_{i}".encode(), ne, int(ty), off))
        offset += nbytes + (-nbytes % alignment)
    return infos, bytes(i % 256 for i in range(offset)), sizes


def write(tmp_path, data: bytes, name="h.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


ALIGN = kv(b"general.alignment", U32, struct.pack("<I", 13))
BAD_CASES = {
    # name in test-gguf.cpp: (file bytes, fragment of the message)
    "HEADER_BAD_MAGIC": (gguf_bytes(magic=b"FUGG"), "not a GGUF file"),
    "HEADER_BAD_VERSION_0": (gguf_bytes(version=0), "GGUF version 0"),
    "HEADER_BAD_VERSION_1": (gguf_bytes(version=1), "GGUF version 1"),
    "HEADER_BAD_VERSION_FUTURE": (gguf_bytes(version=4), "GGUF version 4"),
    "HEADER_BIG_ENDIAN": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "HEADER_BAD_N_TENSORS": (gguf_bytes(n_tensors=2**64 - 1), "tensors, more than the file"),
    "HEADER_BAD_N_KV": (gguf_bytes(n_kv=2**64 - 1), "keys, more than the file"),
    "HEADER_TRUNCATED": (b"GGUF\x03\x00", "the version at byte 4 needs 4 bytes"),
    "KV_BAD_KEY_SIZE": (gguf_bytes([struct.pack("<Q", 2**64 - 1) + b"my_key_0" + struct.pack("<i", U8) + b"\x01"]),
                        "key #0"),
    "KV_EMPTY_KEY": (gguf_bytes([kv(b"", U8, b"\x01")]), "key #0 is empty"),
    "KV_BAD_TYPE": (gguf_bytes([kv(b"my_key_0", 13, b"\x01")]), "key 'my_key_0' has type 13"),
    "KV_BAD_ARRAY_TYPE": (gguf_bytes([kv(b"my_key_0", ARR, struct.pack("<iQ", 13, 1) + b"\x01")]),
                          "array item type 13"),
    "KV_BAD_VALUE_SIZE": (gguf_bytes([kv(b"my_key_0", STR, struct.pack("<Q", 2**40) + b"abc")]),
                          "the value of key 'my_key_0'"),
    "KV_DUPLICATE_KEY": (gguf_bytes([kv(b"my_key_0", U8, b"\x01"), kv(b"my_key_0", U8, b"\x02")]),
                         "key 'my_key_0' appears twice"),
    "KV_BAD_ALIGN": (gguf_bytes([ALIGN]), "'general.alignment' must be a UINT32 power of two"),
    "KV_WRONG_TYPE_ALIGN": (gguf_bytes([kv(b"general.alignment", I32, struct.pack("<i", 32))]),
                            "'general.alignment' must be a UINT32 power of two"),
    "TENSORS_BAD_NAME_SIZE": (gguf_bytes(tensors=[struct.pack("<Q", 2**40) + b"my_tensor_0"]),
                              "the name of tensor #0"),
    "TENSORS_BAD_N_DIMS": (gguf_bytes(tensors=[tensor_info(b"my_tensor_0", (8, 1, 1, 1, 1), int(T.F32), 0)]),
                           "tensor 'my_tensor_0': 5 dimensions"),
    "TENSORS_BAD_SHAPE": (gguf_bytes(tensors=[tensor_info(b"my_tensor_0", (-1, -1), int(T.F32), 0)]),
                          "tensor 'my_tensor_0': negative dimension"),
    "TENSORS_NE_TOO_BIG": (gguf_bytes(tensors=[tensor_info(b"my_tensor_0", (4 * (2**31 - 1),) * 2, int(T.F32), 0)]),
                           "more than 2**63 elements"),
    "TENSORS_NBYTES_TOO_BIG": (gguf_bytes(tensors=[tensor_info(b"my_tensor_0", (2**31, 2**29), int(T.I64), 0)]),
                               "tensor 'my_tensor_0': data [0, 9223372036854775808) runs past the end"),
    "TENSORS_BAD_TYPE": (gguf_bytes(tensors=[tensor_info(b"my_tensor_0", (8,), 99, 0)]),
                         "tensor 'my_tensor_0': type 99 is not a GGML type"),
    "TENSORS_BAD_BLOCK": (gguf_bytes(tensors=[tensor_info(b"my_tensor_0", (31,), int(T.Q8_0), 0)]),
                          "row length 31 is not a multiple of Q8_0's block of 32"),
    "TENSORS_BAD_OFFSET": (gguf_bytes(tensors=[tensor_info(b"my_tensor_0", (8,), int(T.F32), 2**64 - 1)]),
                           "tensor 'my_tensor_0': data offset"),
    "TENSORS_DUPLICATE_NAME": (gguf_bytes(tensors=[tensor_info(b"my_tensor", (8,), int(T.F32), 0),
                                                   tensor_info(b"my_tensor", (8,), int(T.F32), 32)], data=bytes(64)),
                               "tensor 'my_tensor' appears twice"),
    "TENSORS_BAD_ALIGN": (gguf_bytes([ALIGN], tensors=[tensor_info(b"my_tensor_0", (8,), int(T.F32), 0)]),
                          "'general.alignment' must be a UINT32 power of two"),
    "TENSORS_INCONSISTENT_ALIGN": (gguf_bytes(tensors=two_tensors(alignment=1, types=(T.Q8_0, T.F32),
                                                                  shapes=((32,), (8,)))[0], data=bytes(100)),
                                   "tensor 'my_tensor_1': data offset 34 is not a multiple of the alignment 32"),
    "TENSORS_OVERLAP": (gguf_bytes(tensors=two_tensors(offsets=(0, 32))[0], data=bytes(200)),
                        "tensor 'my_tensor_1' overlaps tensor 'my_tensor_0'"),
    "DATA_NOT_ENOUGH_DATA": (gguf_bytes(tensors=two_tensors()[0], data=two_tensors()[1][:131]),
                             "tensor 'my_tensor_1': data [64, 132) runs past the end of the file"),
    "DATA_MEM_SIZE_OVERFLOW": (gguf_bytes(tensors=[tensor_info(b"my_tensor_0", (0x7FFFFFFFFFFFFFC0,), int(T.I8), 0),
                                                   tensor_info(b"my_tensor_1", (0x7FFFFFFFFFFFFFC0,), int(T.I8),
                                                               0x7FFFFFFFFFFFFFC0)], data=bytes(32)),
                               "runs past the end of the file"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_llama_cpp_corrupt_file_is_a_format_error_naming_the_field(case, tmp_path):
    data, fragment = BAD_CASES[case]
    path = write(tmp_path, data)
    with pytest.raises(FormatError) as e:
        read_gguf(path)
    assert str(path) in str(e.value) and fragment in str(e.value), str(e.value)
    with pytest.raises(FormatError):  # and fxquant's metadata reader says the same, never IndexError
        gguf_metadata(path)


def test_llama_cpp_success_files_are_read(tmp_path):
    """HEADER_EMPTY, KV_SUCCESS (every value type), TENSORS_ZERO_DIM, DATA_SUCCESS / DATA_CUSTOM_ALIGN."""
    assert read_gguf(write(tmp_path, gguf_bytes(), "empty.gguf")).tensors == {}
    values = [(U8, struct.pack("<B", 7), 7), (1, struct.pack("<b", -7), -7), (2, struct.pack("<H", 700), 700),
              (3, struct.pack("<h", -700), -700), (U32, struct.pack("<I", 2**31), 2**31), (I32, struct.pack("<i", -5), -5),
              (F32V, struct.pack("<f", 0.5), 0.5), (BOOL, b"\x01", True), (STR, s(b"abc"), "abc"),
              (U64, struct.pack("<Q", 2**63), 2**63), (11, struct.pack("<q", -(2**40)), -(2**40)), (12, struct.pack("<d", 0.25), 0.25),
              (ARR, struct.pack("<iQ", I32, 3) + struct.pack("<3i", 1, -2, 3), (I32, [1, -2, 3])),
              (ARR, struct.pack("<iQ", STR, 2) + s(b"x") + s(b""), (STR, ["x", ""]))]
    g = read_gguf(write(tmp_path, gguf_bytes([kv(f"my_key_{i}".encode(), t, b) for i, (t, b, _) in enumerate(values)]),
                        "kv.gguf"))
    assert [g.kv[f"my_key_{i}"] for i in range(len(values))] == [(t, v) for t, _, v in values]
    zero = read_gguf(write(tmp_path, gguf_bytes(tensors=[tensor_info(b"z", (32, 0), int(T.Q8_0), 0)]), "zero.gguf"))
    assert zero.tensors["z"].nbytes == 0
    for alignment in (32, 1):
        extra = [kv(b"general.alignment", U32, struct.pack("<I", alignment))] if alignment != 32 else []
        infos, data, sizes = two_tensors(alignment=alignment)
        path = write(tmp_path, gguf_bytes(extra, infos, data, alignment=alignment), f"data{alignment}.gguf")
        g = read_gguf(path)
        raw = path.read_bytes()
        for i, size in enumerate(sizes):
            t = g.tensors[f"my_tensor_{i}"]
            assert (t.nbytes, raw[g.data_start + t.offset:][:size]) == (size, data[t.offset:t.offset + size])


# ---------------------------------------------------------------- fxquant's own files and their digests

def _corrupt(src, tmp_path, edit, name="bad.gguf"):
    dst = tmp_path / name
    data = bytearray(src.read_bytes())
    edit(data)
    dst.write_bytes(bytes(data))
    return dst


def _tensor_span(path, name):
    g = read_gguf(path)
    t = g.tensors[name]
    return g.data_start + t.offset, t.nbytes, t.type_name


def test_save_gguf_records_digests_that_gguf_py_ignores(gguf_file):
    md = gguf_metadata(gguf_file)
    assert set(md["fxquant.tensor_sha256"]) == set(read_gguf(gguf_file).tensors)
    assert "fxquant.recipe" in md["fxquant.metadata_sha256"]
    reader = gguf.GGUFReader(gguf_file)  # gguf-py still reads every tensor
    assert {t.name for t in reader.tensors} == set(md["fxquant.tensor_sha256"])


@pytest.mark.parametrize("kind", ["Q8_0", "F32"])
def test_flipped_byte_in_a_tensor_names_the_tensor(gguf_file, tmp_path, kind):
    g = read_gguf(gguf_file)
    name = next(n for n, t in sorted(g.tensors.items()) if t.type_name == kind)
    start, nbytes, _ = _tensor_span(gguf_file, name)

    def flip(d):
        d[start + nbytes // 2] ^= 0x10

    bad = _corrupt(gguf_file, tmp_path, flip)
    with pytest.raises(FormatError, match=f"tensor '{name}': data does not match its sha256"):
        gguf_metadata(bad)


def test_swapped_tensor_bytes_name_a_tensor(gguf_file, tmp_path):
    a, b = "layers.0.attention.to_q.weight", "layers.0.attention.to_k.weight"
    (sa, na, _), (sb, nb, _) = _tensor_span(gguf_file, a), _tensor_span(gguf_file, b)
    assert na == nb

    def swap(d):
        d[sa:sa + na], d[sb:sb + nb] = d[sb:sb + nb], d[sa:sa + na]

    with pytest.raises(FormatError, match=f"tensor '({a}|{b})': data does not match"):
        gguf_metadata(_corrupt(gguf_file, tmp_path, swap))


def test_flipped_byte_in_the_recipe_names_the_key(gguf_file, tmp_path):
    text = json.dumps(gguf_metadata(gguf_file)["fxquant.recipe"], sort_keys=True).encode()

    def flip(d):
        i = bytes(d).index(text)
        d[i + 1] ^= 0x01  # '"' -> '#': invalid JSON as well as a changed value

    with pytest.raises(FormatError, match="metadata key 'fxquant.recipe' does not match its sha256"):
        gguf_metadata(_corrupt(gguf_file, tmp_path, flip))


def test_edited_digest_record_and_added_key_are_named(gguf_file, tmp_path):
    def edit_record(d):
        i = bytes(d).index(b'"sha256": "') + 11
        d[i] = ord("0") if d[i] != ord("0") else ord("1")

    with pytest.raises(FormatError, match="metadata key 'fxquant.tensor_sha256' does not match"):
        gguf_metadata(_corrupt(gguf_file, tmp_path, edit_record))


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.9999])
def test_truncated_file_is_a_format_error(gguf_file, tmp_path, keep):
    size = gguf_file.stat().st_size

    def cut(d):
        del d[int(size * keep):]

    with pytest.raises(FormatError, match="truncated|runs past the end"):
        gguf_metadata(_corrupt(gguf_file, tmp_path, cut))


def test_file_without_digests_loads_with_a_warning(gguf_file, tmp_path, q8):
    """A GGUF rewritten by gguf-py without fxquant's digest keys: read, verified nothing, warned."""
    reader = gguf.GGUFReader(gguf_file)
    out = tmp_path / "nodigests.gguf"
    w = gguf.GGUFWriter(out, arch=reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("fxquant.") and "sha256" not in key:
            w.add_key_value(key, field.contents(), gguf.GGUFValueType.STRING)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.warns(UserWarning, match="not verified"):
        md = gguf_metadata(out)
    assert md["fxquant.recipe"] == gguf_metadata(gguf_file)["fxquant.recipe"]
    diffusers_integration = pytest.importorskip("fxquant.integrations.diffusers")
    pytest.importorskip("accelerate")
    with pytest.warns(UserWarning, match="not verified"):
        model = diffusers_integration.load_gguf(out)
    ref = diffusers_integration.load_gguf(gguf_file)
    x = inputs(in_channels=32)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).sample, ref(**x).sample, rtol=0, atol=0)


def test_load_gguf_refuses_a_corrupt_tensor_before_diffusers_reads_it(gguf_file, tmp_path):
    pytest.importorskip("accelerate")
    from fxquant.integrations.diffusers import load_gguf

    start, nbytes, _ = _tensor_span(gguf_file, "layers.0.attention.to_q.weight")

    def flip(d):
        d[start] ^= 0xFF

    with pytest.raises(FormatError, match="tensor 'layers.0.attention.to_q.weight': data does not match"):
        load_gguf(_corrupt(gguf_file, tmp_path, flip))


def test_verify_is_what_gguf_metadata_runs(gguf_file, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copy(gguf_file, copy)
    assert verify_gguf(copy).tensors == read_gguf(gguf_file).tensors

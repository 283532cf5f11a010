"""``.pt2`` files: `load_pt2` verifies every archive member; plain ``torch.export.load`` does not.

    save_pt2(gm) -> zip: archive/data/weights/weight_N, archive/models/model.json, ...,
                         archive/extra/fxquant_digests.json  (sha256 of every other member)
"""

from __future__ import annotations

import io
import json
import re
import zipfile

import pytest
import torch

import fxquant
from fxquant.errors import FormatError

from .conftest import inputs

DIGESTS = "archive/extra/fxquant_digests.json"


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def _rezip(members, path):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _weight_span(path, member):
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    raw = path.read_bytes()
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    return start, info.file_size


def _largest_weight(path):
    with zipfile.ZipFile(path) as zf:
        return max((i for i in zf.infolist() if "/data/weights/weight_" in i.filename), key=lambda i: i.file_size).filename


def test_load_pt2_round_trip_is_bit_identical(w8a8, pt2_file):
    ep = fxquant.load_pt2(pt2_file)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**x).sample, w8a8(**x).sample, rtol=0, atol=0)
    assert DIGESTS in _members(pt2_file)


def test_flipped_byte_in_a_weight_is_named_by_load_pt2_and_missed_by_torch(w8a8, pt2_file, tmp_path):
    member = _largest_weight(pt2_file)
    start, size = _weight_span(pt2_file, member)
    data = bytearray(pt2_file.read_bytes())
    data[start + size // 8 * 4 + 3] ^= 0x40  # the sign/exponent byte of a float32 in the middle
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(bytes(data))
    with pytest.raises(FormatError, match=f"member '{member}'"):
        fxquant.load_pt2(bad)
    # What docs/formats.md says torch.export.load does not check: the same file loads, outputs move.
    ep = torch.export.load(bad)
    x = inputs()
    with torch.no_grad():
        assert not torch.equal(ep.module()(**x).sample, w8a8(**x).sample)


def test_member_added_or_removed_is_named(pt2_file, tmp_path):
    members = _members(pt2_file)
    extra = dict(members, **{"archive/extra/note.txt": b"hello"})
    with pytest.raises(FormatError, match="member 'archive/extra/note.txt' is not listed"):
        fxquant.load_pt2(_rezip(extra, tmp_path / "added.pt2"))
    member = _largest_weight(pt2_file)
    fewer = {k: v for k, v in members.items() if k != member}
    with pytest.raises(FormatError, match=f"member '{member}' listed in .* is missing"):
        fxquant.load_pt2(_rezip(fewer, tmp_path / "removed.pt2"))


def test_malformed_digest_record_is_named(pt2_file, tmp_path):
    members = _members(pt2_file)
    for body, what in ((b"{not json", "not a readable JSON record"), (json.dumps({"format": "x"}).encode(), "malformed")):
        with pytest.raises(FormatError, match=f"member '{DIGESTS}' (is )?{what}"):
            fxquant.load_pt2(_rezip(dict(members, **{DIGESTS: body}), tmp_path / "rec.pt2"))


def test_plain_torch_pt2_loads_with_a_warning(w8a8, tmp_path):
    path = tmp_path / "plain.pt2"
    torch.export.save(fxquant.export_program(w8a8), path)
    with pytest.warns(UserWarning, match="no fxquant digests"):
        ep = fxquant.load_pt2(path)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(**x).sample, w8a8(**x).sample, rtol=0, atol=0)


@pytest.mark.parametrize("content, fragment", [(b"not a zip", "not a .pt2 (zip) archive"), (None, "cannot read")])
def test_not_a_pt2_is_a_format_error_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "x.pt2"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(FormatError, match=re.escape(f"{path}: {fragment}")):
        fxquant.load_pt2(path)


def test_fxquant_load_points_a_pt2_to_load_pt2(pt2_file):
    with pytest.raises(FormatError, match="fxquant.load_pt2"):
        fxquant.load(pt2_file)


def test_serialization_id_is_fixed_and_crcs_still_check(pt2_file):
    with zipfile.ZipFile(pt2_file) as zf:
        assert zf.testzip() is None  # every CRC, including the patched member's
        sid = zf.read("archive/.data/serialization_id")
    assert sid[20:] == b"0" * (len(sid) - 20)
    torch.export.load(io.BytesIO(pt2_file.read_bytes()))  # torch's reader accepts the archive

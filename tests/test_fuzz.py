"""Fuzzing (hypothesis) of the three loaders that read what comes from outside the process.

Frame decoder (`actcomp_edge.core.protocol.FrameDecoder.feed`):
- any bytes, any chunking, as bytes, bytearray or (strided) memoryview: never raises, and
  after every feed the buffer holds at most one frame still arriving (fewer bytes than a
  header, or a header that checks out whose frame is not complete, with no complete frame
  inside); bytes fed = bytes skipped + bytes of the frames returned + bytes buffered;
- valid frames (any JSON records, non-ASCII text, b"AC\\x01" in the payload) with frame-like
  garbage between them (torn frames, headers that check out, corrupted frames, the magic,
  noise), any chunking: every frame decoded, intact and in order, nothing else;
- a stream of valid frames with random byte flips (and inserted or deleted bytes): every
  untouched frame decoded, in order; with flips only, exactly the untouched ones.

Artifact manifest (`actcomp_edge.core.manifest.load_manifest`):
- manifest.json of arbitrary bytes, JSON values, edits of the real text, deep nesting:
  only a one-line ArtifactError;
- structured mutations of a real manifest (a key deleted anywhere, a value replaced by
  another JSON type or an odd value of the same type, wrong-typed list items, path-like and
  non-string file names): a one-line ArtifactError, or (verify=False) a manifest the readers
  use without an exception: `actcomp-device info`, `actcomp check`, the Trainer's setup (its
  onnxruntime sessions stubbed), its schedule walk, the budget's rank caps.

Device profiles (`actcomp_edge.core.profiles.load_profile`, `validate`):
- arbitrary text or bytes as the .toml file, arbitrary names, arbitrary TOML documents (known
  and random keys; strings incl. size strings, huge ints, floats, bools, datetimes, arrays,
  tables): only a one-line ProfileError, or a Profile with the documented types and
  constraints (sizes ints up to 2**63 - 1, ram >= 64 MiB, budget + runtime_baseline <= ram,
  cores in 1..65536) that the accounting and `to_json` handle; validate() of the same dict
  agrees with load_profile.
"""
import contextlib
import datetime as dt
import functools
import hashlib
import io
import json
import random
import shutil
import string
import zlib
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from actcomp_edge.core import manifest as manifest_module
from actcomp_edge.core.manifest import (MANIFEST, ArtifactError, Compress, content_digest,
                                        load_manifest)
from actcomp_edge.core.profiles import (KEYS, MIN_RAM, Fit, Profile, ProfileError, load_profile,
                                   validate)
from actcomp_edge.core.protocol import (ACK, CRC, DATA, HEADER, HEADER_SIZE, MAGIC, MAX_PAYLOAD,
                                   MAX_SEQ, OVERHEAD, VERSION, Frame, FrameDecoder,
                                   ProtocolError, encode_ack, encode_frame)
from helpers import assert_one_line

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much,
                                       HealthCheck.function_scoped_fixture])


def fuzz(n):
    return settings(FUZZ, max_examples=n)


# ---------------------------------------------------------------- JSON values

ODD_STRINGS = ["", ".", "..", "../x", "/etc/passwd", "a/b", "x" * 300, "nul\x00.onnx",
               "réseau.onnx", "\ud800", "manifest.json", "weights.npz", "AC\x01", "C:\\x",
               " ", "1.16.3", "99.0", "1.²", "1." + "9" * 5000]
ODD_INTS = [0, -1, 1, 2, 3, 2 ** 31, 2 ** 63, -2 ** 63, 10 ** 30, -10 ** 30]
text = st.text(max_size=12)  # any code point but lone surrogates
json_leaves = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70)
               | st.sampled_from(ODD_INTS) | st.floats() | text | st.sampled_from(ODD_STRINGS))
json_values = (json_leaves | st.lists(json_leaves, max_size=3)  # two levels: cheap to draw
               | st.dictionaries(text, json_leaves | st.lists(json_leaves, max_size=2),
                                 max_size=3))


# ---------------------------------------------------------------- frame decoder

CORPUS = [  # records like a runner's, and awkward ones; `records` adds generated ones
    {}, {"a": 1}, {"type": "step", "step": 3, "loss": 0.25, "layer": "ré-lu", "ranks": [1, 2, 3]},
    {"note": "AC\x01 ACK", "magic": "AC\x01\x01\x00\x00"}, {"AC\x01": "AC\x02" * 50},
    {"x": float("nan"), "y": float("inf"), "z": -0.0, "w": 1e-310, "v": 1.7976931348623157e308},
    {"big": 2 ** 70, "neg": -2 ** 63, "zero": 0}, {"text": "日本語 ✓ \U0001F600 \x7f \u2028"},
    {"nested": {"a": [1, {"b": None}], "c": [True, False, []], "d": {}}},
    {"blob": "x" * 5000}, {"blob": "AC\x01" * 700}, {"blob": "é" * 3000, "n": 1},
]
record_leaves = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | text
                 | st.sampled_from(["AC\x01", "AC\x01\x02" * 20, "ré-lu €"]))
records = st.sampled_from(CORPUS) | st.dictionaries(
    text | st.sampled_from(["AC\x01", "AC\x01 ACK", "ré-lu"]),
    record_leaves | st.lists(record_leaves, max_size=3), max_size=3)
seqs = st.integers(0, MAX_SEQ) | st.integers(0, 40)


@st.composite
def frames(draw):
    """A Frame as the decoder returns it."""
    seq = draw(seqs)
    if draw(st.integers(0, 4)) == 0:
        return Frame(ACK, seq)
    return Frame(DATA, seq, draw(st.integers(0, seq)), draw(records))


def wire(frame):
    return (encode_frame(frame.seq, frame.record, frame.base) if frame.kind == DATA
            else encode_ack(frame.seq))


def header(kind, seq, base, length):
    """A frame header that checks out (its CRC is right), with no payload after it."""
    head = HEADER.pack(MAGIC, VERSION, kind, seq, base, length)
    return head + CRC.pack(zlib.crc32(head))


POOL = [wire(Frame(DATA, seq, seq // 2, record)) for seq, record in enumerate(CORPUS)] \
    + [wire(Frame(ACK, seq)) for seq in (0, 7, MAX_SEQ)]  # frames to tear and corrupt
pooled = st.sampled_from(POOL)


@st.composite
def torn(draw):
    """A frame cut short: at least its last payload byte and its CRC are missing."""
    data = draw(pooled)
    return data[:draw(st.integers(0, len(data) - 5))]


@st.composite
def corrupted(draw):
    """A frame with one byte changed: never valid (every CRC-32 catches one bad byte)."""
    data = bytearray(draw(pooled))
    data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(data)


noise = st.tuples(st.integers(0, 2 ** 32), st.sampled_from([50, 1000, 65536])).map(
    lambda seed_size: random.Random(seed_size[0]).randbytes(seed_size[1]))
TOKENS = [b"A", b"C", b"AC", b"\x01", b"\x02", b"\x00", b"\xff", b"{", b"}"]
header_like = st.tuples(st.integers(0, 2 ** 32), st.integers(0, 400)).map(  # magic-rich noise
    lambda seed_size: b"".join(random.Random(seed_size[0]).choices(TOKENS, k=seed_size[1])))
garbage_pieces = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"A", b"C", b"AC", b"AC\x01", b"AC\x02", b"ACAC", b"AC\x01\x01\x00\x00",
                     b"\x00", b"\xff", b"{", b"}"]),
    st.builds(header, st.sampled_from([DATA, ACK, 0, 3, 255]), seqs, seqs,
              st.sampled_from([0, 1, 5, 100, MAX_PAYLOAD, MAX_PAYLOAD + 1, 2 ** 32 - 1])
              | st.integers(0, 2 ** 32 - 1)),
    torn(), corrupted(), noise, header_like)
garbage = st.lists(garbage_pieces, max_size=2).map(b"".join)


def chunked(draw, data):
    """data cut at arbitrary places (or every k bytes), each piece as bytes, bytearray,
    memoryview or strided memoryview."""
    rng = random.Random(draw(st.integers(0, 2 ** 32)))
    if draw(st.booleans()):
        cuts = sorted(rng.randint(0, len(data)) for _ in range(draw(st.integers(0, 40))))
    else:
        step = max(draw(st.integers(1, 300)), len(data) // 200)  # at most 200 pieces
        cuts = list(range(0, len(data), step))
    pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    forms = []
    for piece in pieces:
        form = rng.choice(["bytes", "bytearray", "memoryview", "strided"])
        if form == "bytearray":
            piece = bytearray(piece)
        elif form == "memoryview":
            piece = memoryview(piece)
        elif form == "strided":  # every other byte of a buffer twice as long
            spaced = bytearray(2 * len(piece))
            spaced[::2] = piece
            piece = memoryview(spaced)[::2]
        forms.append(piece)
    return forms


def feed_all(decoder, pieces):
    """Feed every piece; check the buffer bound and byte accounting after each."""
    got, fed, consumed = [], 0, 0
    for piece in pieces:
        new = decoder.feed(piece)
        fed += len(bytes(piece))
        consumed += sum(len(wire(f)) for f in new)
        for f in new:
            assert isinstance(f, Frame) and f.kind in (DATA, ACK)
            assert 0 <= f.base <= f.seq <= MAX_SEQ
            assert isinstance(f.record, dict) if f.kind == DATA else f.record is None
        assert_bounded(bytes(decoder._buffer))
        assert fed == decoder.skipped + consumed + len(decoder._buffer)
        got += new
    return got


def assert_bounded(buffer):
    """At most one frame still arriving: a start of the magic, a partial header, or a header
    that checks out for a frame longer than the buffer, with no complete frame inside."""
    if len(buffer) < HEADER_SIZE:
        assert buffer[:2] == MAGIC[:len(buffer[:2])] and (len(buffer) < 3 or buffer[2] == VERSION)
        return
    assert frame_end(buffer, 0) > len(buffer)
    at = buffer.find(START, 1)
    while at >= 0:
        assert frame_end(buffer, at) in (None, len(buffer) + 1), at
        at = buffer.find(START, at + 1)


START = MAGIC + bytes([VERSION])


def frame_end(buffer, at):
    """Where the frame at buffer[at:] ends if it is complete with both CRCs right,
    len(buffer) + 1 if its header checks out (or is not all there) but not the rest yet."""
    if buffer[at:at + 3] != START:
        return None
    if len(buffer) - at < HEADER_SIZE:
        return len(buffer) + 1
    length = HEADER.unpack_from(buffer, at)[5]
    head = buffer[at:at + HEADER.size]
    if CRC.unpack_from(buffer, at + HEADER.size)[0] != zlib.crc32(head) or length > MAX_PAYLOAD:
        return None
    end = at + OVERHEAD + length
    if end > len(buffer):
        return len(buffer) + 1
    return end if zlib.crc32(buffer[at:end - 4]) == CRC.unpack_from(buffer, end - 4)[0] else None


@fuzz(3000)
@given(st.data(), st.lists(garbage_pieces | frames().map(wire), max_size=10).map(b"".join))
def test_decoder_any_bytes_never_raise_and_stay_bounded(data, stream):
    feed_all(FrameDecoder(), chunked(data.draw, stream))


def released_view():
    view = memoryview(b"AC")
    view.release()
    return view


@fuzz(1000)
@given(st.one_of(st.none(), st.integers(), st.floats(), text, st.lists(st.integers(0, 255)),
                 st.builds(released_view)))
def test_decoder_refuses_what_is_not_bytes_with_a_protocol_error(value):
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(value)


@fuzz(1000)
@given(st.data(), st.lists(st.tuples(garbage, frames()), max_size=6), garbage)
def test_decoder_finds_every_frame_between_garbage(data, items, tail):
    stream = b"".join(junk + wire(frame) for junk, frame in items) + tail
    got = feed_all(FrameDecoder(), chunked(data.draw, stream))
    assert [wire(f) for f in got] == [wire(frame) for _, frame in items]


@fuzz(1000)
@given(st.data(), st.lists(frames(), min_size=1, max_size=20))
def test_decoder_loses_only_the_frames_a_mutation_touched(data, originals):
    encoded = [wire(f) for f in originals]
    starts = [sum(map(len, encoded[:i])) for i in range(len(encoded))]
    stream = bytearray(b"".join(encoded))
    positions = data.draw(st.lists(st.integers(0, len(stream) - 1), min_size=1, max_size=6,
                                   unique=True))
    hows = data.draw(st.lists(st.sampled_from(["flip"] * 4 + ["insert", "delete"]),
                              min_size=len(positions), max_size=len(positions)))
    touched = set()
    for position, how in sorted(zip(positions, hows), reverse=True):  # offsets hold
        touched.add(max(i for i, s in enumerate(starts) if s <= position))
        if how == "flip":
            stream[position] ^= data.draw(st.integers(1, 255))
        elif how == "insert":
            stream.insert(position, data.draw(st.integers(0, 255)))
        else:
            del stream[position]
    got = [wire(f) for f in feed_all(FrameDecoder(), chunked(data.draw, bytes(stream)))]
    untouched = [w for i, w in enumerate(encoded) if i not in touched]
    if set(hows) == {"flip"}:
        assert got == untouched
    else:  # an insertion between frames touches none: intact frames in order, the untouched ones
        rest = iter(encoded)
        assert all(any(w == o for o in rest) for w in got)
        assert all(w in got for w in untouched)


# ---------------------------------------------------------------- manifest

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from export.training_graph import TrainConfig
    from export_helpers import export, random_model
    spec, model = random_model("mcunet-in1", 3, calibration_hw=(64, 64))
    return export(model, spec, tmp_path_factory.mktemp("art"),
                  TrainConfig(n_layers=4, method="hosvd", eps=0.9), 8, (64, 64)).folder


@pytest.fixture(scope="module")
def real(exported, tmp_path_factory):
    """(a folder to write fuzzed manifests into, the real manifest for it): a copy of the
    exported artifact with small stand-ins for its files, so that each example is fast:
    the ONNX files (never opened: the sessions are stubbed) are a few bytes, the .npz hold
    the same names with one float each; the manifest's digests follow."""
    from actcomp_edge.core.npz import load_npz, save_npz
    folder = tmp_path_factory.mktemp("fuzz") / "art"
    shutil.copytree(exported, folder)
    original = json.loads((folder / MANIFEST).read_text())
    for name in original["files"]:
        if name.endswith(".onnx"):
            (folder / name).write_bytes(name.encode())
        else:
            save_npz(folder / name, {k: np.zeros(1, np.float32) for k in load_npz(folder / name)})
        original["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    original["digest"] = content_digest(original)
    return folder, original


def nodes(tree, depth, path=()):
    """The paths of the nodes of a JSON tree from 1 to `depth` levels below the root."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) \
        if isinstance(tree, list) else ()
    for key, value in items:
        yield path + (key,)
        if depth > 1:
            yield from nodes(value, depth - 1, path + (key,))


odd_ints = st.sampled_from(ODD_INTS) | st.integers()
odd_text = st.sampled_from(ODD_STRINGS) | text


def odd_value_like(draw, value):
    """A value of the same JSON type as `value`, chosen to be awkward."""
    if isinstance(value, bool):
        return draw(st.booleans())
    if isinstance(value, int):
        return draw(odd_ints)
    if isinstance(value, float):
        return draw(st.floats())
    if isinstance(value, str):
        return draw(odd_text)
    if isinstance(value, list):  # an item replaced or appended, or all of other types
        how = draw(st.integers(0, 2))
        if how == 0 and value:
            i = draw(st.integers(0, len(value) - 1))
            return value[:i] + [draw(json_values)] + value[i + 1:]
        return value + [draw(json_values)] if how == 1 else draw(st.lists(json_leaves, max_size=4))
    if isinstance(value, dict):
        return dict(value, **{draw(odd_text): draw(json_values)})
    return draw(json_values)


@st.composite
def mutated(draw, original_text):
    """The real manifest with 1 to 3 keys or items deleted, retyped, given odd values of
    their type, renamed, or with items inserted before them."""
    m = json.loads(original_text)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(nodes(m, draw(st.integers(1, 5))))
        if not paths:
            break
        path = paths[draw(st.integers(0, len(paths) - 1))]
        parent = functools.reduce(lambda node, key: node[key], path[:-1], m)
        key = path[-1]
        how = draw(st.sampled_from(["delete", "retype", "odd", "odd", "rename", "insert"]))
        if how == "delete":
            del parent[key]
        elif how == "retype":
            parent[key] = draw(json_values)
        elif how == "odd":
            parent[key] = odd_value_like(draw, parent[key])
        elif how == "rename" and isinstance(parent, dict):
            parent[draw(odd_text)] = parent.pop(key)
        elif isinstance(parent, list):
            parent.insert(key, draw(json_values))
    return m


def write(folder, content: bytes):
    (folder / MANIFEST).write_bytes(content)


def load_or_refuse(folder, **kwargs):
    """The manifest, or None after a one-line ArtifactError."""
    try:
        m = load_manifest(folder, **kwargs)
    except ArtifactError as e:
        assert_one_line(e)
        event("manifest refused")
        return None
    event("manifest accepted")
    return m


manifest_bytes = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(text, json_values).map(
        lambda d: json.dumps(dict(d, format="actcomp-edge/training-artifact",
                                  format_version=1)).encode()),
    st.sampled_from([b"[" * 100000, b'{"a":' * 100000, b"1" * 5000, b"\xff\xfe{}",
                     "{}".encode("utf-16"), b'{"format": "\\ud800"}', b"NaN", b""]))


@fuzz(1000)
@given(st.data(), manifest_bytes)
def test_manifest_of_any_bytes_is_refused_in_one_line_or_usable(real, data, content):
    folder, original = real
    if data.draw(st.booleans()):  # an edit of the real text
        text_ = json.dumps(original, indent=1, sort_keys=True).encode()
        at = data.draw(st.integers(0, len(text_)))
        cut = data.draw(st.integers(0, 40))
        content = text_[:at] + content[:20] + text_[at + cut:]
    write(folder, content)
    m = load_or_refuse(folder, verify=False)
    if m is not None:
        load_or_refuse(folder)
        use_like_the_readers(folder, m)


class StubSession:
    """onnxruntime.InferenceSession without the model: no inputs, no outputs."""

    def __init__(self, *args, **kwargs):
        pass

    def get_inputs(self):
        return []

    get_outputs = get_inputs


def use_like_the_readers(folder, m):
    """What `actcomp-device info`, `actcomp check` and the device runner do with manifest m
    (verify=False: the fuzzed manifest's digests need not match); none may raise."""
    import onnxruntime as ort

    from actcomp_edge.host import cli as host_cli
    from device_runner import cli as device_cli
    from device_runner.data import Dataset
    from device_runner.runtime import Trainer, deploy_metadata
    from device_runner.train import rank_caps_for_budget
    unverified = functools.partial(load_manifest, verify=False)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # a real stdout: strict UTF-8
    with mock.patch.object(manifest_module, "load_manifest", unverified), \
            contextlib.redirect_stdout(out):
        assert device_cli.cmd_info(SimpleNamespace(artifact=folder)) == 0
        args = SimpleNamespace(artifact=folder, profile="pi-zero-2w", budget=None, json=False)
        assert host_cli.cmd_check(args) in (0, 1)
        out.flush()
    with mock.patch.object(ort, "InferenceSession", StubSession):
        trainer = Trainer(folder, verify=False)
    assert device_cli.input_size(trainer) == (m.input.height, m.input.width)
    deploy_metadata(trainer.manifest)  # the inference model's class names and input
    for item in trainer.schedule:  # the accesses of Trainer.forward
        if isinstance(item, Compress):
            layer = trainer.layers[item.layer]
            assert isinstance(layer.input, str) and isinstance(layer.stride, int)
            assert all(isinstance(name, str) for name in layer.kept)
        else:
            assert isinstance(item.graph, str)
    for layer in trainer.layers.values():
        assert all(isinstance(name, str) for name in layer.masks)
        assert Compress(layer.name) in trainer.schedule  # its kept bytes are counted
    for allowance in (1, 10 ** 6, 10 ** 12):
        caps = rank_caps_for_budget(trainer, m.predicted_memory.batch_size, allowance)
        assert all(isinstance(c, int) and c >= 1 for c in caps.values())
    images = Dataset(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64), ["a"])
    with np.errstate(all="ignore"):  # e.g. a std of 1e-310 is 0 as float32: inf pixels
        x, _ = images.batch(np.arange(2), m.input.mean, m.input.std)  # as fit()
    assert x.shape == (2, 3, 4, 4)


@fuzz(1000)
@given(st.data())
def test_mutated_manifest_is_refused_in_one_line_or_usable(real, data):
    folder, original = real
    m = data.draw(mutated(json.dumps(original)))
    write(folder, json.dumps(m).encode())
    import onnxruntime as ort
    accepted = load_or_refuse(folder, onnxruntime_version=ort.__version__, verify=False)
    if accepted is not None:  # (refused: verify=True refuses it at the same check)
        load_or_refuse(folder)
        use_like_the_readers(folder, accepted)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_manifest_with_a_non_finite_number_is_refused_in_one_line(real, number):
    folder, original = real
    text = json.dumps(original).replace('"weight_decay": 0.0', f'"weight_decay": {number}')
    assert number in text
    write(folder, text.encode())
    with pytest.raises(ArtifactError, match="not valid JSON") as e:
        load_manifest(folder)
    assert_one_line(e.value)


@pytest.mark.parametrize("key, value, message", [
    ("classes", 5, "key 'classes' must be null or a list of strings, got 5"),
    ("classes", ["a"], "key 'classes' names 1 classes, num_classes is"),
    ("dropout_not_applied", "x", "key 'dropout_not_applied' must be null or a number in [0, 1)"),
])
def test_class_names_and_dropout_of_the_wrong_type_are_refused_in_one_line(real, key, value,
                                                                           message):
    """Keys the typed manifest holds that the runner reads (class names: the inference
    model's metadata and the data's labels; dropout: a note) are checked like the rest."""
    folder, original = real
    write(folder, json.dumps(dict(original, **{key: value})).encode())
    with pytest.raises(ArtifactError) as e:
        load_manifest(folder)
    assert message in str(e.value)
    assert_one_line(e.value)


def test_the_real_manifest_loads_and_is_usable(exported, real):
    assert load_manifest(exported).to_json() == json.loads((exported / MANIFEST).read_text())
    folder, original = real
    write(folder, json.dumps(original).encode())
    assert load_manifest(folder).to_json() == original
    use_like_the_readers(folder, load_manifest(folder))


# ---------------------------------------------------------------- profiles

def toml_string(s):
    escaped = "".join("\\" + ch if ch in '"\\' else f"\\u{ord(ch):04x}"
                      if ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in s)
    return f'"{escaped}"'


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)  # inf, -inf, nan, 1e+300 are TOML floats
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(map(toml_value, v)) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def toml_document(d):
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in d.items())


SIZE_STRINGS = ["48MiB", "512MB", "1.5GiB", "64KiB", "64 KiB", " 2G ", "1e9", "-5MiB", "inf",
                "nan", "0", "0B", "0.4B", ".5G", "5.", "64mib", "12XB", "", "MiB", "1" * 400,
                "9" * 400 + "GiB", "8EiB", "16384PiB", "9223372036854775807",
                "9223372036854775808", "8388608TiB", "64MiB", "160MiB", "100MiB", "512MiB",
                "1GiB", "4G", "1.5 GiB", "0.0001GiB"]
zones = st.sampled_from([None, dt.timezone.utc, dt.timezone(dt.timedelta(hours=5, minutes=30)),
                         dt.timezone(-dt.timedelta(hours=8))])
toml_leaves = st.one_of(
    text, st.sampled_from(SIZE_STRINGS), st.integers(), st.sampled_from(ODD_INTS),
    st.integers(1, 2 ** 63 - 1), st.integers(1, 2 ** 34),
    st.sampled_from([10 ** 400, -10 ** 400, 10 ** 4000, 2 ** 64, 4, 64 * 2 ** 20]),
    st.floats(), st.booleans(), st.dates(),
    st.datetimes(timezones=zones).map(lambda t: t.replace(fold=0)),  # TOML has no fold
    st.times().map(lambda t: t.replace(fold=0)))
toml_values = (toml_leaves | st.lists(toml_leaves, max_size=3)
               | st.dictionaries(text, toml_leaves | st.lists(toml_leaves, max_size=2),
                                 max_size=2))
PLAUSIBLE = {  # values of the right type, often out of range
    "size": st.sampled_from(SIZE_STRINGS) | st.integers(1, 2 ** 34) | st.integers(),
    "int": st.integers(-2, 70000) | st.sampled_from(ODD_INTS) | st.integers(),
    "str": text | st.sampled_from(["Raspberry Pi 4", "/dev/ttyGS0", "aarch64", " ", ""]),
}
GOOD = {"name": "test board", "ram": "512MiB", "cores": 4, "budget": "160MiB",
        "runtime_baseline": "100MiB", "serial_port": "/dev/ttyGS0", "arch": "aarch64"}


@st.composite
def profile_dicts(draw):
    """The known keys, each good, plausible (right type), any TOML value or missing; now and
    then an unknown key."""
    d = {}
    for key, (kind, _) in KEYS.items():
        roll = draw(st.integers(0, 19))
        if roll < 10 and key in GOOD:
            d[key] = GOOD[key]
        elif roll < 17:
            d[key] = draw(PLAUSIBLE[kind])
        elif roll < 19:
            d[key] = draw(toml_values)
    if draw(st.integers(0, 9)) == 0:
        d[draw(text)] = draw(toml_values)
    return d


def check_profile(p):
    assert isinstance(p, Profile)
    for value in (p.name, p.serial_port, p.arch):
        assert isinstance(value, str) and value.strip()
    assert isinstance(p.notes, str) and isinstance(p.path, str)
    sizes = (p.ram_bytes, p.cores, p.budget_bytes, p.runtime_baseline_bytes)
    assert all(type(n) is int for n in sizes)
    assert 1 <= p.cores <= 65536 and p.ram_bytes >= MIN_RAM and p.budget_bytes >= 1
    assert p.runtime_baseline_bytes >= 1
    assert p.budget_bytes + p.runtime_baseline_bytes <= p.ram_bytes < 2 ** 63
    json.dumps(p.to_json())
    for optimizer in ("sgd", "adamw"):  # what `actcomp plan --profile` and `check` print
        fit = Fit.from_params(10 ** 6, 1000, optimizer, p)
        assert all("\n" not in line for line in fit.lines())
        json.dumps(fit.to_json())


def load_or_refuse_profile(load, *args):
    """The Profile, or the message of a one-line ProfileError."""
    try:
        p = load(*args)
    except ProfileError as e:
        assert_one_line(e)
        event("profile refused")
        return str(e)
    check_profile(p)
    event("profile accepted")
    return p


@fuzz(1000)
@given(st.binary(max_size=300) | text.map(str.encode)
       | st.sampled_from([b"a = " + b"[" * 5000, b"a = " + b"{b = " * 3000,
                          b"cores = " + b"9" * 5000, b"\xef\xbb\xbfname = 1", b"\x00"])
       | profile_dicts().map(lambda d: toml_document(d).encode()).flatmap(
           lambda doc: st.integers(0, len(doc)).map(lambda at: doc[:at] + doc[at + 1:])))
def test_profile_file_of_any_bytes(tmp_path, content):
    path = tmp_path / "fuzz.toml"
    path.write_bytes(content)
    load_or_refuse_profile(load_profile, path)


@fuzz(1500)
@given(profile_dicts())
def test_profile_of_any_toml_document(tmp_path, d):
    path = tmp_path / "fuzz.toml"
    path.write_text(toml_document(d), encoding="utf-8")
    loaded = load_or_refuse_profile(load_profile, path)
    direct = load_or_refuse_profile(validate, d, str(path))
    assert loaded == direct


@fuzz(1000)
@given(st.dictionaries(st.sampled_from(list(KEYS)) | text, toml_values | json_values,
                       max_size=9)
       | st.builds(lambda d, extra: dict(d, **extra), profile_dicts(),
                   st.dictionaries(st.sampled_from(list(KEYS)),
                                   st.sampled_from([10 ** 5000, -10 ** 5000, 2 ** 63, 0]),
                                   max_size=3)))
def test_validate_any_dict(d):
    load_or_refuse_profile(validate, d)


@fuzz(1000)
@given(st.sampled_from(["", ".", "..", "/", "x" * 5000, "a\x00.toml", "a\x00", "pi4-2gb",
                        "pi4-2gb.toml", "profiles", "nonexistent/x", "pi-zero-2w", "../x.toml",
                        "profiles/pi4-4gb.toml"])
       | st.text(string.ascii_letters + string.digits + "-_.\x00", max_size=300))
def test_profile_of_any_name(name):
    load_or_refuse_profile(load_profile, name)

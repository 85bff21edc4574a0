"""HTTP/2 framing (serving.transport.h2wire): what the gRPC server and the generator's
client read and write, checked against hpack's own codec where HPACK is involved."""

from __future__ import annotations

import hpack
import pytest

from serving.transport import h2wire as w


def test_frames_split_anywhere_come_out_whole_and_in_order() -> None:
    wire = (
        w.settings({w.INITIAL_WINDOW_SIZE: 1 << 20, w.MAX_FRAME_SIZE: 32_768})
        + w.frame(w.DATA, w.END_STREAM, 3, b"x" * 300)
        + w.window_update(0, 12_345)
        + w.frame(w.PING, 0, 0, b"12345678")
    )
    for cut in (1, 9, 10, 200, len(wire) - 1):
        reader = w.FrameReader()
        got = reader.feed(wire[:cut]) + reader.feed(wire[cut:])
        assert [(k, f, s) for k, f, s, _ in got] == [
            (w.SETTINGS, 0, 0),
            (w.DATA, w.END_STREAM, 3),
            (w.WINDOW_UPDATE, 0, 0),
            (w.PING, 0, 0),
        ]
        assert w.settings_values(got[0][3]) == [(w.INITIAL_WINDOW_SIZE, 1 << 20), (5, 32_768)]
        assert got[1][3] == b"x" * 300 and w.u32(got[2][3]) == 12_345


def test_a_header_block_over_continuation_frames_is_one_headers_frame() -> None:
    fields = [(b"x-long", b"v" * 300), (b"grpc-status", b"0")]
    block = b"".join(w.literal(k, v) for k, v in fields)
    wire = w.header_frames(5, block, True, max_frame=100)
    assert wire.count(bytes((w.CONTINUATION,))) >= 3  # split as the peer's frame size asks
    ((kind, flags, sid, got),) = w.FrameReader().feed(wire)
    assert (kind, sid, flags & w.END_STREAM, flags & w.END_HEADERS) == (
        w.HEADERS,
        5,
        w.END_STREAM,
        w.END_HEADERS,
    )
    assert hpack.Decoder().decode(got, raw=True) == fields


def test_padding_and_priority_are_stripped() -> None:
    padded = w.frame(w.DATA, w.PADDED, 1, bytes((3,)) + b"abc" + b"\0\0\0")
    block = w.literal(b"a", b"b")
    prioritized = w.frame(
        w.HEADERS, w.END_HEADERS | w.PRIORITY_FLAG | w.PADDED, 1, b"\x02" + b"p" * 5 + block + b"zz"
    )
    got = w.FrameReader().feed(padded + prioritized)
    assert got[0][3] == b"abc" and got[1][3] == block


def test_our_header_fields_decode_in_any_table_state() -> None:
    decoder = hpack.Decoder()
    decoder.decode(hpack.Encoder().encode([(b"x-indexed", b"1")]), raw=True)  # a used table
    block = w.indexed(8) + w.literal(b"content-type", b"application/grpc")
    block += w.literal(b"x-big", b"q" * 20_000)  # a length past one integer byte
    assert decoder.decode(block, raw=True) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"x-big", b"q" * 20_000),
    ]
    assert decoder.decode(block, raw=True)[0] == (b":status", b"200")  # table unchanged


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (w.frame(w.DATA, 0, 1, b"x" * (w.DEFAULT_MAX_FRAME + 1)), w.FRAME_SIZE_ERROR),
        (w.frame(w.HEADERS, 0, 1, b"") + w.frame(w.DATA, 0, 1, b""), w.PROTOCOL_ERROR),
        (w.frame(w.CONTINUATION, w.END_HEADERS, 1, b""), w.PROTOCOL_ERROR),
        (w.frame(w.DATA, w.PADDED, 1, b"\x05ab"), w.PROTOCOL_ERROR),
        (w.frame(w.PING, 0, 0, b"short"), w.FRAME_SIZE_ERROR),
        (w.frame(w.WINDOW_UPDATE, 0, 0, b"\0"), w.FRAME_SIZE_ERROR),
        (w.frame(w.SETTINGS, 0, 0, b"\0" * 5), w.FRAME_SIZE_ERROR),
    ],
)
def test_broken_frames_are_protocol_errors_with_their_code(wire: bytes, code: int) -> None:
    with pytest.raises(w.ProtocolError) as err:
        w.FrameReader().feed(wire)
    assert err.value.code == code


def test_a_broken_header_block_is_a_compression_error() -> None:
    with pytest.raises(w.ProtocolError) as err:
        w.HeaderDecoder().decode(b"\xff\xff\xff\xff")  # an index far past any table
    assert err.value.code == w.COMPRESSION_ERROR


def _frames(out: list[bytes]) -> list[tuple[int, int, int, bytes]]:
    got = w.FrameReader(w.MAX_WINDOW).feed(b"".join(out))
    out.clear()
    return got


def test_data_waits_for_window_and_the_trailers_for_the_data() -> None:
    done: list[int] = []
    flow = w.Flow(1 << 20, on_done=done.append)
    flow.open(1)
    flow.control(w.SETTINGS, 0, 0, w.settings({w.MAX_FRAME_SIZE: 40_000})[9:])
    assert _frames(flow.out) == [(w.SETTINGS, w.ACK, 0, b"")]
    flow.send(1, b"a" * 100_000)  # past the default 65,535 of the connection and stream
    sent = _frames(flow.out)
    assert [len(p) for _, _, _, p in sent] == [40_000, 25_535]  # the peer's frame size
    assert flow.waiting(1)
    flow.then(1, b"TRAILERS")
    flow.control(w.WINDOW_UPDATE, 0, 0, w.window_update(0, 50_000)[9:])
    assert _frames(flow.out) == []  # the stream's own window is still spent
    flow.control(w.WINDOW_UPDATE, 0, 1, w.window_update(1, 50_000)[9:])
    assert b"".join(flow.out).endswith(b"TRAILERS") and done == [1]
    assert not flow.waiting(1)


def test_a_smaller_initial_window_applies_to_open_streams_and_end_stream_goes_last() -> None:
    flow = w.Flow(1 << 20)
    flow.open(3)
    flow.control(w.SETTINGS, 0, 0, w.settings({w.INITIAL_WINDOW_SIZE: 10})[9:])
    flow.out.clear()
    flow.send(3, b"b" * 25, end_stream=True)
    assert [(f, len(p)) for _, f, _, p in _frames(flow.out)] == [(0, 10)]
    flow.control(w.WINDOW_UPDATE, 0, 3, w.window_update(3, 100)[9:])
    assert [(f, len(p)) for _, f, _, p in _frames(flow.out)] == [(w.END_STREAM, 15)]


def test_what_we_read_tops_our_windows_up_at_half() -> None:
    flow = w.Flow(1000)
    flow.open(1)
    flow.received(1, 400)
    assert flow.out == []
    flow.received(1, 200)
    flow.received(7, 600)  # a stream already ended counts for the connection only
    got = [(s, w.u32(p)) for _, _, s, p in _frames(flow.out)]
    assert got == [(0, 600), (1, 600), (0, 600)]
    assert flow.control(w.PING, 0, 0, b"12345678") and _frames(flow.out) == [
        (w.PING, w.ACK, 0, b"12345678")
    ]
    assert not flow.control(w.GOAWAY, 0, 0, w.goaway(1)[9:])

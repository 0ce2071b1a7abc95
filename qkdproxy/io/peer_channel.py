"""The ``qkdproxy/1`` channel between two qkdproxy peers over an established TLS stream.

Application bytes travel in DATA frames; FIN ends one direction; KEY_IDS and KSIDS
announcements are consumed here and handed to the endpoint's slave and stream key sources,
so they never reach the application. Right after the handshake each side announces the
keys and streams it will use next.
"""

from __future__ import annotations

from qkdproxy.core.peer.frames import (
    ALPN_PROTOCOL,
    FrameDecoder,
    FrameError,
    FrameType,
    decode_verdict,
    encode,
    encode_key_ids,
    encode_verdict,
)
from qkdproxy.io.tls_stream import TlsStream, TlsStreamError
from qkdproxy.keys.announce import is_announcement_sink, is_announcer
from qkdproxy.keys.sources import KeySources

ANNOUNCE_BATCH = 64


# A prober asks once per connection; answering every PROBE would let a peer make us write a
# record per 3-byte frame it sends.
MAX_PROBE_ANSWERS = 4


class PeerChannel:
    """Frames over one TLS stream; ``receive`` returns application bytes only."""

    def __init__(self, stream: TlsStream, sources: KeySources) -> None:
        self.stream = stream
        self._sources = sources
        self._decoder = FrameDecoder()
        self._pending: list[bytes | memoryview] = []
        self._peer_finished = False
        self._finished = False
        # The server's VERDICT, once one arrived (qkdproxy probe and the client tunnel).
        self.verdict: str | None = None
        # Answer a PROBE: set by the server tunnel once its backend is connected.
        self.probe_answer: str | None = None
        self._probes_answered = 0
        self._awaiting_verdict = False

    async def announce(self) -> int:
        """Tell the peer which keys (ETSI 014) and streams (ETSI 004) we use next."""
        frames, sent = self._announcements()
        if frames:
            await self.stream.write(frames)
        return sent

    def _announcements(self, *, streams: bool = True) -> tuple[bytes, int]:
        """KEY_IDS (and with ``streams`` KSIDS) frames naming what our sources hold and have
        not announced, and how many ids they name."""
        frames, sent = b"", 0
        sources: list[tuple[object, FrameType]] = [(self._sources.master, FrameType.KEY_IDS)]
        if streams:
            sources.append((self._sources.stream, FrameType.KSIDS))
        for source, frame_type in sources:
            if is_announcer(source) and (ids := source.announce(ANNOUNCE_BATCH)):
                frames += encode_key_ids(ids, frame_type)
                sent += len(ids)
        return frames, sent

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send application bytes: DATA frames, one per TLS record, framed as they are
        sealed (the same bytes as :func:`encode_data` and one record per 16 KiB)."""
        await self.stream.write(data, frame_type=FrameType.DATA, application=True)

    async def send_fin(self) -> None:
        """No more application bytes from us (the peer may still send).

        ETSI 014 keys our supply fetched since the handshake are announced in the same
        record: with short connections (many in flight) a refill that waits for the next
        handshake to be announced can be taken before the peer could fetch it. Only while the
        peer has not finished: a peer that sent FIN may stop reading. An announcement that
        is lost costs the peer one ``dec_keys`` while a handshake waits, never a key; ETSI
        004 acknowledgements are not risked here (they wait for the next connection).
        """
        await self.stream.write(self._fin())
        self._finished = True

    def _fin(self) -> bytes:
        frames = b"" if self._peer_finished else self._announcements(streams=False)[0]
        return frames + encode(FrameType.FIN)

    async def receive(self) -> bytes | memoryview:
        """The application bytes received so far (every frame of what arrived, in one
        piece: one write downstream, one copy at most); b"" once the peer sent FIN.

        A close_notify without FIN raises a truncated :class:`TlsStreamError`: the peer's
        side of the stream did not end, so our plaintext side must see a reset, not an end.
        """
        pending = await self.receive_parts()
        if len(pending) <= 1:
            return pending[0] if pending else b""
        return b"".join(pending)

    async def receive_parts(self) -> list[bytes | memoryview]:
        """Like :meth:`receive`, but the DATA payloads as they arrived, none empty and none
        copied (views into the opened records, which nothing changes afterwards); an empty
        list once the peer sent FIN. The pump writes them with one ``writelines``: a
        receiving daemon copies no byte between opening its records and the send call."""
        while not self._pending:
            if self._peer_finished:
                return []
            data = await self.stream.read()
            if not data:
                await self.stream.close()
                raise TlsStreamError("peer closed qkdproxy/1 without FIN", truncated=True)
            try:
                # DATA payloads ahead of any other frame come without a frame object each.
                payloads, frames = self._decoder.feed_data(data)
            except FrameError as exc:
                await self.stream.close()
                raise TlsStreamError(f"peer broke qkdproxy/1 framing: {exc}") from None
            self._pending += payloads  # no FIN came before them (we would not read)
            for frame in frames:
                if frame.type is FrameType.DATA and frame.payload and self._peer_finished:
                    # DATA behind FIN in the same read used to be delivered, while in a later
                    # read it never was: either way the peer broke the framing.
                    await self.stream.close()
                    raise TlsStreamError("peer broke qkdproxy/1 framing: DATA after FIN")
                if frame.type is FrameType.DATA and frame.payload:
                    self._pending.append(frame.payload)
                elif frame.type is FrameType.FIN:
                    self._peer_finished = True
                elif frame.type is FrameType.KEY_IDS:
                    self._deliver(self._sources.slave, frame.key_ids())
                elif frame.type is FrameType.KSIDS:
                    self._deliver(self._sources.stream, frame.key_ids())
                else:
                    await self._verdict_frame(frame.type, bytes(frame.payload))
            if self.verdict is not None and self._awaiting_verdict:
                return []
        pending, self._pending = self._pending, []
        return pending

    async def _verdict_frame(self, frame_type: FrameType, payload: bytes) -> None:
        if frame_type is FrameType.VERDICT:
            self.verdict = decode_verdict(payload)
        elif frame_type is FrameType.PROBE and self._probes_answered < MAX_PROBE_ANSWERS:
            # Only a server with a connected backend answers ok; one without says why
            # when it gives up (send_verdict), asked or not.
            self._probes_answered += 1
            await self.send_verdict(self.probe_answer or "not ready")

    async def send_verdict(self, text: str) -> None:
        """Tell the peer how this connection stands (``ok`` or why it ends)."""
        await self.stream.write(encode_verdict(text))

    async def probe(self) -> str | None:
        """Ask the server for its verdict; None if it closed without one."""
        self._awaiting_verdict = True
        await self.stream.write(encode(FrameType.PROBE))
        try:
            while self.verdict is None and await self.receive():
                pass
        except TlsStreamError as exc:
            if not exc.truncated:
                raise
            # Closed without FIN (an older qkdproxy, or it dropped us): no verdict.
        return self.verdict

    @staticmethod
    def _deliver(sink: object, ids: list[bytes]) -> None:
        if is_announcement_sink(sink):
            sink.announced(ids)

    async def update_keys(self) -> None:
        """Fresh traffic keys (TLS 1.3 KeyUpdate)."""
        await self.stream.update_keys()

    async def close(self) -> None:
        """End our direction with FIN (if not yet sent), then close the TLS stream.

        A deliberate close (an idle timeout that cuts no direction: the tunnel resets
        instead of closing when it would) thus reaches the peer as the end of our data; a
        close_notify alone would be a truncation.
        """
        # FIN and close_notify in one write when FIN was not sent yet.
        final = b"" if self._finished else self._fin()
        self._finished = True
        await self.stream.close(final)


async def open_peer_channel(stream: TlsStream, sources: KeySources) -> PeerChannel | None:
    """A channel if the peer speaks ``qkdproxy/1`` (announcing our next keys), else None."""
    if stream.alpn != ALPN_PROTOCOL:
        return None
    channel = PeerChannel(stream, sources)
    await channel.announce()
    return channel

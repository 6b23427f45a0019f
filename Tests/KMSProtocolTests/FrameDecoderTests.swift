import KMSProtocol
import NIOCore
import NIOEmbedded
import Testing

/// The frame decoder, byte by byte: lengths are checked before any body is buffered.
struct FrameDecoderTests {
    func channel(max: Int = 1024) throws -> EmbeddedChannel {
        let ch = EmbeddedChannel()
        try ch.pipeline.syncOperations.addHandler(ByteToMessageHandler(FrameDecoder(maxFrameBytes: max)))
        return ch
    }

    @Test func decodesAFrameDeliveredOneByteAtATime() throws {
        let ch = try channel()
        var frame = ByteBuffer()
        frame.writeFrame([1, 2, 3, 4, 5])
        frame.writeFrame([9])
        for byte in frame.readableBytesView {
            try ch.writeInbound(ByteBuffer(bytes: [byte]))
        }
        #expect(try ch.readInbound(as: ByteBuffer.self) == ByteBuffer(bytes: [1, 2, 3, 4, 5]))
        #expect(try ch.readInbound(as: ByteBuffer.self) == ByteBuffer(bytes: [9]))
        #expect(try ch.readInbound(as: ByteBuffer.self) == nil)
        _ = try ch.finish()
    }

    @Test(arguments: [UInt32.max, 1025, 0])
    func rejectsABadLengthBeforeAnyBody(_ length: UInt32) throws {
        let ch = try channel()
        var buf = ByteBuffer()
        buf.writeInteger(length, endianness: .big)
        #expect(throws: FrameLengthError(announced: length, maximum: 1024)) {
            try ch.writeInbound(buf)
        }
        #expect(try ch.readInbound(as: ByteBuffer.self) == nil)
    }

    @Test func acceptsExactlyTheMaximum() throws {
        let ch = try channel(max: 1024)
        var buf = ByteBuffer()
        buf.writeFrame([UInt8](repeating: 7, count: 1024))
        try ch.writeInbound(buf)
        #expect(try ch.readInbound(as: ByteBuffer.self)?.readableBytes == 1024)
        _ = try ch.finish()
    }

    @Test func dropsATruncatedFrameAtEOF() throws {
        let ch = try channel()
        var buf = ByteBuffer()
        buf.writeInteger(UInt32(10), endianness: .big)
        buf.writeBytes([1, 2, 3])
        try ch.writeInbound(buf)
        #expect(try ch.readInbound(as: ByteBuffer.self) == nil)
        _ = try ch.finish(acceptAlreadyClosed: true)
    }

    @Test func undecodableBodyIsAValidationError() throws {
        let body = ByteBuffer(bytes: [0xff, 0xff, 0xff, 0xff, 0xff])
        #expect(throws: KMSError(.validation, "")) { try KMSRequest(frameBody: body) }
    }

    @Test func errorCodesAreTheAWSNames() {
        #expect(KMSErrorCode.allCases.count == Set(KMSErrorCode.allCases.map(\.rawValue)).count)
        #expect(KMSErrorCode.invalidCiphertext.rawValue == "InvalidCiphertextException")
        #expect(KMSErrorCode.invalidState.rawValue == "KMSInvalidStateException")
        #expect(KMSErrorCode.allCases.allSatisfy { $0.rawValue.hasSuffix("Exception") })
    }
}

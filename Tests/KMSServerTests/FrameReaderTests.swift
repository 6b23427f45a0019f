import KMSProtocol
@testable import KMSServer
import NIOCore
import NIOEmbedded
import Testing

/// The server's framing: frames out whole, bad lengths refused before any body is kept, and
/// no received byte left behind in a buffer kmsd does not own.
struct FrameReaderTests {
    static func frame(_ body: [UInt8]) -> [UInt8] {
        let n = UInt32(body.count)
        return [UInt8(n >> 24), UInt8(n >> 16 & 0xff), UInt8(n >> 8 & 0xff), UInt8(n & 0xff)] + body
    }

    func channel(max: Int = 64) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(FrameReader(maxFrameBytes: max))
        return channel
    }

    func frames(_ channel: EmbeddedChannel) throws -> [[UInt8]] {
        var out: [[UInt8]] = []
        while let f = try channel.readInbound(as: ByteBuffer.self) { out.append(Array(f.readableBytesView)) }
        return out
    }

    @Test func framesSplitAnyWayComeOutWhole() throws {
        let stream = Self.frame([1, 2, 3]) + Self.frame([4]) + Self.frame(Array(repeating: 9, count: 40))
        for split in [1, 2, 3, 5, 7, 64] {
            let channel = try channel()
            for start in stride(from: 0, to: stream.count, by: split) {
                try channel.writeInbound(ByteBuffer(bytes: stream[start..<min(start + split, stream.count)]))
            }
            #expect(try frames(channel) == [[1, 2, 3], [4], Array(repeating: 9, count: 40)], "split \(split)")
        }
    }

    @Test(arguments: [UInt32(0), 65, 0xFFFF_FFFF])
    func aBadLengthIsRefusedBeforeAnyBody(_ length: UInt32) throws {
        let channel = try channel()
        let header = [UInt8(length >> 24), UInt8(length >> 16 & 0xff), UInt8(length >> 8 & 0xff), UInt8(length & 0xff)]
        #expect(throws: FrameLengthError.self) { try channel.writeInbound(ByteBuffer(bytes: header)) }
        // Nothing after it is read.
        try channel.writeInbound(ByteBuffer(bytes: Self.frame([1])))
        #expect(try frames(channel).isEmpty)
    }

    @Test func receivedBytesAreZeroedOnceCopiedOut() throws {
        let channel = try channel()
        let secret: [UInt8] = Array(repeating: 0xA5, count: 30)
        let stream = Self.frame(secret) + Self.frame(secret)
        // A whole frame and half of the next: both receive buffers must end up zeroed.
        let first = ByteBuffer(bytes: stream[0..<50]), second = ByteBuffer(bytes: stream[50...])
        try channel.writeInbound(first)
        try channel.writeInbound(second)
        #expect(try frames(channel) == [secret, secret])
        #expect(first.readableBytesView.allSatisfy { $0 == 0 }, "the first receive buffer still holds bytes")
        #expect(second.readableBytesView.allSatisfy { $0 == 0 }, "the second receive buffer still holds bytes")
    }
}

import Foundation
import KMSProtocol
import SwiftProtobuf
import Testing

/// Protocol/vectors/frames.json, produced by an independent Python encoder, must decode to the
/// messages it describes and re-encode to the same bytes.
struct FrameVectorTests {
    struct Vector: Decodable, CustomTestStringConvertible {
        let name: String
        let direction: String
        let frame_hex: String
        let unknown_operation: Bool?
        var testDescription: String { name }
    }

    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func load() throws -> [(Vector, String)] {
        let data = try Data(contentsOf: root.appendingPathComponent("Protocol/vectors/frames.json"))
        let vectors = try JSONDecoder().decode([String: [Vector]].self, from: data)["vectors"] ?? []
        let raw = try JSONSerialization.jsonObject(with: data) as! [String: Any]
        let jsons = (raw["vectors"] as! [[String: Any]]).map {
            String(decoding: try! JSONSerialization.data(withJSONObject: $0["json"]!), as: UTF8.self)
        }
        return Array(zip(vectors, jsons))
    }

    @Test func vectorsCoverRequestsResponsesAndUnknownOperations() throws {
        let all = try Self.load()
        #expect(all.count >= 10)
        #expect(all.contains { $0.0.direction == "request" })
        #expect(all.contains { $0.0.direction == "response" })
        #expect(all.contains { $0.0.unknown_operation == true })
    }

    @Test(arguments: try load())
    func frameMatchesMessage(_ vector: Vector, _ json: String) throws {
        let frame = try #require(Self.bytes(hex: vector.frame_hex))
        #expect(frame.count >= 4)
        let length = Int(frame[0]) << 24 | Int(frame[1]) << 16 | Int(frame[2]) << 8 | Int(frame[3])
        #expect(length == frame.count - 4, "length prefix must be big-endian body length")
        let body = Array(frame[4...])
        if vector.direction == "request" {
            let decoded = try KMSRequest(serializedBytes: body)
            let expected = try KMSRequest(jsonString: json)
            if vector.unknown_operation == true {
                #expect(decoded.operation == nil)
                #expect(decoded.id == expected.id)
            } else {
                #expect(decoded == expected)
                #expect(try expected.serializedBytes() as [UInt8] == body)
            }
        } else {
            let decoded = try KMSResponse(serializedBytes: body)
            let expected = try KMSResponse(jsonString: json)
            #expect(decoded == expected)
            #expect(try expected.serializedBytes() as [UInt8] == body)
        }
    }

    static func bytes(hex: String) -> [UInt8]? {
        var out: [UInt8] = []
        var it = hex.makeIterator()
        while let a = it.next() {
            guard let b = it.next(), let v = UInt8(String([a, b]), radix: 16) else { return nil }
            out.append(v)
        }
        return out
    }
}

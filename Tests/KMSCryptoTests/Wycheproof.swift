import Foundation

/// The one loader for Wycheproof vectors in ../shared/testdata/wycheproof (never copied here).
enum Wycheproof {
    static let directory = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("shared/testdata/wycheproof")

    struct File<Group: Decodable>: Decodable {
        let algorithm: String
        let numberOfTests: Int
        let testGroups: [Group]
    }

    static func load<Group: Decodable>(_ name: String, as: Group.Type) throws -> File<Group> {
        try JSONDecoder().decode(File<Group>.self, from: Data(contentsOf: directory.appendingPathComponent(name)))
    }
}

extension String {
    var hexBytes: [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(count / 2)
        var it = makeIterator()
        while let a = it.next(), let b = it.next() { out.append(UInt8(String([a, b]), radix: 16)!) }
        return out
    }
}

import CTalkMesh
import TalkMeshLibAV

/// A picture at half the width and height of another in the same pixel format: each sample is
/// the rounded mean of a 2×2 block (an odd last row or column averages with itself). Only for
/// formats whose samples are whole bytes (8-bit, no palette, no bit packing); `nil` otherwise.
/// Its planes are a refcounted `AVFrame`'s, freed with it.
final class HalvedPicture {
    let frame: Frame
    var width: Int { Int(frame.pointer!.pointee.width) }
    var height: Int { Int(frame.pointer!.pointee.height) }
    var planes: [UnsafePointer<UInt8>?] { frame.pointer!.planes.data.map { UnsafePointer($0) } }
    var strides: [Int32] { frame.pointer!.planes.strides }

    init?(_ sourcePlanes: [UnsafePointer<UInt8>?], _ sourceStrides: [Int32], width: Int, height: Int, format: AVPixelFormat) {
        guard width >= 2, height >= 2, let descriptor = av_pix_fmt_desc_get(format)?.pointee else { return nil }
        let excluded = UInt64(AV_PIX_FMT_FLAG_PAL | AV_PIX_FMT_FLAG_BITSTREAM | AV_PIX_FMT_FLAG_HWACCEL | AV_PIX_FMT_FLAG_BAYER | AV_PIX_FMT_FLAG_FLOAT)
        guard descriptor.flags & excluded == 0, descriptor.nb_components > 0 else { return nil }
        // Bytes per pixel of each plane; every component must be one whole byte at the same step.
        var steps = [Int](repeating: 0, count: 4)
        let components = withUnsafeBytes(of: descriptor.comp) { Array($0.bindMemory(to: AVComponentDescriptor.self)) }
        for component in components.prefix(Int(descriptor.nb_components)) {
            let plane = Int(component.plane)
            guard component.depth == 8, component.shift == 0, plane < 4, component.step > 0,
                  steps[plane] == 0 || steps[plane] == Int(component.step) else { return nil }
            steps[plane] = Int(component.step)
        }
        let halfWidth = width / 2
        let halfHeight = height / 2
        guard let frame = try? makeVideoFrame(width: Int32(halfWidth), height: Int32(halfHeight), format: format) else { return nil }
        let targets = frame.pointer!.planes
        for plane in 0..<4 where steps[plane] > 0 {
            guard plane < sourcePlanes.count, let source = sourcePlanes[plane] else { return nil }
            // Planes 1 and 2 carry chroma at the format's subsampling, as libav lays them out.
            let chroma = plane == 1 || plane == 2
            let shiftX = chroma ? Int(descriptor.log2_chroma_w) : 0
            let shiftY = chroma ? Int(descriptor.log2_chroma_h) : 0
            let sourceSize = (width: Self.ceilShift(width, shiftX), height: Self.ceilShift(height, shiftY))
            let size = (width: Self.ceilShift(halfWidth, shiftX), height: Self.ceilShift(halfHeight, shiftY))
            guard let target = targets.data[plane] else { return nil }
            let stride = Int(targets.strides[plane])
            for y in 0..<size.height {
                let row0 = source + 2 * y * Int(sourceStrides[plane])
                let row1 = source + min(2 * y + 1, sourceSize.height - 1) * Int(sourceStrides[plane])
                Self.halveRow(row0, row1, into: target + y * stride, width: size.width, sourceWidth: sourceSize.width, step: steps[plane])
            }
        }
        self.frame = frame
    }

    private static func ceilShift(_ value: Int, _ shift: Int) -> Int { (value + (1 << shift) - 1) >> shift }

    /// One output row; the step is made a constant for the common layouts so the loop unrolls.
    private static func halveRow(_ row0: UnsafePointer<UInt8>, _ row1: UnsafePointer<UInt8>, into output: UnsafeMutablePointer<UInt8>,
                                 width: Int, sourceWidth: Int, step: Int) {
        switch step {
        case 1: halveRow(row0, row1, output, width, sourceWidth, 1)
        case 2: halveRow(row0, row1, output, width, sourceWidth, 2)
        case 3: halveRow(row0, row1, output, width, sourceWidth, 3)
        case 4: halveRow(row0, row1, output, width, sourceWidth, 4)
        default: halveRow(row0, row1, output, width, sourceWidth, step)
        }
    }

    @inline(__always)
    private static func halveRow(_ row0: UnsafePointer<UInt8>, _ row1: UnsafePointer<UInt8>, _ output: UnsafeMutablePointer<UInt8>,
                                 _ width: Int, _ sourceWidth: Int, _ step: Int) {
        // Pixels whose right neighbour exists, then at most one at an odd edge.
        let paired = min(width, sourceWidth / 2)
        for x in 0..<paired {
            let left = 2 * x * step
            for byte in 0..<step {
                let sum = UInt16(row0[left + byte]) &+ UInt16(row0[left + step + byte]) &+ UInt16(row1[left + byte]) &+ UInt16(row1[left + step + byte])
                output[x * step + byte] = UInt8(truncatingIfNeeded: (sum &+ 2) >> 2)
            }
        }
        for x in paired..<width {
            let left = min(2 * x, sourceWidth - 1) * step
            for byte in 0..<step {
                let sum = UInt16(row0[left + byte]) &+ UInt16(row1[left + byte])
                output[x * step + byte] = UInt8(truncatingIfNeeded: (sum &+ 1) >> 1)
            }
        }
    }
}

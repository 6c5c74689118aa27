import CTalkMesh
import Glibc
import Testing
import TalkMeshLibAV
@testable import TalkMeshAudioService

@Suite("Parallel resampler")
struct ParallelResamplerTests {
    /// Speech-like test audio: tones that come and go, with noise, interleaved.
    func signal(rate: Int, channels: Int, seconds: Double) -> [Int16] {
        var noise: UInt64 = 7  // a linear congruential generator: the same signal every run
        let frames = Int(Double(rate) * seconds)
        var samples = [Int16](repeating: 0, count: frames * channels)
        for frame in 0..<frames {
            let t = Double(frame) / Double(rate)
            let envelope = 0.5 + 0.5 * sin(2 * .pi * 0.7 * t)
            for channel in 0..<channels {
                noise = noise &* 6_364_136_223_846_793_005 &+ 1_442_695_040_888_963_407
                let tone = 9000 * envelope * sin(2 * .pi * (180 + 40 * Double(channel)) * t) + 3000 * sin(2 * .pi * 3100 * t)
                samples[frame * channels + channel] = Int16(tone + Double((noise >> 33) % 400) - 200)
            }
        }
        return samples
    }

    /// Feeds `samples` in frames of `frameSize` through the parallel resampler.
    func parallel(_ samples: [Int16], rate: Int, channels: Int, outputRate: Int, outputChannels: Int, frameSize: Int) throws -> [Int16] {
        var layout = AVChannelLayout()
        av_channel_layout_default(&layout, Int32(channels))
        let resampler = try ParallelResampler(inputLayout: layout, inputFormat: AV_SAMPLE_FMT_S16, inputRate: rate, outputRate: outputRate,
                                              outputChannels: outputChannels, reserve: 0, blockSeconds: 0.2)
        defer { resampler.abandon() }
        let frame = Frame()
        var offset = 0
        while offset < samples.count {
            let count = min(frameSize * channels, samples.count - offset)
            let pointer = frame.pointer!
            pointer.pointee.nb_samples = Int32(count / channels)
            pointer.pointee.format = AV_SAMPLE_FMT_S16.rawValue
            pointer.pointee.sample_rate = Int32(rate)
            av_channel_layout_copy(&pointer.pointee.ch_layout, &layout)
            #expect(av_frame_get_buffer(pointer, 0) >= 0)
            samples.withUnsafeBytes { bytes in
                pointer.pointee.data.0!.update(from: bytes.baseAddress!.assumingMemoryBound(to: UInt8.self) + offset * 2, count: count * 2)
            }
            resampler.push(pointer)
            av_frame_unref(pointer)
            offset += count
        }
        return resampler.finish()
    }

    /// One resampler over the whole input in one pass; `mixedFirst` mixes the channels down in a
    /// pass of its own first, as the parallel resampler does.
    func single(_ samples: [Int16], rate: Int, channels: Int, outputRate: Int, outputChannels: Int, mixedFirst: Bool = true) throws -> [Int16] {
        var layout = AVChannelLayout()
        av_channel_layout_default(&layout, Int32(channels))
        var input = samples
        var inputChannels = channels
        if mixedFirst {
            let mixer = try Resampler(inputLayout: layout, inputFormat: AV_SAMPLE_FMT_S16, inputRate: Int32(rate), outputRate: Int32(rate),
                                      outputChannels: Int32(outputChannels))
            input = []
            mixer.convert(samples, into: &input, inputChannels: channels)
            mixer.convert(nil, into: &input)
            inputChannels = outputChannels
            av_channel_layout_uninit(&layout)
            av_channel_layout_default(&layout, Int32(outputChannels))
        }
        let resampler = try Resampler(inputLayout: layout, inputFormat: AV_SAMPLE_FMT_S16, inputRate: Int32(rate), outputRate: Int32(outputRate),
                                      outputChannels: Int32(outputChannels))
        var output: [Int16] = []
        resampler.convert(input, into: &output, inputChannels: inputChannels)
        resampler.convert(nil, into: &output)
        return output
    }

    @Test("Blocks converted on worker threads equal one pass sample for sample, and mixing down first moves no sample by more than 1",
          arguments: [(44100, 2, 16000, 1), (48000, 2, 16000, 1), (22050, 1, 16000, 1), (8000, 1, 16000, 1), (44100, 1, 16000, 2), (32000, 2, 24000, 2)])
    func equalsOnePass(rate: Int, channels: Int, outputRate: Int, outputChannels: Int) throws {
        let samples = signal(rate: rate, channels: channels, seconds: 2.3)
        let expected = try single(samples, rate: rate, channels: channels, outputRate: outputRate, outputChannels: outputChannels)
        for frameSize in [1024, 4097] {
            let actual = try parallel(samples, rate: rate, channels: channels, outputRate: outputRate, outputChannels: outputChannels, frameSize: frameSize)
            let combined = try single(samples, rate: rate, channels: channels, outputRate: outputRate, outputChannels: outputChannels, mixedFirst: false)
            #expect(combined.count == actual.count && zip(combined, actual).allSatisfy { abs(Int($0) - Int($1)) <= 1 })
            let firstDifference = zip(actual, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            #expect(actual.count == expected.count && firstDifference == nil,
                    "\(rate) Hz × \(channels) → \(outputRate) Hz × \(outputChannels), frames of \(frameSize): \(actual.count) samples, expected \(expected.count), first difference at \(firstDifference.map(String.init) ?? "none")")
        }
    }

    @Test("Audio shorter than one block, and no audio at all")
    func shortInputs() throws {
        let samples = signal(rate: 44100, channels: 2, seconds: 0.4)
        #expect(try parallel(samples, rate: 44100, channels: 2, outputRate: 16000, outputChannels: 1, frameSize: 512)
            == single(samples, rate: 44100, channels: 2, outputRate: 16000, outputChannels: 1))
        #expect(try parallel([], rate: 44100, channels: 2, outputRate: 16000, outputChannels: 1, frameSize: 512).isEmpty)
    }

    @Test("Abandoning mid-stream stops the workers and returns")
    func abandon() throws {
        var layout = AVChannelLayout()
        av_channel_layout_default(&layout, 1)
        let resampler = try ParallelResampler(inputLayout: layout, inputFormat: AV_SAMPLE_FMT_S16, inputRate: 44100, outputRate: 16000,
                                              outputChannels: 1, reserve: 0, capacity: 1)
        let frame = Frame()
        let pointer = frame.pointer!
        pointer.pointee.nb_samples = 44100
        pointer.pointee.format = AV_SAMPLE_FMT_S16.rawValue
        pointer.pointee.sample_rate = 44100
        av_channel_layout_copy(&pointer.pointee.ch_layout, &layout)
        #expect(av_frame_get_buffer(pointer, 0) >= 0)
        for _ in 0..<12 { resampler.push(pointer) }
        resampler.abandon()
        resampler.abandon()  // twice is harmless
    }
}

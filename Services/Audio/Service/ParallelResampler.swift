import CTalkMesh
import Glibc
import TalkMeshLibAV

/// Converts decoded audio to the chunks' rate and channels with the rate conversion (most of a
/// split's CPU) spread over worker threads, overlapping decoding too.
///
/// The caller's thread only converts format and channels (`swr` at the input rate, cheap) into a
/// window; the window is cut into blocks of whole resampling periods (a period is
/// `inputRate/gcd` input frames, which give exactly `outputRate/gcd` output frames), each block
/// carrying `overlap` frames of the audio before and after it. A worker resets its resampler,
/// converts the block with its margins and keeps only the output that belongs to the block: the
/// margins give the filter its real history and future, so the blocks laid end to end are the
/// audio resampled in one pass, up to rounding at the seams. At most `capacity` blocks wait, so
/// memory does not grow with the input; results are appended in order.
final class ParallelResampler: @unchecked Sendable {
    struct Block {
        var index: Int
        var samples: [Int16]
        /// Frames of margin before the block (none for the first).
        var leading: Int
        /// The last block: flush the resampler and keep everything.
        var last: Bool
    }

    private let channels: Int
    private let inputRate: Int
    private let outputRate: Int
    private let period: (input: Int, output: Int)
    private let blockFrames: Int
    private let overlap: Int
    private let mixer: Resampler
    private var window: [Int16] = []
    /// Frames of `window` before the current block's first frame (0 or `overlap`).
    private var windowLeading = 0
    private var nextBlock = 0

    // Guarded by `mutex`.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let changed = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var queue: [Block] = []
    private var finished: [Int: [Int16]] = [:]
    private var output: [Int16] = []
    private var appended = 0
    private var closing = false
    private var abandoned = false
    private let capacity: Int
    private var threads: [pthread_t] = []

    /// `workers` resampling threads; the conversion is exact when the output rate equals the
    /// input rate (no workers are started then).
    init(inputLayout: AVChannelLayout, inputFormat: AVSampleFormat, inputRate: Int, outputRate: Int, outputChannels: Int,
         reserve: Int, workers: Int = 2, capacity: Int = 4, blockSeconds: Double = 2) throws {
        channels = outputChannels
        self.inputRate = inputRate
        self.outputRate = outputRate
        self.capacity = capacity
        mixer = try Resampler(inputLayout: inputLayout, inputFormat: inputFormat, inputRate: Int32(inputRate),
                              outputRate: Int32(inputRate), outputChannels: Int32(outputChannels))
        let divisor = Self.gcd(inputRate, outputRate)
        period = (inputRate / divisor, outputRate / divisor)
        // Margins longer than the resampler's filter reaches (32 taps, stretched by the ratio
        // when downsampling), in whole periods so every block starts on the same phase.
        let reach = 64 * max(1, (inputRate + outputRate - 1) / outputRate)
        overlap = period.input * max(1, (reach + period.input - 1) / period.input)
        let block = Int(blockSeconds * Double(inputRate))
        blockFrames = period.input * max(1, (block + period.input - 1) / period.input)
        output.reserveCapacity(reserve)
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(changed, nil)
        guard inputRate != outputRate else { return }
        var layout = AVChannelLayout()
        av_channel_layout_default(&layout, Int32(outputChannels))
        // Every resampler first: a throw after a thread started would leave it waiting forever.
        let resamplers = try (0..<workers).map { _ in
            try Resampler(inputLayout: layout, inputFormat: AV_SAMPLE_FMT_S16, inputRate: Int32(inputRate),
                          outputRate: Int32(outputRate), outputChannels: Int32(outputChannels))
        }
        for resampler in resamplers {
            let context = Unmanaged.passRetained(Worker(owner: self, resampler: resampler)).toOpaque()
            var thread = pthread_t()
            if pthread_create(&thread, nil, { context in
                let worker = Unmanaged<Worker>.fromOpaque(context!).takeRetainedValue()
                worker.owner.work(worker.resampler)
                return nil
            }, context) == 0 {
                threads.append(thread)
            } else {
                Unmanaged<Worker>.fromOpaque(context).release()
            }
        }
    }

    deinit {
        abandon()
        pthread_cond_destroy(changed)
        pthread_mutex_destroy(mutex)
        changed.deallocate()
        mutex.deallocate()
    }

    private final class Worker {
        let owner: ParallelResampler
        let resampler: Resampler
        init(owner: ParallelResampler, resampler: Resampler) {
            self.owner = owner
            self.resampler = resampler
        }
    }

    /// Adds a decoded frame (the caller keeps its frame).
    func push(_ frame: UnsafeMutablePointer<AVFrame>) {
        mixer.convert(frame, into: &window)
        cutBlocks(final: false)
    }

    /// Converts what is left, waits for the workers and returns every converted sample.
    func finish() -> [Int16] {
        mixer.convert(nil, into: &window)
        if inputRate == outputRate || threads.isEmpty {
            if threads.isEmpty && inputRate != outputRate { return convertInline() }
            return window
        }
        cutBlocks(final: true)
        pthread_mutex_lock(mutex)
        closing = true
        pthread_cond_broadcast(changed)
        pthread_mutex_unlock(mutex)
        join()
        return output
    }

    /// Stops the workers without converting what is queued (an error or a cancellation).
    func abandon() {
        pthread_mutex_lock(mutex)
        abandoned = true
        pthread_cond_broadcast(changed)
        pthread_mutex_unlock(mutex)
        join()
    }

    private func join() {
        for thread in threads { pthread_join(thread, nil) }
        threads = []
    }

    /// No worker could be started: one resampler, one pass.
    private func convertInline() -> [Int16] {
        var layout = AVChannelLayout()
        av_channel_layout_default(&layout, Int32(channels))
        guard let resampler = try? Resampler(inputLayout: layout, inputFormat: AV_SAMPLE_FMT_S16, inputRate: Int32(inputRate),
                                             outputRate: Int32(outputRate), outputChannels: Int32(channels)) else { return [] }
        var result: [Int16] = []
        resampler.convert(window, into: &result, inputChannels: channels)
        resampler.convert(nil, into: &result)
        return result
    }

    /// Hands every complete block of the window (with its margins) to the workers; `final`
    /// sends the rest as the last block.
    private func cutBlocks(final: Bool) {
        guard inputRate != outputRate, !threads.isEmpty else { return }
        while true {
            let available = window.count / channels - windowLeading
            if available >= blockFrames + overlap {
                let end = windowLeading + blockFrames + overlap
                enqueue(Block(index: nextBlock, samples: Array(window[0..<(end * channels)]), leading: windowLeading, last: false))
                nextBlock += 1
                // The next block's leading margin is this block's last `overlap` frames.
                window.removeFirst((windowLeading + blockFrames - overlap) * channels)
                windowLeading = overlap
            } else if final {
                enqueue(Block(index: nextBlock, samples: window, leading: windowLeading, last: true))
                nextBlock += 1
                window = []
                return
            } else {
                return
            }
        }
    }

    private func enqueue(_ block: Block) {
        pthread_mutex_lock(mutex)
        while queue.count >= capacity && !abandoned { pthread_cond_wait(changed, mutex) }
        queue.append(block)
        pthread_cond_broadcast(changed)
        pthread_mutex_unlock(mutex)
    }

    private func work(_ resampler: Resampler) {
        while true {
            pthread_mutex_lock(mutex)
            while queue.isEmpty && !closing && !abandoned { pthread_cond_wait(changed, mutex) }
            if abandoned || queue.isEmpty {
                pthread_mutex_unlock(mutex)
                return
            }
            let block = queue.removeFirst()
            pthread_cond_broadcast(changed)
            pthread_mutex_unlock(mutex)

            resampler.reset()
            var converted: [Int16] = []
            converted.reserveCapacity((block.samples.count / period.input + 2) * period.output + 64)
            resampler.convert(block.samples, into: &converted, inputChannels: channels)
            if block.last { resampler.convert(nil, into: &converted) }
            let skip = min(converted.count, block.leading / period.input * period.output * channels)
            let keep = block.last ? converted.count - skip : min(converted.count - skip, blockFrames / period.input * period.output * channels)
            let kept = Array(converted[skip..<(skip + keep)])

            pthread_mutex_lock(mutex)
            finished[block.index] = kept
            while let next = finished.removeValue(forKey: appended) {
                output.append(contentsOf: next)
                appended += 1
            }
            pthread_mutex_unlock(mutex)
        }
    }

    private static func gcd(_ a: Int, _ b: Int) -> Int { b == 0 ? a : gcd(b, a % b) }
}

import TalkMeshMessages
@testable import TalkMeshDispatcherService

/// A new job record as the stores' tests create it.
func newJobRecord(owner: String = "o", key: String = "", created: Int64 = 1) -> JobRecord {
    var job = Job()
    job.id = JobID.make()
    job.owner = owner
    job.idempotencyKey = key
    job.createdAtUnixMs = created
    return JobRecord(new: job)
}

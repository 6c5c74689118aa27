/// `GET /openapi.json`: the API as OpenAPI 3.1 (tests validate it and run schemathesis on it).
enum OpenAPIDocument {
    static let json = #"""
{
  "openapi": "3.1.0",
  "info": {"title": "TalkMesh API", "version": "1.0.0",
           "description": "Turn a portrait image and a speech recording into one lip-synced talking-avatar video."},
  "servers": [{"url": "/"}],
  "security": [{"bearer": []}, {"apiKey": []}],
  "tags": [{"name": "jobs"}, {"name": "health"}, {"name": "runpod", "description": "Called by RunPod, not by clients"},
           {"name": "infinitetalk-api", "description": "The Infinitetalk API's routes, so its clients switch by changing the base URL and adding a key. Errors are {\"error\": message, \"code\": CODE}."},
           {"name": "avatar-api", "description": "avatar-api's routes, answering in a {\"data\": ...} envelope."}],
  "paths": {
    "/v1/runpod-webhook/{job}/{chunk}/{secret}": {
      "post": {
        "tags": ["runpod"], "operationId": "runpodWebhook", "security": [],
        "summary": "RunPod's completion webhook for one chunk (RUNPOD_WEBHOOK_BASE_URL); the job's secret in the path authenticates it, the body is not read",
        "parameters": [{"name": "job", "in": "path", "required": true, "schema": {"type": "string"}},
                       {"name": "chunk", "in": "path", "required": true, "schema": {"type": "string"}},
                       {"name": "secret", "in": "path", "required": true, "schema": {"type": "string"}}],
        "requestBody": {"required": false, "content": {"application/json": {"schema": {"type": "object"}}}},
        "responses": {
          "200": {"description": "The chunk's driver was woken (accepted), or another replica's poll will see it",
                  "content": {"application/json": {"schema": {"type": "object", "required": ["accepted"], "properties": {"accepted": {"type": "boolean"}}}}}},
          "404": {"$ref": "#/components/responses/Error"}, "413": {"$ref": "#/components/responses/Error"},
          "500": {"$ref": "#/components/responses/Error"}, "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/v1/jobs": {
      "post": {
        "tags": ["jobs"], "operationId": "createJob", "summary": "Create a job from an image and an audio file",
        "parameters": [{"$ref": "#/components/parameters/IdempotencyKey"}, {"$ref": "#/components/parameters/RequestId"}],
        "requestBody": {"required": true, "content": {
          "application/json": {"schema": {"$ref": "#/components/schemas/CreateJobJSON"}},
          "multipart/form-data": {"schema": {"$ref": "#/components/schemas/CreateJobMultipart"}}}},
        "responses": {
          "202": {"description": "The job was accepted", "headers": {"Location": {"schema": {"type": "string"}}, "X-Request-Id": {"$ref": "#/components/headers/RequestId"}},
                  "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobCreated"}}},
                  "links": {
                    "GetJob": {"operationId": "getJob", "parameters": {"id": "$response.body#/id"}},
                    "GetVideo": {"operationId": "getVideo", "parameters": {"id": "$response.body#/id"}},
                    "CancelJob": {"operationId": "cancelJob", "parameters": {"id": "$response.body#/id"}}}},
          "400": {"$ref": "#/components/responses/Error"}, "401": {"$ref": "#/components/responses/Error"},
          "408": {"$ref": "#/components/responses/Error"}, "413": {"$ref": "#/components/responses/Error"},
          "415": {"$ref": "#/components/responses/Error"}, "429": {"$ref": "#/components/responses/RateLimited"},
          "500": {"$ref": "#/components/responses/Error"}, "503": {"$ref": "#/components/responses/Error"}}
      },
      "get": {
        "tags": ["jobs"], "operationId": "listJobs", "summary": "The caller's jobs, newest first",
        "parameters": [
          {"name": "page_size", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}},
          {"name": "page_token", "in": "query", "schema": {"type": "string"}},
          {"name": "status", "in": "query", "schema": {"$ref": "#/components/schemas/Status"}},
          {"$ref": "#/components/parameters/RequestId"}],
        "responses": {
          "200": {"description": "A page of jobs", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobList"}}}},
          "400": {"$ref": "#/components/responses/Error"}, "401": {"$ref": "#/components/responses/Error"},
          "429": {"$ref": "#/components/responses/RateLimited"}, "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/v1/jobs/{id}": {
      "parameters": [{"$ref": "#/components/parameters/JobId"}],
      "get": {
        "tags": ["jobs"], "operationId": "getJob", "summary": "A job's state and progress",
        "parameters": [{"name": "include", "in": "query", "description": "A comma list: video_base64 adds the video inline (completed jobs); chunks adds chunk_list",
                        "schema": {"type": "string", "pattern": "^(video_base64|chunks)(,(video_base64|chunks))*$"}}],
        "responses": {
          "200": {"description": "The job", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
          "401": {"$ref": "#/components/responses/Error"}, "404": {"$ref": "#/components/responses/Error"}, "410": {"$ref": "#/components/responses/Error"},
          "413": {"$ref": "#/components/responses/Error"},
          "429": {"$ref": "#/components/responses/RateLimited"}, "503": {"$ref": "#/components/responses/Error"}}
      },
      "delete": {
        "tags": ["jobs"], "operationId": "cancelJob", "summary": "Cancel a job",
        "responses": {
          "202": {"description": "Cancelled", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}}},
          "401": {"$ref": "#/components/responses/Error"}, "404": {"$ref": "#/components/responses/Error"}, "410": {"$ref": "#/components/responses/Error"},
          "409": {"$ref": "#/components/responses/Error"}, "429": {"$ref": "#/components/responses/RateLimited"},
          "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/v1/jobs/{id}/video": {
      "parameters": [{"$ref": "#/components/parameters/JobId"}],
      "get": {
        "tags": ["jobs"], "operationId": "getVideo", "summary": "The finished MP4",
        "parameters": [{"name": "Range", "in": "header", "schema": {"type": "string"}},
                       {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}],
        "responses": {
          "200": {"description": "The video", "headers": {"ETag": {"schema": {"type": "string"}}},
                  "content": {"video/mp4": {"schema": {"type": "string", "contentMediaType": "video/mp4"}}}},
          "206": {"description": "Part of the video", "headers": {"Content-Range": {"schema": {"type": "string"}}},
                  "content": {"video/mp4": {"schema": {"type": "string", "contentMediaType": "video/mp4"}}}},
          "304": {"description": "Not modified"},
          "401": {"$ref": "#/components/responses/Error"}, "404": {"$ref": "#/components/responses/Error"}, "410": {"$ref": "#/components/responses/Error"},
          "409": {"$ref": "#/components/responses/Error"}, "416": {"$ref": "#/components/responses/Error"},
          "429": {"$ref": "#/components/responses/RateLimited"}, "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/v1/jobs/{id}/timeline": {
      "parameters": [{"$ref": "#/components/parameters/JobId"}],
      "get": {
        "tags": ["jobs"], "operationId": "jobTimeline", "summary": "Every state change of the job and of each chunk attempt, with times",
        "parameters": [{"$ref": "#/components/parameters/RequestId"}],
        "responses": {
          "200": {"description": "The timeline", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Timeline"}}}},
          "401": {"$ref": "#/components/responses/Error"}, "404": {"$ref": "#/components/responses/Error"},
          "410": {"$ref": "#/components/responses/Error"}, "429": {"$ref": "#/components/responses/RateLimited"},
          "500": {"$ref": "#/components/responses/Error"}, "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/v1/jobs/{id}/events": {
      "parameters": [{"$ref": "#/components/parameters/JobId"}],
      "get": {
        "tags": ["jobs"], "operationId": "jobEvents", "summary": "Server-Sent Events: the job on every change until it is terminal",
        "parameters": [{"name": "Last-Event-ID", "in": "header", "schema": {"type": "string"}}],
        "responses": {
          "200": {"description": "event: job, data: a Job, id: its version", "content": {"text/event-stream": {"schema": {"type": "object",
            "properties": {"event": {"type": "string", "enum": ["job"]}, "id": {"type": "string"}, "retry": {"type": "integer"},
              "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": "#/components/schemas/Job"}}}}}}},
          "401": {"$ref": "#/components/responses/Error"}, "404": {"$ref": "#/components/responses/Error"}, "410": {"$ref": "#/components/responses/Error"},
          "429": {"$ref": "#/components/responses/RateLimited"}, "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/health": {"get": {"tags": ["infinitetalk-api"], "operationId": "seedHealth", "security": [], "summary": "The Infinitetalk API's health check",
      "responses": {"200": {"description": "Up", "content": {"application/json": {"schema": {"type": "object", "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["ok"]}}}}}}}}},
    "/jobs": {
      "post": {
        "tags": ["infinitetalk-api"], "operationId": "seedCreateJob", "summary": "Create a job (the Infinitetalk API's shape)",
        "requestBody": {"required": true, "content": {
          "application/json": {"schema": {"$ref": "#/components/schemas/SeedCreateJobJSON"}},
          "multipart/form-data": {"schema": {"$ref": "#/components/schemas/SeedCreateJobMultipart"}}}},
        "responses": {
          "202": {"description": "The job was accepted", "content": {"application/json": {"schema": {"type": "object", "required": ["id", "status"],
            "properties": {"id": {"type": "string"}, "status": {"type": "string", "enum": ["IN_QUEUE"]}}}}},
            "links": {"GetJob": {"operationId": "seedGetJob", "parameters": {"id": "$response.body#/id"}}}},
          "400": {"$ref": "#/components/responses/SeedError"}, "401": {"$ref": "#/components/responses/SeedError"},
          "408": {"$ref": "#/components/responses/SeedError"}, "413": {"$ref": "#/components/responses/SeedError"},
          "415": {"$ref": "#/components/responses/SeedError"}, "429": {"$ref": "#/components/responses/SeedError"},
          "500": {"$ref": "#/components/responses/SeedError"}, "503": {"$ref": "#/components/responses/SeedError"}}
      }
    },
    "/jobs/{id}": {
      "parameters": [{"$ref": "#/components/parameters/JobId"}],
      "get": {
        "tags": ["infinitetalk-api"], "operationId": "seedGetJob", "summary": "A job, with the video inline (or its URL with push_to_s3) once completed",
        "responses": {
          "200": {"description": "The job", "content": {"application/json": {"schema": {"type": "object", "required": ["id", "status", "progress"],
            "properties": {"id": {"type": "string"}, "status": {"type": "string", "enum": ["IN_QUEUE", "RUNNING", "COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"]},
              "progress": {"type": "integer", "minimum": 0, "maximum": 100}, "error": {"type": "string"},
              "video_base64": {"type": "string", "contentEncoding": "base64"}, "video_url": {"type": "string"}}}}}},
          "401": {"$ref": "#/components/responses/SeedError"}, "404": {"$ref": "#/components/responses/SeedError"}, "410": {"$ref": "#/components/responses/SeedError"},
          "413": {"$ref": "#/components/responses/SeedError"}, "429": {"$ref": "#/components/responses/SeedError"},
          "503": {"$ref": "#/components/responses/SeedError"}}
      }
    },
    "/generate": {
      "post": {
        "tags": ["avatar-api"], "operationId": "seedGenerate", "summary": "Create a job (avatar-api's shape; 384×576 unless width and height are given)",
        "requestBody": {"required": true, "content": {"multipart/form-data": {"schema": {"type": "object", "required": ["image", "audio"],
          "properties": {"image": {"type": "string", "contentMediaType": "application/octet-stream"},
            "audio": {"type": "string", "contentMediaType": "application/octet-stream"}, "prompt": {"type": "string"},
            "width": {"type": "integer", "minimum": 64, "maximum": 4096}, "height": {"type": "integer", "minimum": 64, "maximum": 4096}}}}}},
        "responses": {
          "200": {"description": "The job was accepted", "content": {"application/json": {"schema": {"type": "object", "required": ["data"],
            "properties": {"data": {"type": "object", "required": ["job_id"], "properties": {"job_id": {"type": "string"}, "status": {"$ref": "#/components/schemas/SeedStatus"}}}}}}},
            "links": {"Status": {"operationId": "seedStatus", "parameters": {"job_id": "$response.body#/data/job_id"}},
                      "Result": {"operationId": "seedResult", "parameters": {"job_id": "$response.body#/data/job_id"}}}},
          "400": {"$ref": "#/components/responses/Error"}, "401": {"$ref": "#/components/responses/Error"},
          "408": {"$ref": "#/components/responses/Error"}, "413": {"$ref": "#/components/responses/Error"},
          "415": {"$ref": "#/components/responses/Error"}, "429": {"$ref": "#/components/responses/RateLimited"},
          "500": {"$ref": "#/components/responses/Error"}, "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/status/{job_id}": {
      "parameters": [{"$ref": "#/components/parameters/SeedJobId"}],
      "get": {
        "tags": ["avatar-api"], "operationId": "seedStatus", "summary": "A job's state (avatar-api's shape)",
        "responses": {
          "200": {"description": "The job", "content": {"application/json": {"schema": {"type": "object", "required": ["data"],
            "properties": {"data": {"type": "object", "required": ["job_id", "status", "progress", "eta_seconds"],
              "properties": {"job_id": {"type": "string"}, "status": {"$ref": "#/components/schemas/SeedStatus"},
                "progress": {"type": "integer", "minimum": 0, "maximum": 100}, "eta_seconds": {"type": "integer", "minimum": 0},
                "error": {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}}}}}},
          "401": {"$ref": "#/components/responses/Error"}, "404": {"$ref": "#/components/responses/Error"}, "410": {"$ref": "#/components/responses/Error"},
          "429": {"$ref": "#/components/responses/RateLimited"}, "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/result/{job_id}": {
      "parameters": [{"$ref": "#/components/parameters/SeedJobId"}],
      "get": {
        "tags": ["avatar-api"], "operationId": "seedResult", "summary": "The finished video's URL (avatar-api's shape)",
        "responses": {
          "200": {"description": "The video's URL", "content": {"application/json": {"schema": {"type": "object", "required": ["data"],
            "properties": {"data": {"type": "object", "required": ["url"], "properties": {"job_id": {"type": "string"}, "url": {"type": "string"},
              "duration_sec": {"type": "number"}}}}}}}},
          "401": {"$ref": "#/components/responses/Error"}, "404": {"$ref": "#/components/responses/Error"}, "410": {"$ref": "#/components/responses/Error"},
          "409": {"$ref": "#/components/responses/Error"}, "429": {"$ref": "#/components/responses/RateLimited"},
          "503": {"$ref": "#/components/responses/Error"}}
      }
    },
    "/openapi.json": {"get": {"tags": ["health"], "operationId": "openapi", "security": [], "summary": "This document",
      "responses": {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
    "/healthz": {"get": {"tags": ["health"], "operationId": "healthz", "security": [], "summary": "Liveness",
      "responses": {"200": {"description": "Alive", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    "/readyz": {"get": {"tags": ["health"], "operationId": "readyz", "security": [], "summary": "Readiness: the Dispatcher is reachable",
      "responses": {"200": {"description": "Ready", "content": {"text/plain": {"schema": {"type": "string"}}}},
                    "503": {"description": "Not ready", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
    "/metrics": {"get": {"tags": ["health"], "operationId": "metrics", "security": [], "summary": "Prometheus metrics",
      "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}}
  },
  "components": {
    "securitySchemes": {
      "bearer": {"type": "http", "scheme": "bearer"},
      "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    },
    "parameters": {
      "JobId": {"name": "id", "in": "path", "required": true, "schema": {"type": "string"}},
      "SeedJobId": {"name": "job_id", "in": "path", "required": true, "schema": {"type": "string"}},
      "IdempotencyKey": {"name": "Idempotency-Key", "in": "header", "schema": {"type": "string", "maxLength": 200}},
      "RequestId": {"name": "X-Request-Id", "in": "header", "schema": {"type": "string"}}
    },
    "headers": {
      "RequestId": {"schema": {"type": "string"}}
    },
    "responses": {
      "SeedError": {"description": "An error in the Infinitetalk API's shape", "content": {"application/json": {"schema": {"type": "object",
        "required": ["error", "code"], "properties": {"error": {"type": "string"}, "code": {"type": "string"}}}}}},
      "Error": {"description": "An error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
      "RateLimited": {"description": "A rate limit or the active-jobs cap",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}, "RateLimit-Limit": {"schema": {"type": "integer"}},
                    "RateLimit-Remaining": {"schema": {"type": "integer"}}, "RateLimit-Reset": {"schema": {"type": "integer"}}},
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    },
    "schemas": {
      "SeedStatus": {"type": "string", "enum": ["pending", "processing", "completed", "failed"]},
      "Status": {"type": "string", "enum": ["in_queue", "running", "completed", "failed", "cancelled", "timed_out"]},
      "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["code", "message", "details"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "object"}}}}},
      "Links": {"type": "object", "required": ["self", "video", "events"],
        "properties": {"self": {"type": "string"}, "video": {"type": "string"}, "events": {"type": "string"}}},
      "JobCreated": {"type": "object", "required": ["id", "status", "links"],
        "properties": {"id": {"type": "string"}, "status": {"$ref": "#/components/schemas/Status"}, "links": {"$ref": "#/components/schemas/Links"}}},
      "Job": {"type": "object", "required": ["id", "status", "progress", "eta_seconds", "chunks", "created_at", "updated_at", "links"],
        "properties": {
          "id": {"type": "string"}, "status": {"$ref": "#/components/schemas/Status"},
          "progress": {"type": "number", "minimum": 0, "maximum": 100}, "eta_seconds": {"type": "number", "minimum": 0},
          "chunks": {"type": "object", "required": ["total", "completed", "running", "failed"],
            "properties": {"total": {"type": "integer"}, "completed": {"type": "integer"}, "running": {"type": "integer"}, "failed": {"type": "integer"}}},
          "error": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}},
          "created_at": {"type": "string", "format": "date-time"}, "updated_at": {"type": "string", "format": "date-time"},
          "width": {"type": "integer"}, "height": {"type": "integer"},
          "video": {"type": "object", "required": ["url", "duration_sec", "width", "height"],
            "properties": {"url": {"type": "string", "description": "A presigned S3 URL (valid for VIDEO_URL_TTL) when blobs are in S3, else this Gateway's /v1/jobs/{id}/video"},
              "url_expires_at": {"type": "string", "format": "date-time", "description": "When a presigned url stops working"},
              "duration_sec": {"type": "number"}, "width": {"type": "integer"}, "height": {"type": "integer"}}},
          "video_base64": {"type": "string", "contentEncoding": "base64"},
          "completed_at": {"type": "string", "format": "date-time"},
          "video_expired_at": {"type": "string", "format": "date-time", "description": "When retention (VIDEO_RETENTION after the job ended) deleted the video and uploads: video routes answer 410 EXPIRED"},
          "chunk_list": {"type": "array", "items": {"$ref": "#/components/schemas/Chunk"}},
          "webhook": {"$ref": "#/components/schemas/Webhook"},
          "links": {"$ref": "#/components/schemas/Links"}}},
      "Webhook": {"type": "object", "required": ["url", "progress", "deliveries"], "description": "The job's webhook and its delivery log (the last 20 attempts)",
        "properties": {
          "url": {"type": "string"}, "progress": {"type": "boolean"},
          "pending": {"type": "object", "required": ["event", "next_attempt_at", "attempts"],
            "properties": {"event": {"type": "string"}, "next_attempt_at": {"type": "string", "format": "date-time"}, "attempts": {"type": "integer"}}},
          "deliveries": {"type": "array", "items": {"type": "object", "required": ["event", "attempt", "at", "delivered", "duration_ms"],
            "properties": {"event": {"type": "string", "enum": ["job.completed", "job.failed", "job.cancelled", "job.timed_out", "job.progress"]},
              "attempt": {"type": "integer"}, "at": {"type": "string", "format": "date-time"}, "delivered": {"type": "boolean"},
              "duration_ms": {"type": "integer"}, "http_status": {"type": "integer"}, "error": {"type": "string"}, "abandoned": {"type": "boolean"}}}}}},
      "Timeline": {"type": "object", "required": ["id", "status", "created_at", "events", "chunks"],
        "properties": {
          "id": {"type": "string"}, "status": {"$ref": "#/components/schemas/Status"},
          "created_at": {"type": "string", "format": "date-time"}, "completed_at": {"type": "string", "format": "date-time"},
          "events": {"type": "array", "items": {"type": "object", "required": ["at", "from", "to"],
            "properties": {"at": {"type": "string", "format": "date-time"}, "from": {"type": "string"}, "to": {"type": "string"},
              "chunk": {"type": "integer", "description": "absent for the job's own transitions"}, "attempt": {"type": "integer"},
              "runpod_job_id": {"type": "string"}, "error_code": {"type": "string", "description": "a failed attempt's error"}}}},
          "chunks": {"type": "array", "items": {"$ref": "#/components/schemas/Chunk"}}}},
      "Chunk": {"type": "object", "required": ["index", "start_sec", "duration_sec", "status", "attempts", "queue_delay_ms", "execution_ms"],
        "properties": {
          "index": {"type": "integer"}, "start_sec": {"type": "number"}, "duration_sec": {"type": "number"},
          "status": {"type": "string", "enum": ["pending", "submitted", "running", "completed", "failed", "cancelled"]},
          "attempts": {"type": "integer"}, "queue_delay_ms": {"type": "integer"}, "execution_ms": {"type": "integer"},
          "submitted_at": {"type": "string", "format": "date-time"}, "finished_at": {"type": "string", "format": "date-time"},
          "error": {"type": "object", "required": ["code", "message"], "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}},
      "JobList": {"type": "object", "required": ["jobs", "next_page_token"],
        "properties": {"jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}}, "next_page_token": {"type": ["string", "null"]}}},
      "CreateJobJSON": {"type": "object", "required": ["image_base64", "audio_base64", "width", "height"],
        "properties": {
          "image_base64": {"type": "string", "contentEncoding": "base64", "description": "PNG, JPEG or WebP, at most 10 MB"},
          "audio_base64": {"type": "string", "contentEncoding": "base64", "description": "WAV, MP3, M4A, OGG or FLAC, at most 50 MB"},
          "width": {"type": "integer", "minimum": 64, "maximum": 4096}, "height": {"type": "integer", "minimum": 64, "maximum": 4096},
          "prompt": {"type": "string", "maxLength": 4000}, "force_offload": {"type": "boolean"}, "dry_run": {"type": "boolean"},
          "webhook_url": {"type": "string", "maxLength": 2048, "description": "POSTed the job, signed (TalkMesh-Signature), when it ends; http(s) to a public address (INVALID_WEBHOOK_URL otherwise)"},
          "webhook_progress": {"type": "boolean", "description": "also POST job.progress as chunks complete"},
          "chunk_target_sec": {"type": "number"}}},
      "CreateJobMultipart": {"type": "object", "required": ["image", "audio", "width", "height"],
        "properties": {
          "image": {"type": "string", "contentMediaType": "application/octet-stream"},
          "audio": {"type": "string", "contentMediaType": "application/octet-stream"},
          "width": {"type": "integer", "minimum": 64, "maximum": 4096}, "height": {"type": "integer", "minimum": 64, "maximum": 4096},
          "prompt": {"type": "string"}, "force_offload": {"type": "boolean"}, "dry_run": {"type": "boolean"},
          "webhook_url": {"type": "string", "maxLength": 2048, "description": "POSTed the job, signed (TalkMesh-Signature), when it ends; http(s) to a public address (INVALID_WEBHOOK_URL otherwise)"},
          "webhook_progress": {"type": "boolean", "description": "also POST job.progress as chunks complete"},
          "chunk_target_sec": {"type": "number"}}},
      "SeedCreateJobJSON": {"type": "object", "required": ["image_base64", "audio_base64", "width", "height"],
        "properties": {
          "image_base64": {"type": "string", "contentEncoding": "base64"}, "audio_base64": {"type": "string", "contentEncoding": "base64"},
          "width": {"type": "integer", "minimum": 64, "maximum": 4096}, "height": {"type": "integer", "minimum": 64, "maximum": 4096},
          "push_to_s3": {"type": "boolean", "description": "answer with video_url instead of video_base64"},
          "dry_run": {"type": "boolean"}, "force_offload": {"type": "boolean"}, "prompt": {"type": "string", "maxLength": 4000}}},
      "SeedCreateJobMultipart": {"type": "object", "required": ["image", "audio", "width", "height"],
        "properties": {
          "image": {"type": "string", "contentMediaType": "application/octet-stream"},
          "audio": {"type": "string", "contentMediaType": "application/octet-stream"},
          "width": {"type": "integer", "minimum": 64, "maximum": 4096}, "height": {"type": "integer", "minimum": 64, "maximum": 4096},
          "push_to_s3": {"type": "boolean"}, "prompt": {"type": "string"}}}
    }
  }
}
"""#
}

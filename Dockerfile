# syntax=docker/dockerfile:1
# One image per service: `docker build --build-arg SERVICE=media --build-arg PORT=50051 -t talkmesh-media .`
# (`make images` builds all five). SERVICE is media, audio, dispatcher, gateway or runpod-emulator;
# PORT is that service's port, which the HEALTHCHECK calls.

# --- build: the Swift toolchain on Debian 12 with the C libraries' headers --------------------------
FROM swift:6.3-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      pkg-config libnghttp2-dev libevent-dev libssl-dev libhttp-parser-dev libprotobuf-c-dev \
      libavformat-dev libavcodec-dev libavutil-dev libswscale-dev libswresample-dev libdeflate-dev \
      libcurl4-openssl-dev libsqlite3-dev libpq-dev libhiredis-dev libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG SERVICE
# The Swift runtime and Foundation are linked in (--static-swift-stdlib), so the runtime stage needs
# only Debian's C libraries.
RUN test -n "$SERVICE" \
 && swift build -c release --static-swift-stdlib --product "talkmesh-$SERVICE" \
 && swift build -c release --static-swift-stdlib --product talkmesh \
 && install -D -m 0755 ".build/release/talkmesh-$SERVICE" /out/talkmesh-service \
 && install -D -m 0755 .build/release/talkmesh /out/talkmesh

# --- runtime: only the libraries the binaries link ----------------------------------------------
# The list below is checked by Tests/Integration/test_image.py against every binary's own
# dependencies (readelf + ldd + dpkg -S): a library a binary links and this list misses fails `make test`.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates \
      libc6 \
      libnghttp2-14 \
      libevent-core-2.1-7 libevent-extra-2.1-7 libevent-pthreads-2.1-7 libevent-openssl-2.1-7 \
      libssl3 \
      libhttp-parser2.9 \
      libprotobuf-c1 \
      libavformat59 libavcodec59 libavutil57 libswscale6 libswresample4 \
      libdeflate0 \
      libcurl4 \
      libsqlite3-0 \
      libpq5 \
      libhiredis0.14 \
      libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/talkmesh --no-create-home talkmesh \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/talkmesh
ARG SERVICE
ARG PORT=8080
COPY --from=build /out/talkmesh-service /usr/local/bin/talkmesh-service
COPY --from=build /out/talkmesh /usr/local/bin/talkmesh
ENV PORT=${PORT} \
    LOG_FORMAT=json \
    TMPDIR=/tmp
LABEL org.opencontainers.image.title="talkmesh-${SERVICE}" \
      org.opencontainers.image.source="https://github.com/talkmesh/talkmesh"
# Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE ${PORT}
# Nothing is written outside /tmp and /var/lib/talkmesh (volumes in k8s/), so the root file system
# can be mounted read-only. SIGTERM drains calls in flight within DRAIN_TIMEOUT.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/bin/sh", "-c", "exec /usr/local/bin/talkmesh health \"127.0.0.1:${HEALTH_PORT:-$PORT}\" --timeout 2s"]
ENTRYPOINT ["/usr/local/bin/talkmesh-service"]

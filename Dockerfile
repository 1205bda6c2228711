# syntax=docker/dockerfile:1
# Cabinet, multi-stage. The runtime stage carries SoftHSM2 for evaluation; in
# production mount your HSM vendor's PKCS#11 library (and its config) into the
# container and point `operator init/join --hsm-lib` at it. See docs/DOCKER.md.
#
#   docker build -t cabinet:dev .
#   docker compose up            # three nodes, see compose.yaml

ARG GO_VERSION=1.26
ARG DEBIAN_RELEASE=trixie

FROM golang:${GO_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/go/pkg/mod go mod download
COPY . .
ARG VERSION=0.1.0-dev
# cgo: the PKCS#11 binding dlopens the vendor library.
RUN --mount=type=cache,target=/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=1 go build -trimpath -ldflags "-s -w -X main.Version=${VERSION}" -o /out/cabinet ./cmd/cabinet

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 cabinet \
 && useradd --system --uid 10001 --gid cabinet --home-dir /var/lib/cabinet --shell /usr/sbin/nologin cabinet \
 && install -d -o cabinet -g cabinet -m 0700 /var/lib/cabinet /var/lib/cabinet/softhsm /var/lib/cabinet/admin /etc/cabinet
COPY --from=build /out/cabinet /usr/local/bin/cabinet
COPY deploy/docker/entrypoint.sh /usr/local/bin/cabinet-entrypoint
COPY deploy/cabinet.yaml /etc/cabinet/cabinet.yaml
USER cabinet
WORKDIR /var/lib/cabinet
# 7400: gRPC API (mTLS), 7401: Raft (mTLS), 9464: Prometheus metrics (plain HTTP).
EXPOSE 7400 7401 9464
VOLUME ["/var/lib/cabinet"]
ENV CABINET_DATA_DIR=/var/lib/cabinet/data \
    CABINET_METRICS_ADDR=0.0.0.0:9464 \
    CABINET_LOG_FORMAT=json
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s \
    CMD ["cabinet", "healthcheck", "--timeout", "4s"]
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/cabinet-entrypoint"]
CMD ["server", "--config", "/etc/cabinet/cabinet.yaml"]

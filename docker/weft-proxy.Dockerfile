# ghcr.io/weft-mesh/weft-proxy: the sidecar, and (as root, `weft-proxy init`) the init
# container that installs its iptables rules, so the image carries iptables.
# Build from the repository's root: docker build -f docker/weft-proxy.Dockerfile .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weft-proxy

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 2102 weft-proxy \
 && useradd --uid 2102 --gid 2102 --no-create-home --shell /usr/sbin/nologin weft-proxy
COPY --from=build /src/target/release/weft-proxy /usr/local/bin/weft-proxy
# outbound, inbound, admin
EXPOSE 4140 4143 4191
USER 2102:2102
ENTRYPOINT ["/usr/local/bin/weft-proxy"]

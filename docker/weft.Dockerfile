# ghcr.io/weft-mesh/weft: the control plane (`weft control`), the CLI and the demo's apps.
# Build from the repository's root: docker build -f docker/weft.Dockerfile .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p weft-control

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/weft /usr/local/bin/weft
# gRPC, webhook, admin; the demo's apps listen on 8080
EXPOSE 8090 8443 9990 8080
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weft"]

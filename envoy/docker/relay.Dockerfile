# The RESP relay (`krowoc-relay`) that lets the filter reach Redis from stock Envoy.
# Build context: the repository root (docker compose -f envoy/docker-compose.yml builds it).
#
# Stage 1 builds only the krowoc-relay package, release profile, from the locked dependency set.
# Cargo needs every workspace member's manifest to load the workspace, so all members are copied.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY plugin plugin
COPY host-shim host-shim
COPY relay relay
COPY upstream upstream
COPY testkit testkit
COPY tests tests
COPY xtask xtask
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=krowoc-cargo-target \
    cargo build --locked --release -p krowoc-relay --bin krowoc-relay \
    && install -D -m 0755 target/release/krowoc-relay /out/krowoc-relay

# Stage 2: the same Debian release as the builder (glibc 2.36), nothing else but the probe.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin krowoc
COPY --from=build /out/krowoc-relay /usr/local/bin/krowoc-relay
COPY envoy/docker/http-ready.sh /usr/local/bin/http-ready
USER 10001
EXPOSE 7379
ENTRYPOINT ["krowoc-relay"]
# Loopback is the relay's safe default; in a container it must listen on the container's address.
CMD ["--listen", "0.0.0.0:7379", "--redis", "redis://redis:6379"]

# The demo upstream (krowoc-upstream, axum). Build context: the repository root.
#
# Stage 1 builds only the krowoc-upstream package, release profile, from the locked dependency
# set. Cargo needs every workspace member's manifest to load the workspace.
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
    cargo build --locked --release -p krowoc-upstream --bin krowoc-upstream \
    && install -D -m 0755 target/release/krowoc-upstream /out/krowoc-upstream

# Stage 2: the same Debian release as the builder (glibc 2.36), nothing else but the probe.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin krowoc
COPY --from=build /out/krowoc-upstream /usr/local/bin/krowoc-upstream
COPY envoy/docker/http-ready.sh /usr/local/bin/http-ready
USER 10001
ENV UPSTREAM_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["krowoc-upstream"]

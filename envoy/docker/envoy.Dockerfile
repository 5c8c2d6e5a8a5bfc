# Stock Envoy with the Krowoc Edge filter at the path envoy.yaml loads it from.
# Build context: the repository root. envoy.yaml itself is mounted by docker-compose.yml.
#
# Stage 1 builds the plugin for wasm32-wasip1 WITHOUT the default `redis-call` feature: that
# feature imports Higress's proxy_redis_init/proxy_redis_call, which stock Envoy does not
# provide, and Envoy refuses to load a module with an import it lacks. Stock Envoy therefore
# runs transport `relay` (see envoy/README.md).
FROM rust:1.95.0-bookworm AS plugin
RUN rustup target add wasm32-wasip1
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
    cargo build --locked -p krowoc-plugin --target wasm32-wasip1 --profile wasm --no-default-features \
    && install -D -m 0644 target/wasm32-wasip1/wasm/krowoc_plugin.wasm /out/plugin.wasm

# Stage 2: the official image (V8 Wasm runtime built in), pinned; see envoy/README.md for why
# this version.
FROM envoyproxy/envoy:v1.40.0
COPY --from=plugin /out/plugin.wasm /etc/envoy/plugin.wasm
COPY envoy/docker/http-ready.sh /usr/local/bin/http-ready

# The filter as a Higress Wasm plugin image: one layer holding /plugin.wasm, the layout Higress
# pulls from an oci:// URL. Build context: the repository root.
#   docker build -f envoy/higress/plugin.Dockerfile -t REGISTRY/krowoc-edge:0.1.0 .
#   docker push REGISTRY/krowoc-edge:0.1.0
#
# Unlike envoy/docker/envoy.Dockerfile this keeps the default `redis-call` feature: Higress
# provides proxy_redis_init/proxy_redis_call, and wasmplugin.yaml uses transport `redis_call`.
# Its own target cache: envoy.Dockerfile writes the same .wasm path with other features.
FROM rust:1.95.0-bookworm AS plugin
RUN rustup target add wasm32-wasip1
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY plugin plugin
COPY host-shim host-shim
COPY upstream upstream
COPY testkit testkit
COPY tests tests
COPY relay relay
COPY xtask xtask
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=krowoc-cargo-target-higress \
    cargo build --locked -p krowoc-plugin --target wasm32-wasip1 --profile wasm \
    && install -D -m 0644 target/wasm32-wasip1/wasm/krowoc_plugin.wasm /out/plugin.wasm

FROM scratch
COPY --from=plugin /out/plugin.wasm /plugin.wasm
